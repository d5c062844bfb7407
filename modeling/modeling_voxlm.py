"""VoxLM: M3D-LaMed (and Med3DVLM) as a transformers model, composed of a vision tower, a projector, any causal LM and
a `[SEG]` mask decoder.

    volume (B, 1, D, H, W)
      -> VoxViT                                   patch features (B, N, E_vis), CLS dropped
      -> SpatialPoolingProjector (spp)           avg_pool3d over the patch grid, Linear-GELU-Linear -> (B, N_img, E_llm)
      -> replaces the `<im_patch>` tokens         found by id (never by position), counts checked
         (a study (B, S, 1, D, H, W) + scan_mask: VoxViT study mode, each scan projected alone -> (B, S, N_img, E_llm);
          the real scans' tokens in order, a learned separator between scans -> S_real N_img + S_real - 1 tokens)
      (or any tower of vision_towers.VISION_TOWERS, e.g. Med3DVLM's DCFormer, and the MixerProjector: two of its
       stages (B, N_s, C_s), each MLP-Mixed into tokens of the LLM width, concatenated -> (B, N_img, E_llm))
      -> causal LM (built with from_config)       logits (B, L, V); the LM loss on answer tokens
      -> hidden state at each `[SEG]` token       (or at the token before it: `seg_config.prompt_token`), mean if
                                                  several -> (B_seg, E_llm)
      -> VoxSegHead                               prompt projector + two-way attention over the patch features
         (or SegVolHead, M3D's: its own ViT       -> mask logits (B_seg, 1, D, H, W) at input resolution; Dice + BCE
          over the volume, SAM's decoder)

Attention implementations: `config._attn_implementation` drives the seg head's attention, `vision_config`'s the
VoxViT's and `text_config`'s the LLM's; a string `attn_implementation` sets all three, a dict per sub-config (e.g.
`{"text_config": "flash_attention_2", "vision_config": "sdpa", "": "sdpa"}`) gives the LLM a kernel the vision side
does not have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_voxlm import VoxLMConfig
from .losses import IGNORE_INDEX, bce_loss, causal_lm_loss, dice_loss
from .modeling_segvol import SegVolHead, SegVolMaskDecoder, SegVolPromptEncoder
from .modeling_voxvit import (
    VoxViTPatchEmbedding,
    eager_attention_forward,
    pool_scan_tokens,
    write_model_card_if_missing,
)
from .vision_towers import build_vision_tower, vision_tower_class, vision_tower_config


@dataclass
class VoxLMCausalLMOutputWithPast(CausalLMOutputWithPast):
    """Output of [`VoxLMForConditionalGeneration.forward`]: the causal LM's output plus the image and mask fields.

    The LM's fields are inherited from transformers' `CausalLMOutputWithPast`, so the KV cache carries the name the
    installed transformers gives it (`cache` from 5.24 on, `past_key_values` before) and `generate` finds it.

    Args:
        loss (`torch.Tensor`, *optional*): `lm_loss` plus the weighted segmentation losses, when `labels` are given.
        logits (`torch.Tensor` of shape `(B, L, V)`): LM logits.
        cache / past_key_values (`Cache`, *optional*): the LM's KV cache.
        hidden_states (`tuple[torch.Tensor]`, *optional*), attentions (`tuple[torch.Tensor]`, *optional*): the LM's.
        lm_loss (`torch.Tensor`, *optional*): next-token cross-entropy on the answer tokens.
        seg_dice_loss (`torch.Tensor`, *optional*), seg_bce_loss (`torch.Tensor`, *optional*): the unweighted
            segmentation losses, when `seg_masks` are given and some sample holds `[SEG]`.
        image_hidden_states (`torch.Tensor` of shape `(B, N_img, E_llm)`, *optional*): projected image features.
        seg_logits (`torch.Tensor` of shape `(B_seg, 1, D, H, W)`, *optional*): mask logits of the samples in
            `seg_sample_indices`.
        seg_sample_indices (`torch.Tensor` of shape `(B_seg,)`, *optional*): which batch rows `seg_logits` belong to.
    """

    lm_loss: torch.FloatTensor | None = None
    seg_dice_loss: torch.FloatTensor | None = None
    seg_bce_loss: torch.FloatTensor | None = None
    image_hidden_states: torch.FloatTensor | None = None
    seg_logits: torch.FloatTensor | None = None
    seg_sample_indices: torch.LongTensor | None = None


@dataclass
class VoxLMGenerateOutput(ModelOutput):
    """Output of `generate(..., return_masks=True)`.

    Args:
        sequences (`torch.LongTensor` of shape `(B, L_prompt + L_new)`): prompt and generated ids.
        masks (`list`): per sample, mask logits `(1, D, H, W)` when the generated text holds `[SEG]`, else `None`.
    """

    sequences: torch.LongTensor | None = None
    masks: list | None = None


class VoxLMProjector(nn.Module):
    """What both projectors share: the learned scan separator of study prompts (`config.max_study_scans > 1`).

    It lives in the projector so that whatever trains the projector (the align stage, LoRA's `modules_to_save`) trains
    it too: like the image tokens, it is an embedding the LLM has never seen.
    """

    def __init__(self, config: VoxLMConfig):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.scan_separator = nn.Parameter(torch.zeros(hidden_size)) if config.max_study_scans > 1 else None


class SpatialPoolingProjector(VoxLMProjector):
    """M3D's `spp` projector: average-pool the patch grid, then Linear-GELU-Linear into the LLM width.

    Note: the paper calls this a "3D spatial pooling perceiver"; it has no learned queries
    (M3D: LaMed/src/model/multimodal_projector/spatial_pooling_projector.py), so it is named for what it does.
    """

    def __init__(self, config: VoxLMConfig):
        super().__init__(config)
        self.grid_size = config.vision_config.grid_size
        self.pooling_size = tuple(config.pooling_size)
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        """`(B, N, E_vis)` patch features -> `(B, N / prod(pooling_size), E_llm)` image tokens."""
        d, h, w = self.grid_size
        grid = rearrange(patch_features, "b (d h w) e -> b e d h w", d=d, h=h, w=w)  # (B, N, E) -> (B, E, D', H', W')
        # Pooled in float32: CPU kernels of avg_pool3d have no bf16 / fp16 version, and the mean is more exact so.
        pooled = F.avg_pool3d(grid.float(), kernel_size=self.pooling_size, stride=self.pooling_size).to(grid.dtype)
        return self.project_tokens(rearrange(pooled, "b e d h w -> b (d h w) e"))  # (B, E, d, h, w) -> (B, N_img, E)

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(B, T, E_vis)` -> `(B, T, E_llm)`, token by token (also the volume embedding's token)."""
        return self.linear_2(F.gelu(self.linear_1(tokens)))


class LinearProjector(VoxLMProjector):
    """M3D's `linear` projector: one Linear per patch token, no pooling (N_img = N)."""

    def __init__(self, config: VoxLMConfig):
        super().__init__(config)
        self.linear = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        """`(B, N, E_vis)` -> `(B, N, E_llm)`."""
        return self.project_tokens(patch_features)

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(B, T, E_vis)` -> `(B, T, E_llm)`, token by token (also the volume embedding's token)."""
        return self.linear(tokens)


def mixer_mlp(in_features: int, out_features: int, depth: int) -> nn.Sequential:
    """Linear, then `depth - 1` x (GELU, Linear), all `out_features` wide after the first (Med3DVLM's
    `MultiModalProjector`, src/model/projector/mlp.py)."""
    layers = [nn.Linear(in_features, out_features)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_features, out_features)]
    return nn.Sequential(*layers)


class MixerLayer(nn.Module):
    """One MLP-Mixer layer of a stream: LayerNorm, an MLP across the tokens (`N_in -> N_out`), LayerNorm, an MLP
    across the channels (`C_in -> C_out`).

    Note: as Med3DVLM's `MixerLayer` (src/model/projector/mlp.py), there are no residual connections (the token and
    channel counts change), and both norms run over the input channels: the second norm comes before the channel MLP.

    Args:
        in_shape (`tuple[int, int]`): `(N_in, C_in)`.
        out_shape (`tuple[int, int]`): `(N_out, C_out)`.
        mlp_depth (`int`): Linear layers of each MLP.
    """

    def __init__(self, in_shape: tuple[int, int], out_shape: tuple[int, int], mlp_depth: int):
        super().__init__()
        self.token_norm = nn.LayerNorm(in_shape[1])
        self.token_mlp = mixer_mlp(in_shape[0], out_shape[0], mlp_depth)
        self.channel_norm = nn.LayerNorm(in_shape[1])
        self.channel_mlp = mixer_mlp(in_shape[1], out_shape[1], mlp_depth)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(B, N_in, C_in)` -> `(B, N_out, C_out)`."""
        tokens = rearrange(self.token_norm(hidden_states), "b n c -> b c n")  # (B, N_in, C_in) -> (B, C_in, N_in)
        mixed = rearrange(self.token_mlp(tokens), "b c n -> b n c")  # (B, C_in, N_out) -> (B, N_out, C_in)
        return self.channel_mlp(self.channel_norm(mixed))  # (B, N_out, C_out)


class MixerProjector(VoxLMProjector):
    """Med3DVLM's dual-stream MLP-Mixer projector (`MixerLowHighHybridMLP`, src/model/projector/mlp.py): each stream
    mixes one of the tower's stages through `L` [`MixerLayer`]s into `mixer_num_tokens[s][-1]` tokens of the LLM width,
    and the streams' tokens are concatenated.

        stage -2 (B, 256, 384) -> (B, 192, E/2) -> (B, 128, E)  \
                                                                  cat -> (B, 256, E)
        stage -1 (B, 32, 768)  -> (B, 64, E/2)  -> (B, 128, E)  /

    Layer `i` widens the channels to `E / 2^(L - 1 - i)` (the numbers above: Med3DVLM's defaults).
    """

    def __init__(self, config: VoxLMConfig):
        super().__init__(config)
        width, depth = config.text_config.hidden_size, len(config.mixer_num_tokens[0])
        self.streams = nn.ModuleList()
        for in_shape, counts in zip(config.mixer_stream_shapes, config.mixer_num_tokens):
            shapes = [tuple(in_shape)] + [(count, width // 2 ** (depth - 1 - i)) for i, count in enumerate(counts)]
            self.streams.append(nn.Sequential(*[
                MixerLayer(shapes[i], shapes[i + 1], config.mixer_mlp_depth) for i in range(depth)
            ]))

    def forward(self, stage_features: list[torch.Tensor]) -> torch.Tensor:
        """One `(B, N_s, C_s)` tensor per stream -> `(B, sum_s mixer_num_tokens[s][-1], E_llm)`."""
        return torch.cat([stream(features) for stream, features in zip(self.streams, stage_features)], dim=1)


class VoxSegAttention(nn.Module):
    """Multi-head attention with queries, keys and values given apart (SAM's two-way decoder attends tokens to the
    image and back), computed by the implementation `config._attn_implementation` names.

    Note: the parameters keep the names and layout of the `nn.MultiheadAttention` the head was built with before
    (`in_proj_weight (3 E, E)` stacking the query, key and value maps, `in_proj_bias`, `out_proj`), so saved VoxLM
    checkpoints load unchanged.

    Args:
        config (`VoxLMConfig`): the model config, read for `_attn_implementation` at each call.
        hidden_size (`int`): width `E`.
        num_heads (`int`): attention heads (divide `hidden_size`).
    """

    def __init__(self, config: VoxLMConfig, hidden_size: int, num_heads: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.scaling = (hidden_size // num_heads) ** -0.5
        self.is_causal = False  # read by transformers' SDPA and flash functions, which default to causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * hidden_size))
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query `(B, T, E)`, key and value `(B, M, E)` -> `(B, T, E)`."""
        projections = zip((query, key, value), self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3))
        # 3 x (B, T or M, E) -> (B, heads, T or M, d)
        query, key, value = (
            rearrange(F.linear(tokens, weight, bias), "b n (h d) -> b h n d", h=self.num_heads)
            for tokens, weight, bias in projections
        )
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, _ = attention_interface(self, query, key, value, None, scaling=self.scaling)
        return self.out_proj(rearrange(output, "b t h d -> b t (h d)"))  # (B, T, heads, d) -> (B, T, E)


class VoxSegTwoWayLayer(nn.Module):
    """One SAM / SegVol decoder layer: tokens attend to themselves and to the image, then the image to the tokens."""

    def __init__(self, config: VoxLMConfig, hidden_size: int, num_heads: int, intermediate_size: int):
        super().__init__()
        self.self_attn = VoxSegAttention(config, hidden_size, num_heads)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.token_to_image = VoxSegAttention(config, hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, intermediate_size), nn.GELU(), nn.Linear(intermediate_size, hidden_size)
        )
        self.norm3 = nn.LayerNorm(hidden_size)
        self.image_to_token = VoxSegAttention(config, hidden_size, num_heads)
        self.norm4 = nn.LayerNorm(hidden_size)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor, image_pos: torch.Tensor):
        """tokens `(B, T, S)`, image `(B, N, S)`, image_pos `(1, N, S)` -> updated tokens and image."""
        tokens = self.norm1(tokens + self.self_attn(tokens, tokens, tokens))
        attended = self.token_to_image(tokens, image + image_pos, image)
        tokens = self.norm2(tokens + attended)
        tokens = self.norm3(tokens + self.mlp(tokens))
        attended = self.image_to_token(image + image_pos, tokens, tokens)
        image = self.norm4(image + attended)
        return tokens, image


