"""Configuration of VoxCLIP: a VoxViT and a BERT-like text encoder trained contrastively on volume-report pairs."""

from __future__ import annotations

import math

from transformers import AutoConfig, PretrainedConfig

from .configuration_voxlm import auto_text_config
from .configuration_voxvit import VoxViTConfig

CONTRASTIVE_LOSSES = ("infonce", "siglip")
TEXT_POOLING = ("cls", "mean")
VOXCLIP_AUTO_MAP = {"AutoConfig": "configuration_voxclip.VoxCLIPConfig", "AutoModel": "modeling_voxclip.VoxCLIPModel"}


class VoxCLIPConfig(PretrainedConfig):
    r"""
    Configuration of [`VoxCLIPModel`] (M3D-CLIP, with MG-3D's inter-patient term as an option).

    Args:
        vision_config (`VoxViTConfig` or `dict`, *optional*): the volume encoder.
        text_config (`PretrainedConfig` or `dict`, *optional*): a BERT-like encoder config (needs `model_type`);
            defaults to BERT-base.
        projection_dim (`int`, *optional*, defaults to 512): width of the shared embedding space.
        logit_scale_init_value (`float`, *optional*, defaults to log(1/0.07)): initial log temperature (CLIP).
        text_pooling (`str`, *optional*, defaults to `"cls"`): `"cls"` (M3D-CLIP's BERT CLS) or `"mean"` (mean over
            tokens, as sentence encoders such as MiniLM are trained).
        contrastive_loss (`str`, *optional*, defaults to `"infonce"`): `"infonce"` (symmetric, CLIP) or `"siglip"`.
        contrastive_loss_weight (`float`, *optional*, defaults to 1.0): weight of the contrastive term.
        inter_patient_loss_weight (`float`, *optional*, defaults to 0.0): weight of MG-3D's inter-patient term (L1
            between image-image similarity and soft targets from report-report similarity); 0 turns it off.
        inter_patient_thresholds (`tuple[float, float]`, *optional*, defaults to `(0.6, 0.9)`): report similarities
            at or below the first give target 0, at or above the second target 1, in between the similarity itself.
    """

    model_type = "voxclip"
    sub_configs = {"vision_config": VoxViTConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        projection_dim: int = 512,
        logit_scale_init_value: float = math.log(1 / 0.07),
        text_pooling: str = "cls",
        contrastive_loss: str = "infonce",
        contrastive_loss_weight: float = 1.0,
        inter_patient_loss_weight: float = 0.0,
        inter_patient_thresholds=(0.6, 0.9),
        **kwargs,
    ):
        if isinstance(vision_config, dict):
            vision_config = VoxViTConfig(**vision_config)
        self.vision_config = vision_config if vision_config is not None else VoxViTConfig()
        self.text_config = auto_text_config(text_config, "bert", "'bert'")
        self.projection_dim = projection_dim
        self.logit_scale_init_value = logit_scale_init_value
        self.text_pooling = text_pooling
        self.contrastive_loss = contrastive_loss
        self.contrastive_loss_weight = contrastive_loss_weight
        self.inter_patient_loss_weight = inter_patient_loss_weight
        self.inter_patient_thresholds = [float(t) for t in inter_patient_thresholds]
        kwargs.setdefault("auto_map", dict(VOXCLIP_AUTO_MAP))
        super().__init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Raise `ValueError` naming the field when the settings cannot train."""
        if self.contrastive_loss not in CONTRASTIVE_LOSSES:
            raise ValueError(f"Unknown `contrastive_loss` {self.contrastive_loss!r}; choose one of {CONTRASTIVE_LOSSES}")
        if self.text_pooling not in TEXT_POOLING:
            raise ValueError(f"Unknown `text_pooling` {self.text_pooling!r}; choose one of {TEXT_POOLING}")
        if getattr(self.text_config, "hidden_size", None) is None:
            raise ValueError("`text_config` has no `hidden_size`: it is not a text encoder config")
        if self.projection_dim <= 0:
            raise ValueError(f"`projection_dim` must be positive, got {self.projection_dim}")
        low, high = self.inter_patient_thresholds
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"`inter_patient_thresholds` must satisfy 0 <= low < high <= 1, got {(low, high)}")
        for field in ("contrastive_loss_weight", "inter_patient_loss_weight"):
            if getattr(self, field) < 0:
                raise ValueError(f"`{field}` must be >= 0")
