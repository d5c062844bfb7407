"""Configuration of HLIP (Zch0414/hlip): a timm ViT over 3D patches with slice / scan / study attention, and a
BiomedBERT-like text encoder, trained contrastively on radiology studies and their reports."""

from __future__ import annotations

import math

from transformers import AutoConfig

from .configuration_voxvit import VoxConfig, auto_text_config

ATTENTION_LEVELS = ("slice", "scan", "study")
HLIP_AUTO_MAP = {"AutoConfig": "configuration_hlip.HLIPConfig", "AutoModel": "modeling_hlip.HLIPModel"}
HLIP_VISION_AUTO_MAP = {"AutoConfig": "configuration_hlip.HLIPVisionConfig",
                        "AutoModel": "modeling_hlip.HLIPVisionModel"}
# HLIP's chest-CT release (src/hlip/visual_encoder.py `vit_base_singlescan_h2_token2744`): slice attention in every
# block but each third one, which attends over the whole scan (a one-scan study).
CHEST_CT_LEVELS = ("slice", "slice", "study") * 4


class HLIPVisionConfig(VoxConfig):
    r"""
    Configuration of [`HLIPVisionModel`], HLIP's `HLIPVisualEncoder` (a timm `VisionTransformer` with a 3D patch
    embedding). The defaults reproduce HLIP's chest-CT encoder `vit_base_singlescan_h2_token2744`: ViT-B over a
    `1 x 112 x 336 x 336` scan in `8 x 24 x 24` patches (14 x 14 x 14 = 2,744 tokens per scan).

    Args:
        image_size (`tuple[int, int, int]`, *optional*, defaults to `(112, 336, 336)`):
            HLIP's `img_size` `(D, H, W)`: the size whose patch grid the position table covers; other sizes work
            (the table is resampled trilinearly, as HLIP does).
        patch_size (`tuple[int, int, int]`, *optional*, defaults to `(8, 24, 24)`): HLIP's `patch_size` `(D, H, W)`.
        num_channels (`int`, *optional*, defaults to 1): input channels of each scan.
        hidden_size (`int`, *optional*, defaults to 768): token width `E` (timm's `embed_dim`), also the width of
            the pooled feature (the CLS token).
        intermediate_size (`int`, *optional*, defaults to 3072): MLP width (timm's `mlp_ratio * embed_dim`).
        num_hidden_layers (`int`, *optional*, defaults to 12): timm's `depth`.
        num_attention_heads (`int`, *optional*, defaults to 12): timm's `num_heads`.
        qkv_bias (`bool`, *optional*, defaults to `True`): timm's `qkv_bias`.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6): timm ViT's LayerNorm epsilon.
        num_register_tokens (`int`, *optional*, defaults to 0): timm's `reg_tokens`, prefix tokens after CLS.
        pre_norm (`bool`, *optional*, defaults to `False`): timm's `pre_norm` (a LayerNorm before the blocks; the
            patch projection then has no bias, as timm builds it).
        max_num_scans (`int`, *optional*, defaults to 1): HLIP's `max_num_scans`; above 1 a fixed sine-cosine table
            of that many scan positions is added to each scan's tokens (0 or 1: none, as HLIP's chest-CT and
            `ablate_seqposemb_*` encoders have).
        attention_levels (`list[str]`, *optional*, defaults to HLIP's chest-CT layout): for each block, `"slice"`
            (the tokens of one patch-depth slice attend to each other), `"scan"` (one scan) or `"study"` (all scans);
            HLIP's `slice_attn_indexes` / `scan_attn_indexes` / `study_attn_indexes` as one list.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0), attention_dropout (`float`, *optional*,
            defaults to 0.0): timm's `proj_drop_rate` / `attn_drop_rate` (0 in HLIP's releases).
        initializer_range (`float`, *optional*, defaults to 0.02): std of the truncated-normal initialisation.
    """

    model_type = "hlip_vision"

    def __init__(
        self,
        image_size=(112, 336, 336),
        patch_size=(8, 24, 24),
        num_channels: int = 1,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        num_register_tokens: int = 0,
        pre_norm: bool = False,
        max_num_scans: int = 1,
        attention_levels=CHEST_CT_LEVELS,
        hidden_dropout_prob: float = 0.0,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.image_size = [int(size) for size in image_size]
        self.patch_size = [int(size) for size in patch_size]
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.qkv_bias = qkv_bias
        self.layer_norm_eps = layer_norm_eps
        self.num_register_tokens = num_register_tokens
        self.pre_norm = pre_norm
        self.max_num_scans = max_num_scans
        self.attention_levels = list(attention_levels)
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        kwargs.setdefault("auto_map", dict(HLIP_VISION_AUTO_MAP))
        super().__init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Raise `ValueError` naming the field when HLIP's encoder cannot be built from the settings."""
        for field in ("image_size", "patch_size"):
            sizes = getattr(self, field)
            if len(sizes) != 3 or min(sizes) < 1:
                raise ValueError(f"`{field}` must be three positive sizes (D, H, W), got {sizes}")
        if any(size < patch for size, patch in zip(self.image_size, self.patch_size)):
            raise ValueError(f"`patch_size` {self.patch_size} is larger than `image_size` {self.image_size}")
        if self.hidden_size % 6:
            # HLIP's 3D sine-cosine table gives each axis a third of the width, half sines, half cosines.
            raise ValueError(f"`hidden_size` must be a multiple of 6 (HLIP's 3D sine-cosine table), got "
                             f"{self.hidden_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"`hidden_size` {self.hidden_size} is not divisible by `num_attention_heads` "
                             f"{self.num_attention_heads}")
        for field in ("num_channels", "intermediate_size", "num_hidden_layers"):
            if getattr(self, field) < 1:
                raise ValueError(f"`{field}` must be >= 1, got {getattr(self, field)}")
        for field in ("num_register_tokens", "max_num_scans"):
            if getattr(self, field) < 0:
                raise ValueError(f"`{field}` must be >= 0, got {getattr(self, field)}")
        if len(self.attention_levels) != self.num_hidden_layers:
            raise ValueError(f"`attention_levels` names {len(self.attention_levels)} blocks, but "
                             f"`num_hidden_layers` is {self.num_hidden_layers}")
        unknown = sorted(set(self.attention_levels) - set(ATTENTION_LEVELS))
        if unknown:
            raise ValueError(f"Unknown `attention_levels` {unknown}; choose from {ATTENTION_LEVELS}")

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Patch grid `(D', H', W')` of `image_size`: the shape of the position table."""
        return tuple(size // patch for size, patch in zip(self.image_size, self.patch_size))

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus the register tokens."""
        return 1 + self.num_register_tokens


class HLIPConfig(VoxConfig):
    r"""
    Configuration of [`HLIPModel`]: HLIP's open_clip `CustomTextCLIP` (a timm tower with `token` pooling and a
    bias-free linear projection; an `HFTextEncoder` with the CLS token of the last hidden state and a bias-free
    linear projection).

    Args:
        vision_config (`HLIPVisionConfig` or `dict`, *optional*): the study encoder.
        text_config (`PretrainedConfig` or `dict`, *optional*): a BERT-like encoder config (needs `model_type`);
            defaults to BERT-base (BiomedBERT's and CXR-BERT's shape).
        projection_dim (`int`, *optional*, defaults to 512): open_clip's `embed_dim`, the shared embedding width.
        logit_scale_init_value (`float`, *optional*, defaults to log(1/0.07)): initial log temperature (open_clip
            keeps `logit_scale` in log space too, so a checkpoint's value is used as it is).
        initializer_range (`float`, *optional*, defaults to 0.02): std of the projections' initialisation.
    """

    model_type = "hlip"
    sub_configs = {"vision_config": HLIPVisionConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        projection_dim: int = 512,
        logit_scale_init_value: float = math.log(1 / 0.07),
        initializer_range: float = 0.02,
        **kwargs,
    ):
        if isinstance(vision_config, dict):
            vision_config = HLIPVisionConfig(**vision_config)
        self.vision_config = vision_config if vision_config is not None else HLIPVisionConfig()
        self.text_config = auto_text_config(text_config, "bert", "'bert'")
        self.projection_dim = projection_dim
        self.logit_scale_init_value = logit_scale_init_value
        self.initializer_range = initializer_range
        kwargs.setdefault("auto_map", dict(HLIP_AUTO_MAP))
        super().__init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Raise `ValueError` naming the field when the settings cannot be built."""
        if getattr(self.text_config, "hidden_size", None) is None:
            raise ValueError("`text_config` has no `hidden_size`: it is not a text encoder config")
        if self.projection_dim <= 0:
            raise ValueError(f"`projection_dim` must be positive, got {self.projection_dim}")


__all__ = ["HLIPConfig", "HLIPVisionConfig"]
