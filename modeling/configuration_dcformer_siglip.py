"""Configuration of DCFormer-SigLIP (Med3DVLM's image-text encoder): a decomposed-convolution 3D encoder (DCFormer)
and a DistilBERT, trained with SigLIP's sigmoid loss."""

from __future__ import annotations

import math

from transformers import PretrainedConfig

from .configuration_voxvit import auto_text_config



def _check_positive_ints(config: PretrainedConfig, names: tuple[str, ...]) -> None:
    for name in names:
        values = getattr(config, name)
        if not values or any(not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"`{name}` must be a non-empty sequence of positive ints, got {values}")


class DCFormerSiglipVisionConfig(PretrainedConfig):
    r"""
    Configuration of [`DCFormerSiglipVisionModel`], Med3DVLM's DCFormer (`src/model/encoder/dcformer.py`,
    `decomp_small`): a stem of four decomposed convolutions, then four stages of ConvNeXt-like blocks whose
    depthwise convolution is decomposed into `k x 1 x 1`, `1 x k x 1` and `1 x 1 x k` kernels.

    The defaults are the released `MagicXin/DCFormer_SigLIP` encoder: 64 stem channels, stages of 96, 192, 384
    and 768 channels, 64x downsampling (a 128 x 256 x 256 volume gives 2 x 4 x 4 = 32 tokens of width 768).

    Args:
        num_channels (`int`, *optional*, defaults to 1): input channels.
        image_size (`tuple[int, int, int]`, *optional*, defaults to `(128, 256, 256)`): the (D, H, W) the released
            model was trained on (Med3DVLM's `input_size` (256, 256, 128) is (H, W, D)); the network itself takes
            any size.
        stem_channels (`int`, *optional*, defaults to 64): width of the stem.
        stem_kernel_sizes (`tuple[int, ...]`, *optional*, defaults to `(7, 3, 3, 3)`): kernel of each stem
            convolution; the first one strides by `stem_stride`.
        stem_stride (`int`, *optional*, defaults to 4): stride of the first stem convolution.
        stage_channels (`tuple[int, ...]`, *optional*, defaults to `(96, 192, 384, 768)`): width of each stage;
            each stage starts with a 2x max-pool and a 1 x 1 x 1 projection.
        stage_depths (`tuple[int, ...]`, *optional*, defaults to `(2, 3, 6, 2)`): blocks per stage.
        stage_kernel_sizes (`tuple[int, ...]`, *optional*, defaults to `(13, 11, 9, 7)`): the decomposed depthwise
            kernel of each stage.
        mlp_ratio (`int`, *optional*, defaults to 4): the blocks' MLP width over their channels.
        layer_scale_init_value (`float`, *optional*, defaults to 1e-6): initial per-channel scale of the MLP branch.
        batch_norm_eps (`float`, *optional*, defaults to 1e-5): BatchNorm's epsilon (PyTorch's default).
        initializer_range (`float`, *optional*, defaults to 0.02): std of the Linear weights at initialisation.
    """

    model_type = "dcformer_siglip_vision"
    base_config_key = "vision_config"

    def __init__(
        self,
        num_channels: int = 1,
        image_size: tuple[int, int, int] = (128, 256, 256),
        stem_channels: int = 64,
        stem_kernel_sizes: tuple[int, ...] = (7, 3, 3, 3),
        stem_stride: int = 4,
        stage_channels: tuple[int, ...] = (96, 192, 384, 768),
        stage_depths: tuple[int, ...] = (2, 3, 6, 2),
        stage_kernel_sizes: tuple[int, ...] = (13, 11, 9, 7),
        mlp_ratio: int = 4,
        layer_scale_init_value: float = 1e-6,
        batch_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_channels = num_channels
        self.image_size = tuple(image_size)
        self.stem_channels = stem_channels
        self.stem_kernel_sizes = tuple(stem_kernel_sizes)
        self.stem_stride = stem_stride
        self.stage_channels = tuple(stage_channels)
        self.stage_depths = tuple(stage_depths)
        self.stage_kernel_sizes = tuple(stage_kernel_sizes)
        self.mlp_ratio = mlp_ratio
        self.layer_scale_init_value = layer_scale_init_value
        self.batch_norm_eps = batch_norm_eps
        self.initializer_range = initializer_range
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the first inconsistent field."""
        for name in ("num_channels", "stem_channels", "stem_stride", "mlp_ratio"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive int, got {getattr(self, name)!r}")
        _check_positive_ints(self, ("image_size", "stem_kernel_sizes", "stage_channels", "stage_depths",
                                    "stage_kernel_sizes"))
        if len(self.image_size) != 3:
            raise ValueError(f"`image_size` must be (D, H, W), got {self.image_size}")
        stages = len(self.stage_channels)
        for name in ("stage_depths", "stage_kernel_sizes"):
            if len(getattr(self, name)) != stages:
                raise ValueError(f"`{name}` has {len(getattr(self, name))} entries, `stage_channels` {stages}")
        kernels = self.stem_kernel_sizes + self.stage_kernel_sizes
        if any(k % 2 == 0 for k in kernels):
            raise ValueError(f"kernel sizes must be odd (same padding k // 2), got {kernels}")

    @property
    def hidden_size(self) -> int:
        """Width of the pooled image feature: the last stage's channels."""
        return self.stage_channels[-1]

    @property
    def downsampling(self) -> int:
        """How many voxels per axis one last-stage token spans (64 for the release)."""
        return self.stem_stride * 2 ** len(self.stage_channels)

    @property
    def hidden_state_shapes(self) -> list[tuple[int, int]]:
        """`(N_i, C_i)` of each of `hidden_states` (the stem's, then every stage's) at `image_size`: what a
        multi-scale projector is sized by (`[..., (256, 384), (32, 768)]` for the release at 128 x 256 x 256).

        The stem's strided convolution and each stage's 3 x 3 x 3 max-pool (stride 2, padding 1) both round up."""
        grid = [-(-size // self.stem_stride) for size in self.image_size]
        shapes = [(math.prod(grid), self.stem_channels)]
        for channels in self.stage_channels:
            grid = [-(-size // 2) for size in grid]
            shapes.append((math.prod(grid), channels))
        return shapes


class DCFormerSiglipConfig(PretrainedConfig):
    r"""
    Configuration of [`DCFormerSiglipModel`]: Med3DVLM's `DEC_CLIP` with `vision_encoder="dcformer"` and
    `loss_type="sigmoid"` (the released `MagicXin/DCFormer_SigLIP`).

    Args:
        vision_config (`DCFormerSiglipVisionConfig` or `dict`, *optional*): the DCFormer; the release's by default.
        text_config (`PretrainedConfig` or `dict`, *optional*): the text encoder (a dict needs its `model_type`);
            DistilBERT's defaults by default (the release's `medicalai/ClinicalBERT` is a DistilBERT, 119547 words).
        projection_dim (`int`, *optional*, defaults to 768): width of the shared embedding space (Med3DVLM's
            `hidden_size`).
        logit_scale_init_value (`float`, *optional*, defaults to log(1/0.07)): initial log scale (`t_prime`).
        logit_bias_init_value (`float`, *optional*, defaults to 0.0): initial SigLIP bias (Med3DVLM's `bias`).
        initializer_range (`float`, *optional*, defaults to 0.02): std of the projections at initialisation.
    """

    model_type = "dcformer_siglip"
    sub_configs = {"vision_config": DCFormerSiglipVisionConfig, "text_config": PretrainedConfig}

    def __init__(
        self,
        vision_config: DCFormerSiglipVisionConfig | dict | None = None,
        text_config: PretrainedConfig | dict | None = None,
        projection_dim: int = 768,
        logit_scale_init_value: float = math.log(1 / 0.07),
        logit_bias_init_value: float = 0.0,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        if vision_config is None:
            vision_config = DCFormerSiglipVisionConfig()
        elif isinstance(vision_config, dict):
            vision_config = DCFormerSiglipVisionConfig(**vision_config)
        self.vision_config = vision_config
        self.text_config = auto_text_config(text_config, "distilbert", "'distilbert' or 'bert'")
        self.projection_dim = projection_dim
        self.logit_scale_init_value = float(logit_scale_init_value)
        self.logit_bias_init_value = float(logit_bias_init_value)
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        if not isinstance(projection_dim, int) or projection_dim < 1:
            raise ValueError(f"`projection_dim` must be a positive int, got {projection_dim!r}")

    @property
    def text_hidden_size(self) -> int:
        """Width of the text encoder's states (DistilBERT calls it `dim`)."""
        return self.text_config.hidden_size


__all__ = ["DCFormerSiglipConfig", "DCFormerSiglipVisionConfig"]
