"""Configuration of VoxLM (M3D-LaMed, Med3DVLM): any voxlm vision tower -> a projector -> any causal LM -> `[SEG]` mask
decoder."""

from __future__ import annotations

import math

from transformers import AutoConfig, PretrainedConfig

from .configuration_voxvit import VoxConfig, VoxViTConfig, as_triple, auto_text_config
from .vision_towers import vision_tower_config

PROJECTOR_TYPES = ("spp", "linear", "mixer")
VOXLM_AUTO_MAP = {
    "AutoConfig": "configuration_voxlm.VoxLMConfig",
    "AutoModel": "modeling_voxlm.VoxLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_voxlm.VoxLMForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_voxlm.VoxLMForConditionalGeneration",
}
# transformers builds this pipeline for `pipeline("image-text-to-text", model=folder, trust_remote_code=True)`; its
# file is voxlm's processing code, which `VoxLMProcessor.save_pretrained` writes beside the processor.
VOXLM_CUSTOM_PIPELINES = {
    "image-text-to-text": {
        "impl": "pipeline_voxlm.VoxLMPipeline", "pt": ["AutoModelForImageTextToText"], "type": "multimodal",
    }
}


SEG_HEAD_TYPES = ("voxseg", "segvol")
SEG_PROMPT_TOKENS = ("seg", "previous")


