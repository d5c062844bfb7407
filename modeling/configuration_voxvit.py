"""Configuration of VoxViT, the 3D vision transformer that encodes CT and MRI volumes."""

from __future__ import annotations

import math

from transformers import PretrainedConfig

VOXVIT_AUTO_MAP = {"AutoConfig": "configuration_voxvit.VoxViTConfig", "AutoModel": "modeling_voxvit.VoxViTModel"}


def as_triple(value, name: str) -> tuple[int, int, int]:
    """Normalise an int or a 3-sequence to a `(D, H, W)` tuple of ints, naming the config field on error."""
    if isinstance(value, int):
        return (value, value, value)
    triple = tuple(int(v) for v in value)
    if len(triple) != 3:
        raise ValueError(f"`{name}` must be an int or three ints (D, H, W), got {value!r}")
    return triple


class VoxViTConfig(PretrainedConfig):
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
