"""The volume encoders a VoxCLIP is built on, by `model_type`: voxlm's VoxViT and the image towers of the released
encoders voxlm converts. Imported relatively, so that a saved VoxCLIP's remote code carries every tower (voxlm's Auto
registrations do not exist there)."""

from __future__ import annotations

from transformers import PretrainedConfig

from .configuration_colipri import ColipriVisionConfig
from .configuration_dcformer_siglip import DCFormerSiglipVisionConfig
from .configuration_hlip import HLIPVisionConfig
from .configuration_merlin import MerlinVisionConfig
from .configuration_voxvit import VoxViTConfig
from .modeling_colipri import ColipriVisionModel
from .modeling_dcformer_siglip import DCFormerSiglipVisionModel
from .modeling_hlip import HLIPVisionModel
from .modeling_merlin import MerlinVisionModel
from .modeling_voxvit import VoxViTModel

# model_type -> (config class, model class). Every model returns a `BaseModelOutputWithPooling` whose
# `pooler_output (B, config.hidden_size)` is the volume's embedding before any contrastive projection.
VISION_TOWERS: dict[str, tuple[type, type]] = {
    VoxViTConfig.model_type: (VoxViTConfig, VoxViTModel),
    ColipriVisionConfig.model_type: (ColipriVisionConfig, ColipriVisionModel),
    HLIPVisionConfig.model_type: (HLIPVisionConfig, HLIPVisionModel),
    MerlinVisionConfig.model_type: (MerlinVisionConfig, MerlinVisionModel),
    DCFormerSiglipVisionConfig.model_type: (DCFormerSiglipVisionConfig, DCFormerSiglipVisionModel),
}


def vision_tower_config(config) -> PretrainedConfig:
    """A vision tower's config from a config, a dict (its `model_type` picks the tower; `"voxvit"` when absent) or
    `None` (a default VoxViT).

    Raises:
        `ValueError`: a `model_type` that is no tower of `VISION_TOWERS`.
    """
    if config is None:
        return VoxViTConfig()
    if isinstance(config, dict):
        fields = dict(config)
        model_type = fields.pop("model_type", VoxViTConfig.model_type)
        return vision_tower_class(model_type)[0](**fields)
    vision_tower_class(config.model_type)
    return config


def vision_tower_class(model_type: str) -> tuple[type, type]:
    """`(config class, model class)` of the tower `model_type`; `ValueError` naming the known ones otherwise."""
    if model_type not in VISION_TOWERS:
        raise ValueError(f"`vision_config.model_type` {model_type!r} is no voxlm vision tower; choose one of "
                         f"{sorted(VISION_TOWERS)}")
    return VISION_TOWERS[model_type]


def build_vision_tower(config: PretrainedConfig):
    """A randomly initialised tower of `config`'s type."""
    return vision_tower_class(config.model_type)[1](config)


__all__ = ["VISION_TOWERS", "build_vision_tower", "vision_tower_class", "vision_tower_config"]