class VoxSegHead(nn.Module):
    """Promptable 3D mask decoder driven by the LLM's `[SEG]` hidden state.

    `[SEG]` state -> Linear-ReLU-Linear-Dropout (M3D's `seg_projector`) -> prompt token; with a learned mask token it
    runs two-way attention over the VoxViT patch features (SegVol-style), the image embedding is upsampled 4x with
    transposed convolutions, a hypernetwork turns the mask token into per-channel weights, and the low-resolution
    mask is interpolated to the input size.
    """

    input_name = "patch_features"  # what it reads besides the prompt state (SegVolHead reads pixel_values)

    def __init__(self, config: VoxLMConfig):
        super().__init__()
        seg, vision = config.seg_config, config.vision_config
        width = seg.hidden_size
        self.grid_size = vision.grid_size
        self.image_size = tuple(vision.image_size)
        self.prompt_projector = nn.Sequential(
            nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size),
            nn.ReLU(),
            nn.Linear(config.text_config.hidden_size, width),
            nn.Dropout(seg.prompt_dropout),
        )
        self.image_projector = nn.Linear(vision.hidden_size, width)
        self.image_position_embeddings = nn.Parameter(torch.zeros(1, vision.num_patches, width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.layers = nn.ModuleList(
            [
                VoxSegTwoWayLayer(config, width, seg.num_attention_heads, seg.intermediate_size)
                for _ in range(seg.num_hidden_layers)
            ]
        )
        self.final_token_to_image = VoxSegAttention(config, width, seg.num_attention_heads)
        self.final_norm = nn.LayerNorm(width)
        self.upscale = nn.Sequential(
            nn.ConvTranspose3d(width, width // 4, kernel_size=2, stride=2),
            nn.GELU(),
            nn.ConvTranspose3d(width // 4, width // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.hypernetwork = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width // 8))

    @staticmethod
    def no_weight_decay() -> set[str]:
        """The learned positions and the mask token (see `VoxLMForConditionalGeneration.no_weight_decay`)."""
        return {"image_position_embeddings", "mask_token"}

    def forward(self, seg_hidden_states: torch.Tensor, patch_features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            seg_hidden_states (`torch.Tensor` of shape `(B, E_llm)`): the `[SEG]` hidden state of each sample.
            patch_features (`torch.Tensor` of shape `(B, N, E_vis)`): VoxViT patch tokens of the same samples.

        Returns:
            `torch.Tensor` of shape `(B, 1, D, H, W)`: mask logits at the encoder's input size.
        """
        prompt = self.prompt_projector(seg_hidden_states)  # (B, S)
        image = self.image_projector(patch_features)  # (B, N, S)
        tokens = torch.cat([self.mask_token.expand(prompt.shape[0], -1, -1), prompt[:, None]], dim=1)  # (B, 2, S)
        for layer in self.layers:
            tokens, image = layer(tokens, image, self.image_position_embeddings)
        attended = self.final_token_to_image(tokens, image + self.image_position_embeddings, image)
        tokens = self.final_norm(tokens + attended)
        d, h, w = self.grid_size
        grid = rearrange(image, "b (d h w) s -> b s d h w", d=d, h=h, w=w)  # (B, N, S) -> (B, S, D', H', W')
        upscaled = self.upscale(grid)  # (B, S / 8, 4 D', 4 H', 4 W')
        mask_weights = self.hypernetwork(tokens[:, 0])  # (B, S / 8)
        low_res = torch.einsum("bc,bcdhw->bdhw", mask_weights, upscaled)[:, None]  # (B, 1, 4 D', 4 H', 4 W')
        return F.interpolate(low_res, size=self.image_size, mode="trilinear", align_corners=False)


SEG_HEADS = {"voxseg": VoxSegHead, "segvol": SegVolHead}  # by `seg_config.head_type`
PROJECTORS = {"spp": SpatialPoolingProjector, "linear": LinearProjector, "mixer": MixerProjector}


class VoxLMPreTrainedModel(PreTrainedModel):
    config_class = VoxLMConfig
    config: VoxLMConfig
    base_model_prefix = "voxlm"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["VoxViTBlock", "VoxSegTwoWayLayer", "SegVolTwoWayLayer"]
    # The KV cache's name in transformers >= 5.24, and before.
    _skip_keys_device_placement = ["cache", "past_key_values"]
    # Eager and SDPA only: the vision tower and the seg head pass boolean masks (`eager_attention_forward`); an LLM
    # kernel such as flash attention is chosen for `text_config` alone (module docstring).
    _supports_sdpa = True
    _can_compile_fullgraph = False

    def save_pretrained(self, save_directory, **kwargs):
        """`PreTrainedModel.save_pretrained`, and a model card with the Hub metadata when the folder has none."""
        super().save_pretrained(save_directory, **kwargs)
        write_model_card_if_missing(self, save_directory, "image-text-to-text", **kwargs)

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.text_config.initializer_range if hasattr(self.config.text_config, "initializer_range") else 0.02
        if isinstance(module, nn.ConvTranspose3d):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.bias)
        elif isinstance(module, VoxSegAttention):
            # nn.MultiheadAttention's initialisation (`_reset_parameters`), which the head was trained with before.
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
            init.zeros_(module.out_proj.bias)
        elif isinstance(module, VoxSegHead):
            init.trunc_normal_(module.image_position_embeddings, mean=0.0, std=std)
            init.trunc_normal_(module.mask_token, mean=0.0, std=std)
        elif isinstance(module, VoxLMProjector) and module.scan_separator is not None:
            init.trunc_normal_(module.scan_separator, mean=0.0, std=std)
        elif isinstance(module, SegVolMaskDecoder):
            # SAM's tokens are nn.Embedding rows, initialised N(0, 1).
            init.normal_(module.iou_token)
            init.normal_(module.mask_tokens)
        elif isinstance(module, VoxViTPatchEmbedding) and isinstance(module.position_embeddings, nn.Parameter):
            # SegVol's ViT (the vision tower, a VoxViTModel, initialises its own), as VoxViTModel does.
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
        elif isinstance(module, SegVolPromptEncoder):
            init.normal_(module.positional_encoding_gaussian_matrix)
            init.normal_(module.no_mask_embedding)


class VoxLMForConditionalGeneration(VoxLMPreTrainedModel, GenerationMixin):
    r"""
    M3D-LaMed as a transformers model: a vision tower (a [`VoxViTModel`], or any tower of
    `vision_towers.VISION_TOWERS` with the `mixer` projector) encodes the volume, a projector turns its features into
    `config.num_image_tokens` LLM embeddings that replace the prompt's `<im_patch>` tokens, a causal LM (any
    `AutoModelForCausalLM`, built from `config.text_config`) writes the answer, and when the answer holds `[SEG]`, a
    [`VoxSegHead`] decodes a 3D mask from that token's hidden state.

    Studies `(B, S, C, D, H, W)` with a `scan_mask (B, S)` (up to `config.max_study_scans` real scans) are encoded in
    VoxViT study mode; each real scan gives `num_image_tokens` tokens and a learned separator goes between consecutive
    scans, so the prompt holds `config.num_study_image_tokens(S_real)` placeholders; padded scans give none. Masks of a
    study are decoded on one scan, `seg_scan_index` (default 0, the first).
    """

    def __init__(self, config: VoxLMConfig):
        super().__init__(config)
        self.vision_tower = build_vision_tower(config.vision_config)
        self.multi_modal_projector = PROJECTORS[config.projector_type](config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.seg_head = SEG_HEADS[config.seg_config.head_type](config) if config.seg_config is not None else None
        self.post_init()

    def no_weight_decay(self) -> set[str]:
        """Names, as in `named_parameters()`, of the matrix parameters that AdamW must not decay (timm / MAE
        convention); 1-D parameters (biases, norm weights, the projector's `scan_separator`) are left to the
        optimiser's `dim < 2` rule.

        - the vision tower's ([`VoxViTModel.no_weight_decay`]: position embeddings, CLS, scan embeddings), under
          `vision_tower.`;
        - the seg head's learned positions and tokens (`VoxSegHead`: `image_position_embeddings`, `mask_token`;
          `SegVolHead`: its ViT's position embeddings, SAM's IoU and mask tokens, the "no mask" embedding), under
          `seg_head.`: tables added to or placed among the tokens, which decay would only shrink toward "no position"
          and a zero query.

        The LLM's weights, token embeddings included, decay as HF Trainer and nanoGPT decay them. Names are this
        model's own; under a PEFT wrapper `get_parameter(name)` still finds them (a `modules_to_save` wrapper answers
        for the copy it trains).

        Returns:
            `set[str]`: the names of those that this model holds (the seg head exists only with `seg_config`).
        """
        tower_names = getattr(self.vision_tower, "no_weight_decay", set)()  # towers without such tables have none
        names = {f"vision_tower.{name}" for name in tower_names}
        if self.seg_head is not None:
            names |= {f"seg_head.{name}" for name in self.seg_head.no_weight_decay()}
        return names

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    def encode_images(
        self, pixel_values: torch.Tensor, scan_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VoxViT patch features and the projected image tokens.

        Args:
            pixel_values (`torch.Tensor` of shape `(B, C, D, H, W)` or `(B, S, C, D, H, W)`): preprocessed volumes, or
                studies of S scans (padded to one S).
            scan_mask (`torch.Tensor` of shape `(B, S)`, *optional*): for studies, `True` for real scans.

        Returns:
            `(patch_features (B, N, E_vis), image_features (B, N_img, E_llm))`; for studies, per scan:
            `(B, S, N, E_vis)` and `(B, S, N_img, E_llm)`. With the mixer, `patch_features` are the tower's last
            hidden state.
        """
        if self.config.projector_type == "mixer":
            outputs = self.vision_tower(pixel_values, output_hidden_states=True)
            stages = [outputs.hidden_states[layer] for layer in self.config.vision_feature_layers]  # (B, N_s, C_s)
            return outputs.last_hidden_state, self.multi_modal_projector(stages)
        # Note: M3D takes the last layer after the final LayerNorm and drops CLS (select_feature="patch" in
        # LaMed/src/model/multimodal_encoder/vit.py).
        if pixel_values.dim() != 6:
            hidden_states = self.vision_tower(pixel_values).last_hidden_state  # (B, 1 + N, E_vis)
            return hidden_states[:, 1:], self.project_scans(hidden_states)
        hidden_states = self.vision_tower(pixel_values, scan_mask=scan_mask).last_hidden_state  # (B, S, 1 + N, E_vis)
        scans = rearrange(hidden_states, "b s n e -> (b s) n e")  # (B S, 1 + N, E_vis)
        image_features = self.project_scans(scans)  # (B S, N_img, E_llm), each scan pooled on its own grid
        return hidden_states[:, :, 1:], rearrange(image_features, "(b s) n e -> b s n e", b=pixel_values.shape[0])

    def project_scans(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Encoder tokens of single scans `(B', 1 + N, E_vis)` -> their image tokens `(B', N_img, E_llm)`: the
        projected patch grid, after the projected volume embedding with `config.pooled_image_token`."""
        image_features = self.multi_modal_projector(hidden_states[:, 1:])  # (B', N_grid, E_llm)
        if not self.config.pooled_image_token:
            return image_features
        pooled = pool_scan_tokens(hidden_states, self.config.vision_config.pooling)  # (B', E_vis)
        pooled_token = self.multi_modal_projector.project_tokens(pooled[:, None])  # (B', 1, E_llm)
        return torch.cat([pooled_token, image_features], dim=1)

    def get_image_features(self, pixel_values: torch.Tensor, scan_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected image tokens `(B, N_img, E_llm)` for volumes `(B, C, D, H, W)`; `(B, S, N_img, E_llm)` for
        studies `(B, S, C, D, H, W)` (separators not included)."""
        return self.encode_images(pixel_values, scan_mask)[1]

    def layout_study_tokens(
        self, image_features: torch.Tensor, scan_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.LongTensor]:
        """The image tokens of studies in prompt order: the real scans' tokens, the learned separator between
        consecutive real scans. Padded scans give no tokens, so a padded study reads exactly like the unpadded one.

        Args:
            image_features (`torch.Tensor` of shape `(B, S, N_img, E_llm)`): projected tokens of every scan.
            scan_mask (`torch.Tensor` of shape `(B, S)`, *optional*): `True` for real scans; `None`: all are real.

        Returns:
            `(tokens (T, E_llm), counts (B,))`: every sample's tokens concatenated in batch order (the order in which
            `masked_scatter` fills the `<im_patch>` positions) and each sample's share `S_real N_img + S_real - 1`.
        """
        batch_size, num_scans, num_tokens, width = image_features.shape
        if scan_mask is None:
            scan_mask = torch.ones(batch_size, num_scans, dtype=torch.bool, device=image_features.device)
        scan_mask = scan_mask.to(device=image_features.device, dtype=torch.bool)
        real_scans = scan_mask.sum(dim=1)  # (B,)
        if bool((real_scans > self.config.max_study_scans).any()):
            raise ValueError(
                f"The studies hold {real_scans.tolist()} scans, but this model reads at most "
                f"{self.config.max_study_scans} (config.max_study_scans)"
            )
        scan_tokens = scan_mask[..., None].expand(-1, -1, num_tokens)  # (B, S, N_img)
        separator = self.multi_modal_projector.scan_separator
        if separator is None:  # max_study_scans == 1: one real scan, nothing to separate
            return image_features[scan_tokens], scan_tokens.sum(dim=(1, 2))
        # A separator follows scan s when a real scan comes later: (real scans at >= s) - (scan s itself) > 0.
        later = scan_mask.flip(1).cumsum(dim=1).flip(1) - scan_mask.long() > 0  # (B, S)
        separators = separator.to(image_features.dtype).expand(batch_size, num_scans, 1, width)  # (B, S, 1, E_llm)
        tokens = torch.cat([image_features, separators], dim=2)  # (B, S, N_img + 1, E_llm)
        keep = torch.cat([scan_tokens, (scan_mask & later)[..., None]], dim=2)  # (B, S, N_img + 1)
        return tokens[keep], keep.sum(dim=(1, 2))

    def get_placeholder_mask(self, input_ids: torch.LongTensor, image_token_counts) -> torch.Tensor:
        """Where the `<im_patch>` tokens are, checking that each sample holds exactly as many as its image gives.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`): the prompt ids.
            image_token_counts (`int` or `torch.LongTensor` of shape `(B,)`): features per volume (`num_image_tokens`),
                or per study (from [`layout_study_tokens`]).

        Returns:
            `torch.BoolTensor` of shape `(B, L)`.
        """
        if self.config.image_token_id is None:
            raise ValueError("config.image_token_id is not set: the model cannot find where image features go")
        placeholder = input_ids == self.config.image_token_id  # (B, L)
        per_sample = placeholder.sum(dim=1)
        if not bool((per_sample == torch.as_tensor(image_token_counts, device=per_sample.device)).all()):
            given = (
                f"each volume gives {image_token_counts} features"
                if isinstance(image_token_counts, int)
                else f"the studies give {image_token_counts.tolist()} features ({self.config.num_image_tokens} per "
                "scan and a separator between scans)"
            )
            raise ValueError(
                f"Image features and image tokens do not match: {given}, "
                f"but the prompts hold {per_sample.tolist()} <im_patch> tokens. Build prompts with VoxLMProcessor."
            )
        return placeholder

    def embed_inputs(
        self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None, scan_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Token embeddings with the image features scattered into the `<im_patch>` positions.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`): prompt ids.
            pixel_values (`torch.Tensor` of shape `(B, C, D, H, W)` or `(B, S, C, D, H, W)`, *optional*).
            scan_mask (`torch.Tensor` of shape `(B, S)`, *optional*): for studies, `True` for real scans.

        Returns:
            `(inputs_embeds (B, L, E_llm), patch_features or None, image_features or None)`, the latter two as
            [`encode_images`] returns them.
        """
        inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, L, E_llm)
        if pixel_values is None:
            return inputs_embeds, None, None
        patch_features, image_features = self.encode_images(pixel_values, scan_mask)
        if image_features.dim() == 4:
            tokens, counts = self.layout_study_tokens(image_features, scan_mask)  # (T, E_llm), (B,)
        else:
            tokens, counts = image_features, image_features.shape[1]
        placeholder = self.get_placeholder_mask(input_ids, counts)[..., None]  # (B, L, 1)
        inputs_embeds = inputs_embeds.masked_scatter(placeholder, tokens.to(inputs_embeds.dtype))
        return inputs_embeds, patch_features, image_features

    def seg_head_inputs(
        self,
        pixel_values: torch.Tensor,
        patch_features: torch.Tensor | None,
        scan_mask: torch.Tensor | None = None,
        seg_scan_index=0,
    ) -> torch.Tensor:
        """What the seg head reads besides the prompt state, for the scan masks are decoded on: the LLM encoder's
        patch features (`VoxSegHead`) or the volume itself (`SegVolHead`, which runs its own ViT).

        Args:
            pixel_values (`torch.Tensor` of shape `(B, C, D, H, W)` or `(B, S, C, D, H, W)`): the model's images.
            patch_features (`torch.Tensor` of shape `(B, N, E_vis)` or `(B, S, N, E_vis)`, *optional*): from
                [`encode_images`]; encoded here when a `VoxSegHead` needs them and they are not given.
            scan_mask (`torch.Tensor` of shape `(B, S)`, *optional*): `True` for real scans.
            seg_scan_index (`int` or `torch.LongTensor` of shape `(B,)`, defaults to 0): the scan of each study.

        Returns:
            `torch.Tensor`: `(B, N, E_vis)` patch features or `(B, C, D, H, W)` volumes.
        """
        if self.seg_head.input_name == "pixel_values":
            inputs = pixel_values
        else:
            inputs = patch_features if patch_features is not None else self.encode_images(pixel_values, scan_mask)[0]
        if pixel_values.dim() != 6:
            return inputs
        batch_size, num_scans = inputs.shape[:2]
        index = torch.as_tensor(seg_scan_index, dtype=torch.long, device=inputs.device).expand(batch_size)
        if bool(((index < 0) | (index >= num_scans)).any()):
            raise ValueError(f"seg_scan_index {index.tolist()} is outside the studies' {num_scans} scans")
        rows = torch.arange(batch_size, device=inputs.device)
        if scan_mask is not None and not bool(scan_mask.to(inputs.device, torch.bool)[rows, index].all()):
            raise ValueError(f"seg_scan_index {index.tolist()} points at a padded scan (scan_mask is False there)")
        return inputs[rows, index]  # (B, S, ...) -> (B, ...)

    def seg_prompt_positions(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Where the hidden states that prompt the seg head are: each `[SEG]`, or the token before each
        (`seg_config.prompt_token`).

        Note: M3D-LaMed takes the token before `[SEG]` (`input_ids[:, 1:] == seg_token_id`, padded by one at the end,
        in lamed_llama.py and lamed_phi3.py): the state that predicted `[SEG]`.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`): ids aligned with the hidden states.

        Returns:
            `torch.BoolTensor` of shape `(B, L)`.
        """
        seg_tokens = input_ids == self.config.seg_token_id  # (B, L)
        if self.config.seg_config.prompt_token == "seg":
            return seg_tokens
        return F.pad(seg_tokens[:, 1:], (0, 1), value=False)  # (B, L - 1) -> (B, L)

    def forward_seg(
        self,
        last_hidden_state: torch.Tensor,
        prompt_positions: torch.Tensor,
        seg_inputs: torch.Tensor,
        sample_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.LongTensor]:
        """Mask logits for the samples that hold a prompt position.

        Args:
            last_hidden_state (`torch.Tensor` of shape `(B, L, E_llm)`): the LM's last hidden states.
            prompt_positions (`torch.BoolTensor` of shape `(B, L)`): where the prompting states are
                ([`seg_prompt_positions`]); several in a sample are averaged, as M3D does.
            seg_inputs (`torch.Tensor`): what the seg head reads ([`seg_head_inputs`]), `(B, ...)`.
            sample_mask (`torch.BoolTensor` of shape `(B,)`, *optional*): restricts to these samples.

        Returns:
            `(seg_logits (B_seg, 1, D, H, W), sample_indices (B_seg,))`.
        """
        prompt_positions = prompt_positions.to(last_hidden_state.device)
        counts = prompt_positions.sum(dim=1)  # (B,)
        selected = counts > 0 if sample_mask is None else (counts > 0) & sample_mask.to(counts.device)
        sample_indices = selected.nonzero().flatten()
        # The mean over several prompt positions of a sample, without a per-sample loop.
        weights = prompt_positions[..., None].to(last_hidden_state.dtype)  # (B, L, 1)
        summed = (last_hidden_state * weights).sum(dim=1)  # (B, E_llm)
        seg_hidden = summed[sample_indices] / counts[sample_indices, None].to(summed.dtype)  # (B_seg, E_llm)
        seg_inputs = seg_inputs[sample_indices.to(seg_inputs.device)].to(seg_hidden.device, seg_hidden.dtype)
        return self.seg_head(seg_hidden, seg_inputs), sample_indices

    def compute_loss(
        self,
        logits: torch.Tensor,
        labels: torch.LongTensor,
        input_ids: torch.LongTensor,
        seg_logits: torch.Tensor | None,
        seg_targets: torch.Tensor | None,
        logit_positions: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The LM loss (image positions never count) plus the weighted Dice and BCE losses when masks are given;
        `logit_positions`: the positions that `logits` hold, when not all; `num_items_in_batch`: see
        `causal_lm_loss`."""
        labels = labels.masked_fill(input_ids == self.config.image_token_id, IGNORE_INDEX)
        losses = {"lm_loss": causal_lm_loss(logits, labels, logit_positions, num_items_in_batch)}
        losses["loss"] = losses["lm_loss"]
        if seg_logits is not None and seg_logits.shape[0] > 0:
            seg = self.config.seg_config
            losses["seg_dice_loss"] = dice_loss(seg_logits, seg_targets)
            losses["seg_bce_loss"] = bce_loss(seg_logits, seg_targets)
            losses["loss"] = (
                losses["loss"]
                + seg.dice_loss_weight * losses["seg_dice_loss"]
                + seg.bce_loss_weight * losses["seg_bce_loss"]
            )
        return losses

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        scan_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        seg_masks: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
        seg_scan_index=0,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> VoxLMCausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`): prompt (and answer) ids; each prompt holds
                `config.num_image_tokens` `<im_patch>` tokens when `pixel_values` are given.
            pixel_values (`torch.Tensor` of shape `(B, C, D, H, W)`, *optional*): preprocessed volumes; only on the
                first (prefill) step of generation. Studies: `(B, S, C, D, H, W)`, and each prompt holds
                `config.num_study_image_tokens(S_real)` `<im_patch>` tokens.
            scan_mask (`torch.Tensor` of shape `(B, S)`, *optional*): for studies, `True` for real scans, `False` for
                padding (padded scans give no tokens); `None`: every scan is real.
            attention_mask (`torch.Tensor` of shape `(B, L)`, *optional*): 1 for tokens, 0 for padding.
            labels (`torch.LongTensor` of shape `(B, L)`, *optional*): LM targets, `-100` where no loss is wanted.
            seg_masks (`torch.Tensor` of shape `(B, 1, D, H, W)`, *optional*): target masks; adds Dice + BCE for the
                samples that hold `[SEG]` (and have `has_mask`).
            has_mask (`torch.BoolTensor` of shape `(B,)`, *optional*): which rows of `seg_masks` are real.
            seg_scan_index (`int` or `torch.LongTensor` of shape `(B,)`, defaults to 0): for studies, the scan that
                `seg_masks` and the predicted masks belong to.
            logits_to_keep (`int` or `torch.LongTensor` of shape `(K,)`, defaults to 0): as in transformers (`0`: all
                positions); with `labels`, a tensor of positions (training passes `label_positions(labels)`) computes
                logits, and the LM loss, only there.
            num_items_in_batch (`int` or `torch.Tensor`, *optional*): the labelled tokens the LM loss is divided by
                (summed, not averaged over this batch): under gradient accumulation, those of every micro-batch of
                the step, as the training loop and the HF `Trainer` pass them.
            return_dict (`bool`, *optional*): accepted for `generate`; the output is always a `ModelOutput`.
            kwargs: passed to the LM, among them the KV cache under the name the installed transformers gives it
                (`cache` from 5.24 on, `past_key_values` before).
        """
        if output_hidden_states is None:  # as transformers' models do: the config's value (a load override) rules
            output_hidden_states = self.config.output_hidden_states
        if inputs_embeds is None:
            inputs_embeds, patch_features, image_features = self.embed_inputs(input_ids, pixel_values, scan_mask)
        else:
            patch_features = image_features = None
        wants_seg = seg_masks is not None and self.seg_head is not None and patch_features is not None
        lm_outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states or wants_seg,
            logits_to_keep=logits_to_keep,
            return_dict=True,
            **kwargs,
        )
        seg_logits = sample_indices = seg_targets = None
        if wants_seg:
            seg_inputs = self.seg_head_inputs(pixel_values, patch_features, scan_mask, seg_scan_index)
            seg_logits, sample_indices = self.forward_seg(
                lm_outputs.hidden_states[-1], self.seg_prompt_positions(input_ids), seg_inputs, has_mask
            )
            seg_targets = seg_masks[sample_indices.to(seg_masks.device)].to(seg_logits.device)
        losses = {}
        if labels is not None:
            logit_positions = logits_to_keep if isinstance(logits_to_keep, torch.Tensor) else None
            losses = self.compute_loss(lm_outputs.logits, labels, input_ids, seg_logits, seg_targets, logit_positions,
                                       num_items_in_batch)
        lm_fields = dict(lm_outputs)  # logits, the cache, hidden states, attentions: as the installed LM names them
        if not output_hidden_states:
            lm_fields.pop("hidden_states", None)  # computed only for the seg head
        return VoxLMCausalLMOutputWithPast(
            **lm_fields,
            **losses,
            image_hidden_states=image_features,
            seg_logits=seg_logits,
            seg_sample_indices=sample_indices,
        )

    @torch.no_grad()
    def masks_from_generation(
        self,
        output,
        pixel_values: torch.Tensor,
        prompt_length: int,
        prompt_attention_mask: torch.Tensor | None = None,
        scan_mask: torch.Tensor | None = None,
        seg_scan_index=0,
    ) -> list[torch.Tensor | None]:
        """Mask logits for generated answers, prompted by the hidden states the generation pass computed.

        Step 0 of generation runs the prompt and step `k >= 1` the new token `k - 1`, so the last-layer state that
        each step ends with is the one that predicted new token `k`: the prompt state of `prompt_token="previous"`.
        `[SEG]`'s own state (`"seg"`) is the next step's; for a `[SEG]` that ends the answer, one more LLM step on
        the kept cache computes it.

        Note: as M3D's `generate` (lamed_llama.py: `output_ids[:, 1:]`), with `prompt_token="previous"` a `[SEG]`
        written as the very first new token prompts no mask.

        Args:
            output (`GenerateDecoderOnlyOutput`): of `generate(..., output_hidden_states=True,
                return_dict_in_generate=True)`.
            pixel_values (`torch.Tensor` of shape `(B, C, D, H, W)` or `(B, S, C, D, H, W)`): the prompts' images.
            prompt_length (`int`): `L_prompt`; only `[SEG]` tokens after it count.
            prompt_attention_mask (`torch.Tensor` of shape `(B, L_prompt)`, *optional*): the prompts' padding mask.
            scan_mask (`torch.Tensor` of shape `(B, S)`, *optional*), seg_scan_index (`int` or `(B,)`, defaults to 0):
                for studies, the real scans and the scan each mask is decoded on.

        Returns:
            `list`: per sample, `(1, D, H, W)` mask logits, or `None` when its answer holds no `[SEG]`.
        """
        new_ids = output.sequences[:, prompt_length:]  # (B, T)
        predicting = torch.cat([step[-1][:, -1:] for step in output.hidden_states], dim=1)  # (B, T, E_llm)
        seg_tokens = new_ids == self.config.seg_token_id  # (B, T)
        if self.config.seg_config.prompt_token == "previous":
            states, positions = predicting, F.pad(seg_tokens[:, 1:], (1, 0), value=False)
        else:
            final = torch.zeros_like(predicting[:, :1])
            if bool(seg_tokens[:, -1].any()):
                final = self.final_token_state(output, prompt_length, prompt_attention_mask)[:, None]
            states, positions = torch.cat([predicting[:, 1:], final], dim=1), seg_tokens  # (B, T, E_llm)
        masks: list[torch.Tensor | None] = [None] * new_ids.shape[0]
        if bool(positions.any()):
            seg_inputs = self.seg_head_inputs(pixel_values, None, scan_mask, seg_scan_index)
            seg_logits, sample_indices = self.forward_seg(states, positions, seg_inputs)
            for logits, index in zip(seg_logits, sample_indices.tolist()):
                masks[index] = logits
        return masks

    def final_token_state(
        self, output, prompt_length: int, prompt_attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The last-layer state `(B, E_llm)` at each sequence's last token, which generation samples but never runs:
        one LLM step on the cache that `generate` returns (named `cache` from transformers 5.24 on, before
        `past_key_values`)."""
        sequences = output.sequences
        cache_name = "cache" if "cache" in output.__dataclass_fields__ else "past_key_values"
        if getattr(output, cache_name) is None:
            raise ValueError(
                "The answer ends with [SEG], whose own hidden state (seg_config.prompt_token='seg') needs one more "
                "step on generation's cache: generate with use_cache=True"
            )
        attention_mask = torch.ones_like(sequences)
        if prompt_attention_mask is not None:
            attention_mask[:, :prompt_length] = prompt_attention_mask
        position_ids = attention_mask.sum(dim=1, keepdim=True) - 1  # (B, 1), as generate counts positions
        return self.language_model(
            input_ids=sequences[:, -1:],
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            output_hidden_states=True,
            return_dict=True,
            **{cache_name: getattr(output, cache_name)},
        ).hidden_states[-1][:, -1]

    @torch.no_grad()
    def generate(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        return_masks: bool = False,
        scan_mask=None,
        seg_scan_index=0,
        **kwargs,
    ):
        r"""
        `GenerationMixin.generate` (KV cache, greedy or sampling, left-padded batches), plus masks on request.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`), pixel_values (`torch.Tensor` of shape `(B, C, D, H, W)`, or
            `(B, S, C, D, H, W)` for studies), attention_mask (`torch.Tensor` of shape `(B, L)`): as built by
            `VoxLMProcessor`.
            return_masks (`bool`, defaults to `False`): return a [`VoxLMGenerateOutput`] whose `masks` hold, per sample,
                mask logits `(1, D, H, W)` when the answer holds `[SEG]`, prompted by hidden states of this
                generation pass ([`masks_from_generation`]).
            scan_mask (`torch.Tensor` of shape `(B, S)`, *optional*): for studies, `True` for real scans.
            seg_scan_index (`int` or `torch.LongTensor` of shape `(B,)`, defaults to 0): for studies, the scan the
                masks are decoded on.
        """
        if scan_mask is not None:
            kwargs["scan_mask"] = scan_mask  # a model input like pixel_values; unused after the prefill step
        if not return_masks:
            return super().generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **kwargs)
        if self.seg_head is None:
            raise ValueError("return_masks=True needs a model with a segmentation head (config.seg_config)")
        kwargs.update(return_dict_in_generate=True, output_hidden_states=True)
        output = super().generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **kwargs)
        masks = self.masks_from_generation(
            output, pixel_values, input_ids.shape[1], attention_mask, scan_mask, seg_scan_index
        )
        return VoxLMGenerateOutput(sequences=output.sequences, masks=masks)

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model: str | PreTrainedModel | None,
        text_model,
        token_ids: dict[str, int],
        vocab_size: int,
        vision_config: PretrainedConfig | dict | None = None,
        text_kwargs: dict | None = None,
        **config_kwargs,
    ) -> "VoxLMForConditionalGeneration":
        """Assemble a VoxLM from a pretrained encoder and a pretrained causal LM (local folders, Hub ids or models).

        The LM's embeddings are resized to `vocab_size` (the tokenizer after voxlm's tokens were added); new rows
        start at the mean of the existing ones, so new tokens begin as an "average" token rather than noise.

        Args:
            vision_model (`str`, `PreTrainedModel` or `None`): a vision tower's folder / Hub id (any tower of
                `vision_towers.VISION_TOWERS`), a tower, or `None` for a randomly initialised one from `vision_config`.
            text_model (`str` or `PreTrainedModel`): a causal LM folder / Hub id, or a loaded causal LM.
            token_ids (`dict[str, int]`): `image_token_id`, `seg_token_id`, `box_start_token_id`, `box_end_token_id`
                (and optionally `pad_token_id`), as `voxlm.processing.add_voxlm_tokens` returns them.
            vocab_size (`int`): the tokenizer's length after the tokens were added.
            vision_config (`PretrainedConfig` or `dict`, *optional*): used when `vision_model` is `None` (a VoxViT's
                defaults when also `None`).
            text_kwargs (`dict`, *optional*): passed to `AutoModelForCausalLM.from_pretrained` (e.g. `gguf_file`).
            config_kwargs: the other `VoxLMConfig` fields (`seg_config`, `projector_type`, `pooling_size`,
                `max_study_scans`, `pooled_image_token`, ...).
        """
        if isinstance(vision_model, str):
            tower_config = vision_tower_config(PretrainedConfig.get_config_dict(vision_model)[0])
            vision_model = vision_tower_class(tower_config.model_type)[1].from_pretrained(vision_model)
        elif vision_model is None:
            vision_model = build_vision_tower(vision_tower_config(vision_config))
        if isinstance(text_model, str):
            text_model = AutoModelForCausalLM.from_pretrained(text_model, **(text_kwargs or {}))
        resize_embeddings_to_mean(text_model, vocab_size)
        config = VoxLMConfig(
            vision_config=vision_model.config,
            text_config=text_model.config,
            **config_kwargs,
            **{key: value for key, value in token_ids.items() if key != "pad_token_id"},
            pad_token_id=token_ids.get("pad_token_id"),
        )
        model = cls(config)
        model.vision_tower.load_state_dict(vision_model.state_dict())
        model.language_model.load_state_dict(text_model.state_dict())
        model.generation_config = text_model.generation_config
        if token_ids.get("pad_token_id") is not None:
            model.generation_config.pad_token_id = token_ids["pad_token_id"]
        return model


@torch.no_grad()
def resize_embeddings_to_mean(language_model: PreTrainedModel, vocab_size: int) -> None:
    """Resize a causal LM's input (and untied output) embeddings to `vocab_size`, new rows = mean of the old rows."""
    old_size = language_model.get_input_embeddings().weight.shape[0]
    if vocab_size <= old_size:
        return
    language_model.resize_token_embeddings(vocab_size, mean_resizing=False)
    embeddings = [language_model.get_input_embeddings().weight]
    output = language_model.get_output_embeddings()
    if output is not None and output.weight is not embeddings[0]:
        embeddings.append(output.weight)
    for weight in embeddings:
        weight[old_size:] = weight[:old_size].mean(dim=0, keepdim=True)


__all__ = [
    "VoxLMForConditionalGeneration",
    "VoxLMPreTrainedModel",
    "VoxSegHead",
    "SpatialPoolingProjector",
    "LinearProjector",
    "VoxLMProjector",
    "VoxLMCausalLMOutputWithPast",
    "VoxLMGenerateOutput",
    "resize_embeddings_to_mean",
]
