"""Configuration of COLIPRI (microsoft/colipri): a Primus 3D ViT with attention pooling and a CXR-BERT, both pooled
into one embedding space."""

from __future__ import annotations

from transformers import AutoConfig

from .configuration_voxvit import VoxConfig, auto_text_config

COLIPRI_AUTO_MAP = {"AutoConfig": "configuration_colipri.ColipriConfig", "AutoModel": "modeling_colipri.ColipriModel"}
COLIPRI_VISION_AUTO_MAP = {"AutoConfig": "configuration_colipri.ColipriVisionConfig",
                           "AutoModel": "modeling_colipri.ColipriVisionModel"}


def _triple(value, field: str) -> list[int]:
    """An int or three ints as a list of three positive ints; `ValueError` naming `field` otherwise."""
    values = [int(value)] * 3 if isinstance(value, int) else [int(v) for v in value]
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"`{field}` must be a positive int or three of them, got {value!r}")
    return values


class ColipriVisionConfig(VoxConfig):
    r"""
    Configuration of [`ColipriVisionModel`]: COLIPRI's image encoder, a Primus backbone (a strided-conv patch
    embedding and EVA-02 blocks with 3-D rotary position embedding, no CLS token, no absolute position embedding),
    a 1x1x1 conv projector and attention pooling whose query is the mean token. The defaults are the released ones
    (colipri 0.1.3 `configs/`: `input_size: 192`, `image_embed_dim: 864`, `projection_dim: 768`, Primus-M).

    Args:
        image_size (`int` or `tuple[int, int, int]`, *optional*, defaults to 192): the volume size the released
            rotary table was built for (`input_size`, 192^3 voxels at 2 mm); other sizes rescale the rotary grid to
            it (EVA's scheme).
        patch_size (`int` or `tuple[int, int, int]`, *optional*, defaults to 8): patch size (`patch_embed_size`).
        num_channels (`int`, *optional*, defaults to 1): input channels (`input_channels`).
        embed_dim (`int`, *optional*, defaults to 864): the backbone's token width (`image_embed_dim`).
        num_hidden_layers (`int`, *optional*, defaults to 16): EVA blocks (`eva_depth`).
        num_attention_heads (`int`, *optional*, defaults to 12): heads per block (`eva_numheads`); the head width
            must be a multiple of 6 (a third of it rotates with each spatial axis).
        intermediate_size (`int`, *optional*, defaults to 2304): SwiGLU width (`int(embed_dim * 8 / 3)`, Primus'
            `mlp_ratio=4 * 2 / 3`).
        layer_scale_init_value (`float`, *optional*, defaults to 0.1): layer scale init (`init_values`).
        layer_norm_eps (`float`, *optional*, defaults to 1e-5): every LayerNorm's epsilon (torch's default).
        rope_theta (`float`, *optional*, defaults to 10000.0): rotary temperature (timm `RotaryEmbeddingCat`).
        hidden_size (`int`, *optional*, defaults to 768): width of the projected tokens and the pooled feature
            (`projection_dim`).
        pooler_num_heads (`int`, *optional*, defaults to 12): heads of the attention pooling.
    """

    model_type = "colipri_vision"

    def __init__(
        self,
        image_size=192,
        patch_size=8,
        num_channels: int = 1,
        embed_dim: int = 864,
        num_hidden_layers: int = 16,
        num_attention_heads: int = 12,
        intermediate_size: int = 2304,
        layer_scale_init_value: float = 0.1,
        layer_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        hidden_size: int = 768,
        pooler_num_heads: int = 12,
        **kwargs,
    ):
        self.image_size = _triple(image_size, "image_size")
        self.patch_size = _triple(patch_size, "patch_size")
        self.num_channels = num_channels
        self.embed_dim = embed_dim
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_scale_init_value = layer_scale_init_value
        self.layer_norm_eps = layer_norm_eps
        self.rope_theta = rope_theta
        self.hidden_size = hidden_size
        self.pooler_num_heads = pooler_num_heads
        kwargs.setdefault("auto_map", dict(COLIPRI_VISION_AUTO_MAP))
        super().__init__(**kwargs)
        self.validate_architecture()

    @property
    def grid_size(self) -> list[int]:
        """Patches per axis at `image_size` `(D', H', W')`: the rotary embedding's reference grid."""
        return [size // patch for size, patch in zip(self.image_size, self.patch_size)]

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_attention_heads

    def validate_architecture(self):
        """Raise `ValueError` naming the field when the encoder cannot be built."""
        for field in ("num_channels", "embed_dim", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                      "hidden_size", "pooler_num_heads"):
            if getattr(self, field) <= 0:
                raise ValueError(f"`{field}` must be positive, got {getattr(self, field)}")
        if any(size % patch for size, patch in zip(self.image_size, self.patch_size)):
            raise ValueError(f"`patch_size` {self.patch_size} must divide `image_size` {self.image_size}")
        if self.embed_dim % self.num_attention_heads or self.head_dim % 6:
            raise ValueError(f"`embed_dim` {self.embed_dim} / `num_attention_heads` {self.num_attention_heads} must "
                             "give a head width that is a multiple of 6 (the 3-D rotary embedding's layout)")
        if self.hidden_size % self.pooler_num_heads:
            raise ValueError(f"`pooler_num_heads` {self.pooler_num_heads} must divide `hidden_size` "
                             f"{self.hidden_size}")


class ColipriConfig(VoxConfig):
    r"""
    Configuration of [`ColipriModel`]: the image encoder and a BERT (CXR-BERT-specialized in the release) whose
    token states are attention-pooled (query = the masked mean token) into the image's embedding space. COLIPRI has
    no text projection: the text pooler works at the BERT's width, which must equal the image embedding's.

    Args:
        vision_config (`ColipriVisionConfig` or `dict`, *optional*): the image encoder.
        text_config (`PretrainedConfig` or `dict`, *optional*): the BERT (needs `model_type`); defaults to
            BERT-base, CXR-BERT's sizes.
        text_pooler_num_heads (`int`, *optional*, defaults to 12): heads of the text attention pooling.
        logit_scale_init_value (`float`, *optional*, defaults to 0.0): log of the logit scale. COLIPRI's `classify`
            divides the cosines by `softmax_temperature` (an int64 buffer, 1 in the release), so the scale is
            `1 / softmax_temperature` and its log is 0.
    """

    model_type = "colipri"
    sub_configs = {"vision_config": ColipriVisionConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        text_pooler_num_heads: int = 12,
        logit_scale_init_value: float = 0.0,
        **kwargs,
    ):
        if isinstance(vision_config, dict):
            vision_config = ColipriVisionConfig(**vision_config)
        self.vision_config = vision_config if vision_config is not None else ColipriVisionConfig()
        self.text_config = auto_text_config(text_config, "bert", "'bert'")
        self.text_pooler_num_heads = text_pooler_num_heads
        self.logit_scale_init_value = logit_scale_init_value
        kwargs.setdefault("auto_map", dict(COLIPRI_AUTO_MAP))
        super().__init__(**kwargs)
        self.validate_architecture()

    @property
    def projection_dim(self) -> int:
        """Width of the shared embedding space (the pooled image feature's and the BERT's)."""
        return self.vision_config.hidden_size

    def validate_architecture(self):
        """Raise `ValueError` naming the field when the two towers do not share one embedding space."""
        self.vision_config.validate_architecture()
        text_width = getattr(self.text_config, "hidden_size", None)
        if text_width is None:
            raise ValueError("`text_config` has no `hidden_size`: it is not a text encoder config")
        if text_width != self.vision_config.hidden_size:
            raise ValueError(f"`text_config.hidden_size` {text_width} must equal `vision_config.hidden_size` "
                             f"{self.vision_config.hidden_size}: COLIPRI pools text without a projection")
        if self.text_pooler_num_heads <= 0 or text_width % self.text_pooler_num_heads:
            raise ValueError(f"`text_pooler_num_heads` {self.text_pooler_num_heads} must divide the text width "
                             f"{text_width}")
