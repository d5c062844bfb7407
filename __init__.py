"""voxlm: Hub-native 3D medical vision-language models.

Importing voxlm registers every voxlm config, model and processor with the transformers Auto classes, so
``AutoModel.from_pretrained(folder)`` works on a saved voxlm folder without ``trust_remote_code``.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

# Absolute imports: test runners that see this folder as a package under another name (pytest imports a rootdir
# `__init__.py`) must still register the one `voxlm.modeling`, not a second copy of its classes.
from voxlm.modeling import (
    ColipriConfig,
    ColipriModel,
    ColipriVisionConfig,
    ColipriVisionModel,
    DCFormerSiglipConfig,
    DCFormerSiglipModel,
    DCFormerSiglipVisionConfig,
    DCFormerSiglipVisionModel,
    HLIPConfig,
    HLIPModel,
    HLIPVisionConfig,
    HLIPVisionModel,
    MerlinConfig,
    MerlinModel,
    MerlinVisionConfig,
    MerlinVisionModel,
    VoxCLIPConfig,
    VoxCLIPModel,
    VoxLMConfig,
    VoxLMForConditionalGeneration,
    VoxSegConfig,
    VoxViTConfig,
    VoxViTModel,
)
from voxlm.processing import VoxCLIPProcessor, VoxLMProcessor, VoxVolumeProcessor

__version__ = "0.1.0"

# (config, model, vision config, vision model) of each released encoder voxlm converts (`voxlm convert`).
RELEASED_ENCODERS = (
    (ColipriConfig, ColipriModel, ColipriVisionConfig, ColipriVisionModel),
    (HLIPConfig, HLIPModel, HLIPVisionConfig, HLIPVisionModel),
    (MerlinConfig, MerlinModel, MerlinVisionConfig, MerlinVisionModel),
    (DCFormerSiglipConfig, DCFormerSiglipModel, DCFormerSiglipVisionConfig, DCFormerSiglipVisionModel),
)


def _register_auto_classes() -> None:
    for config_class in (VoxViTConfig, VoxSegConfig, VoxLMConfig, VoxCLIPConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(VoxViTConfig, VoxViTModel, exist_ok=True)
    AutoModel.register(VoxLMConfig, VoxLMForConditionalGeneration, exist_ok=True)
    AutoModel.register(VoxCLIPConfig, VoxCLIPModel, exist_ok=True)
    AutoModelForImageTextToText.register(VoxLMConfig, VoxLMForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(VoxLMConfig, VoxLMForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(VoxLMConfig, slow_image_processor_class=VoxVolumeProcessor, exist_ok=True)
    AutoImageProcessor.register(VoxViTConfig, slow_image_processor_class=VoxVolumeProcessor, exist_ok=True)
    AutoImageProcessor.register(VoxCLIPConfig, slow_image_processor_class=VoxVolumeProcessor, exist_ok=True)
    AutoProcessor.register(VoxLMConfig, VoxLMProcessor, exist_ok=True)
    AutoProcessor.register(VoxCLIPConfig, VoxCLIPProcessor, exist_ok=True)
    # `save_pretrained` copies the modeling and processing files next to the weights and names them in `auto_map`, so
    # `trust_remote_code` users load the same model and processor without voxlm.
    VoxVolumeProcessor.register_for_auto_class("AutoImageProcessor")
    VoxLMProcessor.register_for_auto_class("AutoProcessor")
    VoxCLIPProcessor.register_for_auto_class("AutoProcessor")
    VoxViTConfig.register_for_auto_class("AutoConfig")
    VoxViTModel.register_for_auto_class("AutoModel")
    VoxLMConfig.register_for_auto_class("AutoConfig")
    VoxLMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    VoxCLIPConfig.register_for_auto_class("AutoConfig")
    VoxCLIPModel.register_for_auto_class("AutoModel")
    # The released encoders voxlm converts: dual encoders with VoxCLIP's processor, and their image towers.
    for config_class, model_class, vision_config_class, vision_model_class in RELEASED_ENCODERS:
        for registered in (config_class, vision_config_class):
            AutoConfig.register(registered.model_type, registered, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        AutoModel.register(vision_config_class, vision_model_class, exist_ok=True)
        AutoProcessor.register(config_class, VoxCLIPProcessor, exist_ok=True)
        AutoImageProcessor.register(config_class, slow_image_processor_class=VoxVolumeProcessor, exist_ok=True)
        config_class.register_for_auto_class("AutoConfig")
        model_class.register_for_auto_class("AutoModel")
        vision_config_class.register_for_auto_class("AutoConfig")
        vision_model_class.register_for_auto_class("AutoModel")


_register_auto_classes()

__all__ = [
    "ColipriConfig",
    "ColipriModel",
    "HLIPConfig",
    "HLIPModel",
    "MerlinConfig",
    "MerlinModel",
    "DCFormerSiglipConfig",
    "DCFormerSiglipModel",
    "VoxCLIPConfig",
    "VoxCLIPModel",
    "VoxViTConfig",
    "VoxViTModel",
    "VoxLMConfig",
    "VoxSegConfig",
    "VoxLMForConditionalGeneration",
    "VoxCLIPProcessor",
    "VoxLMProcessor",
    "VoxVolumeProcessor",
]
