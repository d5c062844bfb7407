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
    DCFormerSiglipConfig,
    DCFormerSiglipModel,
    DCFormerSiglipVisionConfig,
    DCFormerSiglipVisionModel,
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
    for config_class in (DCFormerSiglipVisionConfig, DCFormerSiglipConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(DCFormerSiglipConfig, DCFormerSiglipModel, exist_ok=True)
    AutoModel.register(DCFormerSiglipVisionConfig, DCFormerSiglipVisionModel, exist_ok=True)
    AutoProcessor.register(DCFormerSiglipConfig, VoxCLIPProcessor, exist_ok=True)
    AutoImageProcessor.register(DCFormerSiglipConfig, slow_image_processor_class=VoxVolumeProcessor, exist_ok=True)
    DCFormerSiglipConfig.register_for_auto_class("AutoConfig")
    DCFormerSiglipModel.register_for_auto_class("AutoModel")


_register_auto_classes()

__all__ = [
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
