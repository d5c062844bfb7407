"""Configuration of VoxViT, the 3D vision transformer that encodes CT and MRI volumes."""

from __future__ import annotations

import math

from transformers import AutoConfig, PretrainedConfig

VOXVIT_AUTO_MAP = {"AutoConfig": "configuration_voxvit.VoxViTConfig", "AutoModel": "modeling_voxvit.VoxViTModel"}

ATTENTION_LEVELS = ("slice", "scan", "study")
POSITION_EMBEDDING_TYPES = ("learned", "sincos")
POOLING_TYPES = ("cls", "mean", "max")


def scan_study_schedule(num_layers: int) -> list[str]:
    """HLIP's brain-MRI / head-CT schedule: every third block attends across the study, the others within a scan.

    Note: HLIP `vit_base_scan_study_token1176` (src/hlip/visual_encoder.py) uses `study_attn_indexes=(2, 5, 8, 11)`.
    """
    return ["study" if index % 3 == 2 else "scan" for index in range(num_layers)]


def slice_scan_schedule(num_layers: int) -> list[str]:
    """HLIP's CT-RATE schedule: every third block attends within a scan, the others within one axial slab.

    Note: HLIP `vit_base_slice_scan_token2744` uses `scan_attn_indexes=(2, 5, 8, 11)`, slice attention elsewhere.
    """
    return ["scan" if index % 3 == 2 else "slice" for index in range(num_layers)]


def slice_scan_study_schedule(num_layers: int) -> list[str]:
    """All three levels, cycling `slice, scan, study`: the study sees every third block, as in the other presets."""
    return [ATTENTION_LEVELS[index % 3] for index in range(num_layers)]


ATTENTION_PRESETS = {
    "scan_study": scan_study_schedule,
    "slice_scan": slice_scan_schedule,
    "slice_scan_study": slice_scan_study_schedule,
}


def as_triple(value, name: str) -> tuple[int, int, int]:
    """Normalise an int or a 3-sequence to a `(D, H, W)` tuple of ints, naming the config field on error."""
    if isinstance(value, int):
        return (value, value, value)
    triple = tuple(int(v) for v in value)
    if len(triple) != 3:
        raise ValueError(f"`{name}` must be an int or three ints (D, H, W), got {value!r}")
    return triple