class VoxSegConfig(PretrainedConfig):
    r"""
    Configuration of the promptable 3D mask decoder that turns a `[SEG]` hidden state into mask logits.

    Args:
        head_type (`str`, *optional*, defaults to `"voxseg"`):
            `"voxseg"`: voxlm's light head, a two-way decoder over the VoxViT patch features the LLM already reads
            (the default for new models). `"segvol"`: M3D-LaMed's SegVol, with its own ViT over the volume
            (`image_encoder_config`), SAM's prompt encoder fed the projected `[SEG]` state and SAM's mask decoder
            (M3D: LaMed/src/model/segmentation_module/); what converted M3D-LaMed checkpoints hold.
        prompt_token (`str`, *optional*, defaults to `"seg"`):
            Whose last hidden state prompts the mask: `"seg"`, the `[SEG]` token's own; `"previous"`, the token
            before it, the state that predicted `[SEG]`, as M3D-LaMed trains and generates (lamed_llama.py,
            lamed_phi3.py), which its released weights need.
        hidden_size (`int`, *optional*, defaults to 256):
            Width of the decoder (prompt embedding, mask tokens and image embedding); for SegVol also its ViT's.
        num_hidden_layers (`int`, *optional*, defaults to 2):
            Two-way attention layers between prompt tokens and image features (SAM / SegVol decoder).
        num_attention_heads (`int`, *optional*, defaults to 8):
            Heads in each attention of the decoder.
        intermediate_size (`int`, *optional*, defaults to 1024):
            MLP width in each decoder layer.
        prompt_dropout (`float`, *optional*, defaults to 0.1):
            Dropout after the `[SEG]` projector (M3D's `seg_projector`).
        dice_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the Dice loss added to the LM loss.
        bce_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the binary cross-entropy loss added to the LM loss.
        image_encoder_config (`VoxViTConfig` or `dict`, *optional*):
            SegVol only, and required there: its ViT over the volume (MONAI `ViT` without a CLS token; M3D builds it
            ViT-B wide on the LLM encoder's `image_size` and `patch_size`). Its width is `hidden_size`.
        num_mask_tokens (`int`, *optional*, defaults to 4):
            SegVol only: SAM's mask tokens (3 multimask outputs + 1); all of them take part in the decoder's
            attention, and the first one's mask is the output.
        attention_downsample_rate (`int`, *optional*, defaults to 2):
            SegVol only: SAM's cross-attentions work at `hidden_size / attention_downsample_rate`.
    """

    model_type = "voxseg"
    sub_configs = {"image_encoder_config": VoxViTConfig}

    def __init__(
        self,
        head_type: str = "voxseg",
        prompt_token: str = "seg",
        hidden_size: int = 256,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 8,
        intermediate_size: int = 1024,
        prompt_dropout: float = 0.1,
        dice_loss_weight: float = 1.0,
        bce_loss_weight: float = 1.0,
        image_encoder_config=None,
        num_mask_tokens: int = 4,
        attention_downsample_rate: int = 2,
        **kwargs,
    ):
        self.head_type = head_type
        self.prompt_token = prompt_token
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.prompt_dropout = prompt_dropout
        self.dice_loss_weight = dice_loss_weight
        self.bce_loss_weight = bce_loss_weight
        if isinstance(image_encoder_config, dict):
            image_encoder_config = VoxViTConfig(**image_encoder_config)
        self.image_encoder_config = image_encoder_config
        self.num_mask_tokens = num_mask_tokens
        self.attention_downsample_rate = attention_downsample_rate
        super().__init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Raise `ValueError` naming the field when the decoder cannot be built as configured."""
        if self.head_type not in SEG_HEAD_TYPES:
            raise ValueError(f"seg_config: unknown `head_type` {self.head_type!r}; choose one of {SEG_HEAD_TYPES}")
        if self.prompt_token not in SEG_PROMPT_TOKENS:
            raise ValueError(
                f"seg_config: unknown `prompt_token` {self.prompt_token!r}; choose one of {SEG_PROMPT_TOKENS}"
            )
        width, heads = self.hidden_size, self.num_attention_heads
        if width % heads != 0:
            raise ValueError(
                f"seg_config: `hidden_size` ({width}) must be divisible by `num_attention_heads` ({heads})"
            )
        if width % 8 != 0:
            raise ValueError(f"seg_config: `hidden_size` ({width}) must be divisible by 8 (two 2x upsamplings)")
        if self.dice_loss_weight < 0 or self.bce_loss_weight < 0:
            raise ValueError("seg_config: `dice_loss_weight` and `bce_loss_weight` must be >= 0")
        if self.head_type != "segvol":
            return
        encoder = self.image_encoder_config
        if encoder is None:
            raise ValueError("seg_config: head_type='segvol' needs an `image_encoder_config` (SegVol's own ViT)")
        if encoder.hidden_size != width:
            raise ValueError(
                f"seg_config: SegVol's `image_encoder_config.hidden_size` ({encoder.hidden_size}) must equal "
                f"`hidden_size` ({width}): the decoder reads the ViT's tokens as they are"
            )
        if self.num_mask_tokens < 1:
            raise ValueError(f"seg_config: `num_mask_tokens` must be >= 1, got {self.num_mask_tokens}")
        rate = self.attention_downsample_rate
        if rate < 1 or width % rate != 0 or (width // rate) % heads != 0:
            raise ValueError(
                f"seg_config: `attention_downsample_rate` ({rate}) must divide `hidden_size` ({width}) into a width "
                f"that `num_attention_heads` ({heads}) divides"
            )


class VoxLMConfig(VoxConfig):
    r"""
    Configuration of [`VoxLMForConditionalGeneration`]. Defaults reproduce M3D-LaMed: a ViT-B VoxViT over
    32x256x256 volumes, the `spp` projector pooling its 8x16x16 patch grid by 2 to 256 image tokens, and a
    Llama-2-7B-sized language model.

    Args:
        vision_config (`PretrainedConfig` or `dict`, *optional*):
            The encoder: any tower of `voxlm.modeling.vision_towers.VISION_TOWERS`, named by its `model_type` (a dict
            without one is a VoxViT, as saved VoxLMs hold); defaults to `VoxViTConfig()`. `spp` and `linear` read
            VoxViT patch tokens; `mixer` reads stages of a tower that gives their shapes (`hidden_state_shapes`,
            e.g. the DCFormer).
        text_config (`PretrainedConfig` or `dict`, *optional*):
            Any causal LM config (Llama, Phi-3, Qwen2, ...); a dict needs its `model_type`. Defaults to `LlamaConfig()`.
        seg_config (`VoxSegConfig` or `dict`, *optional*):
            The `[SEG]` mask decoder; `None` builds the model without one.
        projector_type (`str`, *optional*, defaults to `"spp"`):
            `"spp"`: M3D's spatial pooling projector (avg_pool3d over the patch grid, then Linear-GELU-Linear);
            `"linear"`: one Linear per patch token, no pooling; `"mixer"`: Med3DVLM's dual-stream MLP-Mixer, which
            mixes each of the tower's `vision_feature_layers` (tokens, then channels) into `mixer_num_tokens` tokens
            of the LLM width and concatenates the streams.
        pooling_size (`int` or `tuple[int, int, int]`, *optional*, defaults to 2):
            Pooling kernel and stride over the `(D', H', W')` patch grid (`spp` only).
        vision_feature_layers (`tuple[int, ...]`, *optional*, defaults to `(-2, -1)`):
            `mixer` only: which of the tower's `hidden_states` feed the streams, one stream each (Med3DVLM's
            `vision_select_layer=-2`: the last two DCFormer stages).
        mixer_num_tokens (`tuple[tuple[int, ...], ...]`, *optional*, defaults to `((192, 128), (64, 128))`):
            `mixer` only: per stream, the token count after each mixer layer (Med3DVLM's `low_output_size` and
            `high_output_size`); every stream has the same number of layers, and the last counts add up to
            `num_image_tokens` (256). Layer `i` of `L` widens the channels to `E_llm / 2^(L - 1 - i)`.
        mixer_mlp_depth (`int`, *optional*, defaults to 2):
            `mixer` only: Linear layers (GELU between) of each token and channel MLP (Med3DVLM's `mm_mlp_depth`).
        image_token_id (`int`, *optional*):
            Id of `<im_patch>`; image features replace these tokens.
        seg_token_id (`int`, *optional*):
            Id of `[SEG]`; required with a `seg_config`.
        box_start_token_id (`int`, *optional*), box_end_token_id (`int`, *optional*):
            Ids of `<bx_start>` / `<bx_end>` (boxes as text).
        max_study_scans (`int`, *optional*, defaults to 1):
            Most scans of a study the LLM is shown at once. Each scan gives `num_image_tokens` tokens and a learned
            scan separator goes between consecutive scans, so a prompt holds at most `max_image_tokens`
            `= S * num_image_tokens + (S - 1)` image placeholders for `S = max_study_scans`. Above 1 the projector
            learns the separator; the encoder must take that many scans (`vision_config.max_scans`), and the image
            tokens must fit in the LLM's `max_position_embeddings`. 1 (the default) is M3D-LaMed: one volume.
        pooled_image_token (`bool`, *optional*, defaults to `False`):
            Also give the LLM the encoder's volume embedding (its pooling, `vision_config.pooling`) as one more image
            token, before the patch tokens, projected by the same projector. A VoxCLIP-pre-trained encoder aligned
            exactly that embedding with reports, so the LLM reads a whole-volume finding from one token instead of
            having to find it among the patch tokens. `False` is M3D-LaMed (patch tokens only).
    """

    model_type = "voxlm"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig, "seg_config": VoxSegConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        seg_config=None,
        projector_type: str = "spp",
        pooling_size=2,
        vision_feature_layers=(-2, -1),
        mixer_num_tokens=((192, 128), (64, 128)),
        mixer_mlp_depth: int = 2,
        image_token_id: int | None = None,
        seg_token_id: int | None = None,
        box_start_token_id: int | None = None,
        box_end_token_id: int | None = None,
        max_study_scans: int = 1,
        pooled_image_token: bool = False,
        **kwargs,
    ):
        self.vision_config = vision_tower_config(vision_config)
        self.text_config = auto_text_config(text_config, "llama", "'llama', 'phi3', 'qwen2'")
        if isinstance(seg_config, dict):
            seg_config = VoxSegConfig(**seg_config)
        self.seg_config = seg_config
        self.projector_type = projector_type
        self.pooling_size = list(as_triple(pooling_size, "pooling_size"))
        self.vision_feature_layers = list(vision_feature_layers)
        self.mixer_num_tokens = [list(counts) for counts in mixer_num_tokens]
        self.mixer_mlp_depth = mixer_mlp_depth
        self.image_token_id = image_token_id
        self.seg_token_id = seg_token_id
        self.box_start_token_id = box_start_token_id
        self.box_end_token_id = box_end_token_id
        self.max_study_scans = max_study_scans
        self.pooled_image_token = bool(pooled_image_token)
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        # Saved folders name their code so that `trust_remote_code=True` loads them without voxlm installed.
        kwargs.setdefault("auto_map", dict(VOXLM_AUTO_MAP))
        kwargs.setdefault("custom_pipelines", dict(VOXLM_CUSTOM_PIPELINES))
        super().__init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Raise `ValueError` naming the field when the parts cannot be assembled into a working model."""
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"Unknown `projector_type` {self.projector_type!r}; choose one of {PROJECTOR_TYPES}")
        if getattr(self.text_config, "hidden_size", None) is None:
            raise ValueError(
                f"`text_config` ({type(self.text_config).__name__}) has no `hidden_size`: it is not a causal LM "
                "config voxlm can project image features into"
            )
        self.validate_vision_tower()
        if self.projector_type == "mixer":
            self.validate_mixer()
        if self.projector_type == "spp":
            for axis, (grid, pool) in enumerate(zip(self.vision_config.grid_size, self.pooling_size)):
                if pool <= 0 or grid % pool != 0:
                    raise ValueError(
                        f"`pooling_size` {tuple(self.pooling_size)} does not divide the patch grid "
                        f"{self.vision_config.grid_size} on axis {'DHW'[axis]}"
                    )
        if self.seg_config is not None and self.seg_token_id is None:
            raise ValueError("`seg_token_id` is required when a `seg_config` builds the segmentation head")
        if self.seg_config is not None and self.seg_config.head_type == "segvol":
            encoder = self.seg_config.image_encoder_config
            if list(encoder.image_size) != list(self.vision_config.image_size):
                raise ValueError(
                    f"seg_config: SegVol's `image_encoder_config.image_size` {tuple(encoder.image_size)} must equal "
                    f"`vision_config.image_size` {tuple(self.vision_config.image_size)}: both read the same volume"
                )
        self.validate_study()

    @property
    def reads_patch_tokens(self) -> bool:
        """Whether the tower is a VoxViT, whose CLS-less patch tokens `spp`, `linear` and the `voxseg` head read."""
        return self.vision_config.model_type == VoxViTConfig.model_type

    def validate_vision_tower(self):
        """Raise `ValueError` naming the field when a part needs VoxViT patch tokens and the tower gives none."""
        tower = self.vision_config.model_type
        if self.reads_patch_tokens:
            return
        if self.projector_type != "mixer":
            raise ValueError(f"`projector_type` {self.projector_type!r} reads VoxViT patch tokens; the "
                             f"{tower!r} tower (`vision_config.model_type`) needs projector_type='mixer'")
        if self.pooled_image_token:
            raise ValueError(f"`pooled_image_token` projects a VoxViT volume embedding; the {tower!r} tower has none")
        if self.seg_config is not None and self.seg_config.head_type == "voxseg":
            raise ValueError(f"seg_config: head_type='voxseg' decodes VoxViT patch tokens; with the {tower!r} tower "
                             "use head_type='segvol' (its own ViT over the volume) or no seg_config")

    def validate_mixer(self):
        """Raise `ValueError` naming the field when the mixer's streams do not fit the tower or the LLM width."""
        shapes = getattr(self.vision_config, "hidden_state_shapes", None)
        if shapes is None:
            raise ValueError(f"projector_type='mixer' needs the stage shapes of its tower; the "
                             f"{self.vision_config.model_type!r} tower (`vision_config.model_type`) gives none")
        layers, counts = self.vision_feature_layers, self.mixer_num_tokens
        if any(not -len(shapes) <= layer < len(shapes) for layer in layers):
            raise ValueError(f"`vision_feature_layers` {layers} index the tower's {len(shapes)} hidden states")
        depths = {len(stream) for stream in counts}
        if len(counts) != len(layers) or len(depths) != 1 or 0 in depths:
            raise ValueError(f"`mixer_num_tokens` {counts} needs one non-empty list per `vision_feature_layers` entry "
                             f"({len(layers)}), all of one length")
        if any(count < 1 for stream in counts for count in stream) or self.mixer_mlp_depth < 1:
            raise ValueError("`mixer_num_tokens` and `mixer_mlp_depth` must be positive")
        divisor = 2 ** (depths.pop() - 1)
        if self.text_config.hidden_size % divisor != 0:
            raise ValueError(f"the mixer halves the LLM width per earlier layer: `text_config.hidden_size` "
                             f"({self.text_config.hidden_size}) must be divisible by {divisor}")

    @property
    def mixer_stream_shapes(self) -> list[tuple[int, int]]:
        """`(N_i, C_i)` of the tower's hidden states that feed the mixer's streams (`vision_feature_layers`)."""
        shapes = self.vision_config.hidden_state_shapes
        return [tuple(shapes[layer]) for layer in self.vision_feature_layers]

    def validate_study(self):
        """Raise `ValueError` naming `max_study_scans` when the encoder or the LLM context cannot take that many."""
        scans = self.max_study_scans
        if not isinstance(scans, int) or isinstance(scans, bool) or scans < 1:
            raise ValueError(f"`max_study_scans` must be an int >= 1, got {scans!r}")
        if scans > getattr(self.vision_config, "max_scans", 1):
            raise ValueError(
                f"`max_study_scans` ({scans}) exceeds the scans the encoder takes (`vision_config.max_scans` = "
                f"{getattr(self.vision_config, 'max_scans', 1)})"
            )
        context = getattr(self.text_config, "max_position_embeddings", None)
        if scans > 1 and context is not None and self.max_image_tokens >= context:
            raise ValueError(
                f"`max_study_scans` ({scans}) puts up to {self.max_image_tokens} image tokens in a prompt "
                f"({scans} x {self.num_image_tokens} + {scans - 1} separators), which leaves no room for text in the "
                f"LLM's {context} positions (`text_config.max_position_embeddings`)"
            )

    @property
    def use_cache(self) -> bool:
        """The LLM's `use_cache`: a key of `text_config`, set from here too, so that `from_pretrained(folder,
        use_cache=False)` reaches the LLM as it does on a plain causal LM."""
        return getattr(self.text_config, "use_cache", True)

    @use_cache.setter
    def use_cache(self, value: bool):
        self.text_config.use_cache = value

    @property
    def image_grid_size(self) -> tuple[int, int, int]:
        """The grid of image tokens the LLM sees: the patch grid, pooled for `spp` (VoxViT towers only; the mixer's
        tokens form no grid)."""
        grid = self.vision_config.grid_size
        if self.projector_type == "spp":
            return tuple(g // p for g, p in zip(grid, self.pooling_size))
        return grid

    @property
    def num_image_tokens(self) -> int:
        """How many `<im_patch>` tokens a prompt holds per volume (256 for the defaults, one more with
        `pooled_image_token`)."""
        if self.projector_type == "mixer":
            return sum(stream[-1] for stream in self.mixer_num_tokens)
        return math.prod(self.image_grid_size) + int(self.pooled_image_token)

    def num_study_image_tokens(self, num_scans: int) -> int:
        """`<im_patch>` placeholders of a study prompt: `num_image_tokens` per scan plus one separator between scans."""
        return num_scans * self.num_image_tokens + num_scans - 1

    @property
    def max_image_tokens(self) -> int:
        """The most `<im_patch>` placeholders a prompt holds: a study of `max_study_scans` scans."""
        return self.num_study_image_tokens(self.max_study_scans)
