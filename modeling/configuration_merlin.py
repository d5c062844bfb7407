"""Configuration of Merlin (StanfordMIMI/Merlin): an I3D-inflated 3-D ResNet and Clinical-Longformer, trained
contrastively on CT volume-report pairs with an EHR phenotype head."""

from __future__ import annotations

from transformers import AutoConfig

from .configuration_voxvit import VoxConfig, auto_text_config

MERLIN_AUTO_MAP = {"AutoConfig": "configuration_merlin.MerlinConfig", "AutoModel": "modeling_merlin.MerlinModel"}
MERLIN_VISION_AUTO_MAP = {"AutoConfig": "configuration_merlin.MerlinVisionConfig",
                          "AutoModel": "modeling_merlin.MerlinVisionModel"}


def as_int_tuple(value, field: str, length: int | None = None) -> tuple[int, ...]:
    """`value` as a tuple of positive ints; raises `ValueError` naming `field` otherwise."""
    values = tuple(int(v) for v in value)
    if (length is not None and len(values) != length) or not values or min(values) < 1:
        size = f"{length} " if length is not None else ""
        raise ValueError(f"`{field}` must be {size}positive integers, got {value!r}")
    return values


class MerlinVisionConfig(VoxConfig):
    r"""
    Configuration of [`MerlinVisionModel`], Merlin's image tower: torchvision's ResNet-152 inflated to 3-D as
    I3D does (merlin/models/i3res.py, inflate.py), with a 1x1x1 convolution head over the pooled feature that
    predicts EHR phenotypes. The defaults reproduce the released model.

    Inflation fixes the 3-D shapes: the stem is a `(3, 7, 7)` convolution with stride `(1, 2, 2)`, the max pool
    `3 x 3 x 3` with stride 2, every bottleneck's middle convolution `3 x 3 x 3` with the stage's stride on all three
    axes, and 1x1 convolutions stay `1 x 1 x 1`.

    Args:
        num_channels (`int`, *optional*, defaults to 1):
            Channels of `pixel_values` (a CT volume).
        num_channel_repeats (`int`, *optional*, defaults to 3):
            How often the input channels are repeated before the stem: the stem was inflated from an RGB ImageNet
            ResNet and Merlin feeds it the volume three times (`torch.cat((x, x, x), dim=1)`).
        stem_width (`int`, *optional*, defaults to 64):
            Output channels of the stem convolution.
        depths (`tuple[int, ...]`, *optional*, defaults to `(3, 8, 36, 3)`):
            Bottleneck blocks per stage (ResNet-152's).
        widths (`tuple[int, ...]`, *optional*, defaults to `(64, 128, 256, 512)`):
            Bottleneck (middle convolution) width per stage; a stage outputs `expansion` times as many channels.
        strides (`tuple[int, ...]`, *optional*, defaults to `(1, 2, 2, 2)`):
            Stride of each stage's first block (on every axis).
        expansion (`int`, *optional*, defaults to 4):
            Output channels of a bottleneck per middle channel (torchvision's `Bottleneck.expansion`).
        num_phenotypes (`int`, *optional*, defaults to 1692):
            Outputs of the phenotype head (Merlin's 1692 EHR phenotypes, documentation/phenotypes.csv).
        batch_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the batch norms (torchvision's).
    """

    model_type = "merlin_vision"

    def __init__(
        self,
        num_channels: int = 1,
        num_channel_repeats: int = 3,
        stem_width: int = 64,
        depths=(3, 8, 36, 3),
        widths=(64, 128, 256, 512),
        strides=(1, 2, 2, 2),
        expansion: int = 4,
        num_phenotypes: int = 1692,
        batch_norm_eps: float = 1e-5,
        **kwargs,
    ):
        self.num_channels = num_channels
        self.num_channel_repeats = num_channel_repeats
        self.stem_width = stem_width
        self.depths = list(depths)
        self.widths = list(widths)
        self.strides = list(strides)
        self.expansion = expansion
        self.num_phenotypes = num_phenotypes
        self.batch_norm_eps = batch_norm_eps
        kwargs.setdefault("auto_map", dict(MERLIN_VISION_AUTO_MAP))
        super().__init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Raise `ValueError` naming the field when the settings do not describe a 3-D bottleneck ResNet."""
        for field in ("num_channels", "num_channel_repeats", "stem_width", "expansion", "num_phenotypes"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"`{field}` must be a positive integer, got {getattr(self, field)!r}")
        depths = as_int_tuple(self.depths, "depths")
        for field in ("widths", "strides"):
            as_int_tuple(getattr(self, field), field, len(depths))
        if self.batch_norm_eps <= 0:
            raise ValueError(f"`batch_norm_eps` must be positive, got {self.batch_norm_eps}")

    @property
    def hidden_size(self) -> int:
        """Width of the pooled image feature: the last stage's output channels (2048 for ResNet-152)."""
        return self.widths[-1] * self.expansion


class MerlinConfig(VoxConfig):
    r"""
    Configuration of [`MerlinModel`]: [`MerlinVisionModel`], a Longformer text encoder (Clinical-Longformer) and
    their contrastive projections.

    Args:
        vision_config (`MerlinVisionConfig` or `dict`, *optional*): the image tower.
        text_config (`PretrainedConfig` or `dict`, *optional*): the text encoder (needs `model_type`); defaults to
            a Longformer with transformers' defaults (a conversion reads Clinical-Longformer's own `config.json`).
        projection_dim (`int`, *optional*, defaults to 512): width of the shared embedding space (Merlin's
            `contrastive_head` and `linear_layer` outputs).
        logit_scale_init_value (`float`, *optional*, defaults to 1.0): initial `logit_scale` (Merlin's
            `init_logit_scale`); the scale is `exp(logit_scale)`.
    """

    model_type = "merlin"
    sub_configs = {"vision_config": MerlinVisionConfig, "text_config": AutoConfig}

    def __init__(self, vision_config=None, text_config=None, projection_dim: int = 512,
                 logit_scale_init_value: float = 1.0, **kwargs):
        if isinstance(vision_config, dict):
            vision_config = MerlinVisionConfig(**vision_config)
        self.vision_config = vision_config if vision_config is not None else MerlinVisionConfig()
        self.text_config = auto_text_config(text_config, "longformer", "'longformer'")
        self.projection_dim = projection_dim
        self.logit_scale_init_value = logit_scale_init_value
        kwargs.setdefault("auto_map", dict(MERLIN_AUTO_MAP))
        super().__init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Raise `ValueError` naming the field when the towers cannot be built."""
        if not isinstance(self.vision_config, MerlinVisionConfig):
            raise ValueError(f"`vision_config` must be a MerlinVisionConfig, got {type(self.vision_config).__name__}")
        if getattr(self.text_config, "hidden_size", None) is None:
            raise ValueError("`text_config` has no `hidden_size`: it is not a text encoder config")
        if self.projection_dim < 1:
            raise ValueError(f"`projection_dim` must be positive, got {self.projection_dim}")
