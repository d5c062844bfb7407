"""voxlm's models. These files depend only on torch, transformers and einops and import each other relatively,
so `save_pretrained` can copy them next to the weights for `trust_remote_code` users."""

from .configuration_colipri import ColipriConfig, ColipriVisionConfig
from .configuration_dcformer_siglip import DCFormerSiglipConfig, DCFormerSiglipVisionConfig
from .configuration_hlip import HLIPConfig, HLIPVisionConfig
from .configuration_merlin import MerlinConfig, MerlinVisionConfig
from .configuration_voxclip import VoxCLIPConfig
from .configuration_voxlm import VoxLMConfig, VoxSegConfig
from .configuration_voxvit import VoxViTConfig
from .modeling_colipri import ColipriModel, ColipriVisionModel
from .modeling_dcformer_siglip import DCFormerSiglipModel, DCFormerSiglipVisionModel
from .modeling_hlip import HLIPModel, HLIPVisionModel
from .modeling_merlin import MerlinModel, MerlinVisionModel
from .modeling_voxclip import VoxCLIPModel
from .modeling_voxlm import VoxLMForConditionalGeneration, VoxLMPreTrainedModel
from .modeling_voxvit import VoxViTModel, VoxViTPreTrainedModel

__all__ = [
    "VoxViTConfig",
    "VoxViTModel",
    "VoxViTPreTrainedModel",
    "VoxLMConfig",
    "VoxSegConfig",
    "VoxLMForConditionalGeneration",
    "VoxLMPreTrainedModel",
    "VoxCLIPConfig",
    "VoxCLIPModel",
    "ColipriConfig",
    "ColipriVisionConfig",
    "ColipriModel",
    "ColipriVisionModel",
    "HLIPConfig",
    "HLIPVisionConfig",
    "HLIPModel",
    "HLIPVisionModel",
    "MerlinConfig",
    "MerlinVisionConfig",
    "MerlinModel",
    "MerlinVisionModel",
    "DCFormerSiglipConfig",
    "DCFormerSiglipVisionConfig",
    "DCFormerSiglipModel",
    "DCFormerSiglipVisionModel",
]