class VoxConfig(PretrainedConfig):
    """What every voxlm config shares: its `validate_architecture` runs when it is built, and again after the
    overrides of `from_pretrained(folder, key=value)`, which transformers sets on the built config one by one."""

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        loaded = super().from_dict(config_dict, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded  # (config, unused kwargs) on request
        config.validate_architecture()
        return loaded


def auto_text_config(text_config, default_model_type: str, examples: str) -> PretrainedConfig:
    """A sub-config given as a config, a dict with its `model_type`, or `None` (the default model type's defaults)."""
    if text_config is None:
        return AutoConfig.for_model(default_model_type)
    if isinstance(text_config, dict):
        if "model_type" not in text_config:
            raise ValueError(f"`text_config` given as a dict needs a `model_type` (e.g. {examples})")
        text_config = dict(text_config)
        return AutoConfig.for_model(text_config.pop("model_type"), **text_config)
    return text_config


class VoxViTConfig(VoxConfig):
    r"""
    Configuration of [`VoxViTModel`], a ViT over 3D patches. The defaults reproduce the encoder of M3D-CLIP /
    M3D-LaMed (MONAI `ViT`, ViT-B width, `pos_embed="perceptron"`, CLS token): a `1 x 32 x 256 x 256` volume cut
    into `4 x 16 x 16` patches gives 2,048 patch tokens plus CLS.

    Args:
        image_size (`tuple[int, int, int]`, *optional*, defaults to `(32, 256, 256)`):
            Input volume size `(D, H, W)`, depth first.
        patch_size (`tuple[int, int, int]`, *optional*, defaults to `(4, 16, 16)`):
            Patch size `(D, H, W)`; must divide `image_size` on every axis.
        num_channels (`int`, *optional*, defaults to 1):
            Input channels.
        hidden_size (`int`, *optional*, defaults to 768):
            Token width `E`.
        intermediate_size (`int`, *optional*, defaults to 3072):
            Width of the MLP in each block (MONAI's `mlp_dim`).
        num_hidden_layers (`int`, *optional*, defaults to 12):
            Number of transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Attention heads per block; must divide `hidden_size`.
        qkv_bias (`bool`, *optional*, defaults to `False`):
            Bias on the fused query/key/value projection (MONAI's default, used by M3D).
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout after the patch embedding, the attention output and the MLP.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention weights.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            LayerNorm epsilon (PyTorch's default, as in MONAI).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal initialisation.
        attention_levels (`str` or `list[str]`, *optional*):
            HLIP hierarchical attention: which tokens each block attends over. A list with one entry per block, each
            `"slice"` (the patches of one axial slab, i.e. one depth index of the patch grid, of one scan), `"scan"`
            (all tokens of one scan) or `"study"` (all tokens of all scans of a study, padded scans masked out); or a
            preset name: `"scan_study"`, `"slice_scan"`, `"slice_scan_study"`. `None` (default) is `"scan"`
            everywhere: the M3D / MONAI encoder, applied to each scan of a study independently.
        position_embedding_type (`str`, *optional*, defaults to `"learned"`):
            `"learned"`: one trained vector per patch position (M3D / MONAI). `"sincos"`: fixed 3D sine-cosine
            embeddings of the `(d, h, w)` patch index (HLIP), stored in the same frozen parameter.
        max_scans (`int`, *optional*, defaults to 1):
            Most scans a study may hold. Above 1, the model learns a scan-order embedding for scans `1 .. max_scans - 1`
            that is added to their patch tokens; scan 0 gets none, so a one-scan study equals the single-scan encoder.
        pooling (`str`, *optional*, defaults to `"cls"`):
            What `pooler_output` (the volume embedding that VoxCLIP projects) is made of: `"cls"` (the CLS token, as
            M3D-CLIP), `"mean"` or `"max"` over the patch tokens. Max pooling lets a small local finding (a bleed in
            one or two of 2,048 patches) reach the embedding from the first step, where CLS and mean pooling dilute it.
    """

    model_type = "voxvit"

    def __init__(
        self,
        image_size=(32, 256, 256),
        patch_size=(4, 16, 16),
        num_channels: int = 1,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        qkv_bias: bool = False,
        hidden_dropout_prob: float = 0.0,
        attention_dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        attention_levels: str | list[str] | None = None,
        position_embedding_type: str = "learned",
        max_scans: int = 1,
        pooling: str = "cls",
        **kwargs,
    ):
        self.image_size = list(as_triple(image_size, "image_size"))
        self.patch_size = list(as_triple(patch_size, "patch_size"))
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.qkv_bias = qkv_bias
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_dropout = attention_dropout
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.attention_levels = list(attention_levels) if isinstance(attention_levels, (list, tuple)) else attention_levels
        self.position_embedding_type = position_embedding_type
        self.max_scans = max_scans
        self.pooling = pooling
        kwargs.setdefault("auto_map", dict(VOXVIT_AUTO_MAP))
        super().__init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Raise `ValueError` naming the field when the numbers cannot build a working encoder."""
        for axis, (size, patch) in enumerate(zip(self.image_size, self.patch_size)):
            if patch <= 0 or size % patch != 0:
                raise ValueError(
                    f"`image_size` {tuple(self.image_size)} is not divisible by `patch_size` "
                    f"{tuple(self.patch_size)} on axis {'DHW'[axis]}"
                )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})"
            )
        for field in ("num_channels", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if getattr(self, field) <= 0:
                raise ValueError(f"`{field}` must be positive, got {getattr(self, field)}")
        for field in ("hidden_dropout_prob", "attention_dropout"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise ValueError(f"`{field}` must lie in [0, 1], got {getattr(self, field)}")
        if self.pooling not in POOLING_TYPES:
            raise ValueError(f"`pooling` must be one of {POOLING_TYPES}, got {self.pooling!r}")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"`position_embedding_type` must be one of {POSITION_EMBEDDING_TYPES}, "
                f"got {self.position_embedding_type!r}"
            )
        if not isinstance(self.max_scans, int) or self.max_scans < 1:
            raise ValueError(f"`max_scans` must be an int >= 1, got {self.max_scans!r}")
        self.validate_attention_levels()

    def validate_attention_levels(self):
        """Raise `ValueError` naming `attention_levels` for an unknown preset or level, or a list of the wrong length."""
        levels = self.attention_levels
        if levels is None:
            return
        if isinstance(levels, str):
            if levels not in ATTENTION_PRESETS:
                raise ValueError(
                    f"`attention_levels` preset {levels!r} is unknown; use one of {tuple(ATTENTION_PRESETS)} "
                    f"or a list of {ATTENTION_LEVELS} per block"
                )
            return
        if len(levels) != self.num_hidden_layers:
            raise ValueError(
                f"`attention_levels` lists {len(levels)} levels but `num_hidden_layers` is {self.num_hidden_layers}"
            )
        unknown = sorted({level for level in levels if level not in ATTENTION_LEVELS})
        if unknown:
            raise ValueError(f"`attention_levels` holds unknown levels {unknown}; each must be one of {ATTENTION_LEVELS}")

    @property
    def block_attention_levels(self) -> tuple[str, ...]:
        """The attention level of every block, with `None` and presets expanded (length `num_hidden_layers`)."""
        if self.attention_levels is None:
            return ("scan",) * self.num_hidden_layers
        if isinstance(self.attention_levels, str):
            return tuple(ATTENTION_PRESETS[self.attention_levels](self.num_hidden_layers))
        return tuple(self.attention_levels)

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Patch grid `(D', H', W')` = `image_size // patch_size`."""
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size))

    @property
    def num_patches(self) -> int:
        """Number of patch tokens (CLS not counted)."""
        return math.prod(self.grid_size)

    @property
    def patch_dim(self) -> int:
        """Voxels per patch times channels: the input width of the patch projection."""
        return math.prod(self.patch_size) * self.num_channels
