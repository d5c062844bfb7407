"""COLIPRI (microsoft/colipri, Wald et al. 2026, arXiv:2510.15042) as transformers models.

    volume (B, 1, D, H, W) -> Conv3d patch embedding, stride = patch -> tokens (B, N, E)
        -> EVA-02 blocks (3-D rotary embedding, SwiGLU, layer scale) -> LayerNorm -> tokens (B, N, E)
        -> 1x1x1 Conv3d projector -> (B, P, D', H', W') -> attention pooling (query = mean token) -> (B, P)
    report ids (B, L) -> BERT (CXR-BERT) -> (B, L, P) -> attention pooling (query = masked mean token) -> (B, P)

Re-implemented from colipri 0.1.3 (`model/image.py`, `model/text.py`, `pooling.py`), dynamic_network_architectures'
`Primus` / `Eva` and timm's `EvaBlock`, `EvaAttention`, `SwiGLU` and `RotaryEmbeddingCat` (timm < 1.0.23), with the
released settings `use_rot_pos_emb=True`, `use_abs_pos_embed=False`, `num_register_tokens=0`, `qkv_fused=False`,
`scale_attn_inner=True`, `scale_mlp=True`, `init_values=0.1`. Primus' segmentation decoder (`up_projection`) is
replaced by an identity in COLIPRI and is not part of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_colipri import ColipriConfig, ColipriVisionConfig
from .modeling_voxvit import write_model_card_if_missing


@dataclass
class ColipriVisionOutput(BaseModelOutputWithPooling):
    """Output of [`ColipriVisionModel.forward`].

    Args:
        last_hidden_state (`torch.Tensor` of shape `(B, N, E)`): the backbone's tokens after its final LayerNorm, in
            `(D', H', W')` raster order (the last axis fastest).
        pooler_output (`torch.Tensor` of shape `(B, P)`): the attention-pooled projected tokens, not normalised
            (COLIPRI's `encode_image(pool=True, project=True, normalize=False)`).
        hidden_states (`tuple[torch.Tensor]`, *optional*): the tokens entering each block and after the last one.
        projected_features (`torch.Tensor` of shape `(B, P, D', H', W')`): the projector's feature map.
    """

    projected_features: torch.Tensor | None = None


@dataclass
class ColipriOutput(ModelOutput):
    """Output of [`ColipriModel.forward`].

    Args:
        logits_per_image (`torch.Tensor` of shape `(B_img, B_txt)`), logits_per_text (`torch.Tensor` of shape
            `(B_txt, B_img)`): cosines times `exp(logit_scale)` (COLIPRI's `compute_similarities` divided by its
            `softmax_temperature`), when both inputs are given.
        image_embeds (`torch.Tensor` of shape `(B_img, P)`), text_embeds (`torch.Tensor` of shape `(B_txt, P)`):
            L2-normalised embeddings.
        vision_model_output (`ColipriVisionOutput`, *optional*): the image encoder's output.
    """

    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    vision_model_output: ColipriVisionOutput | None = None


def rotary_embedding(grid: list[int], reference_grid: list[int], head_dim: int, theta: float,
                     device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sines and cosines of timm's `RotaryEmbeddingCat(in_pixels=False)` over a 3-D token grid.

    A third of the head's channel pairs turns with each axis (D', H', W' in that order), at the frequencies
    `theta ** (-k / n)`, `k < n = head_dim / 6`; each frequency fills two adjacent channels (interleaved pairs).
    Positions are patch indices rescaled to the reference grid (`index / size * reference`, EVA's scheme for another
    input size; an identity at the reference size, computed the same way so that it rounds as timm does).

    Args:
        grid (`list[int]`): the token grid `(D', H', W')`.
        reference_grid (`list[int]`): the grid at the configured `image_size`.
        head_dim (`int`): the attention head width (a multiple of 6).
        theta (`float`): the rotary temperature.

    Returns:
        `(sin, cos)`, each `(N, head_dim)` with `N = D' * H' * W'` in raster order.
    """
    num_bands = head_dim // 6
    bands = 1.0 / theta ** (torch.arange(num_bands, device=device).float() / num_bands)  # (n,)
    axes = [torch.arange(size, device=device).float() / size * reference
            for size, reference in zip(grid, reference_grid)]
    positions = torch.stack(torch.meshgrid(axes, indexing="ij"), dim=-1)  # (D', H', W', 3)
    angles = rearrange(positions[..., None] * bands, "d h w k band -> (d h w) (k band)")  # (N, 3n)
    angles = angles.repeat_interleave(2, dim=-1)  # (N, head_dim): each frequency on a pair of channels
    return angles.sin(), angles.cos()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """`(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)`: the interleaved rotary layout (timm `rot`)."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)  # (..., head_dim / 2, 2) -> (..., head_dim)


class ColipriAttention(nn.Module):
    """EVA attention: q and v projections with bias, k without, rotary q and k, and a LayerNorm on the heads' output
    before the output projection (`scale_attn_inner`)."""

    def __init__(self, config: ColipriVisionConfig):
        super().__init__()
        width = config.embed_dim
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width)
        self.inner_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.out_proj = nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, N, E)`): the normalised tokens.
            sin (`torch.Tensor` of shape `(N, head_dim)`), cos (`torch.Tensor` of shape `(N, head_dim)`): the rotary
                embedding of the token grid.
        """
        q, k, v = (rearrange(proj(hidden_states), "b n (heads c) -> b heads n c", heads=self.num_heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, heads, N, head_dim) each
        q = q * cos + rotate_pairs(q) * sin
        k = k * cos + rotate_pairs(k) * sin
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        attended = rearrange(attended, "b heads n c -> b n (heads c)")  # (B, N, E)
        return self.out_proj(self.inner_norm(attended))


class ColipriSwiGLU(nn.Module):
    """timm's `SwiGLU` with its norm (`scale_mlp`): `down(norm(silu(gate(x)) * up(x)))`."""

    def __init__(self, config: ColipriVisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.embed_dim, config.intermediate_size)
        self.up_proj = nn.Linear(config.embed_dim, config.intermediate_size)
        self.norm = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)
        self.down_proj = nn.Linear(config.intermediate_size, config.embed_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`hidden_states (B, N, E) -> (B, N, E)`."""
        gated = F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states)  # (B, N, I)
        return self.down_proj(self.norm(gated))


class ColipriBlock(nn.Module):
    """A pre-norm EVA block with layer scale on both residual branches."""

    def __init__(self, config: ColipriVisionConfig):
        super().__init__()
        width = config.embed_dim
        self.norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.attn = ColipriAttention(config)
        self.layer_scale1 = nn.Parameter(torch.full((width,), config.layer_scale_init_value))
        self.norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = ColipriSwiGLU(config)
        self.layer_scale2 = nn.Parameter(torch.full((width,), config.layer_scale_init_value))

    def forward(self, hidden_states: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """`hidden_states (B, N, E) -> (B, N, E)`."""
        hidden_states = hidden_states + self.layer_scale1 * self.attn(self.norm1(hidden_states), sin, cos)
        return hidden_states + self.layer_scale2 * self.mlp(self.norm2(hidden_states))


class ColipriAttentionPool(nn.Module):
    """COLIPRI's `AttentionPool1D`: one query, the (masked) mean token, attends over the tokens with an
    `nn.MultiheadAttention`."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            tokens (`torch.Tensor` of shape `(B, N, P)`): the tokens to pool.
            attention_mask (`torch.Tensor` of shape `(B, N)`, *optional*): nonzero on the valid tokens.

        Returns:
            `torch.Tensor` of shape `(B, P)`.

        Raises:
            `ValueError`: the mask's shape is not `(B, N)`, or a row has no valid token.
        """
        if attention_mask is None:
            query = tokens.mean(dim=1, keepdim=True)  # (B, 1, P)
            key_padding_mask = None
        else:
            if attention_mask.shape != tokens.shape[:2]:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                 f"{tuple(tokens.shape[:2])}")
            valid = attention_mask.bool()
            if not valid.any(dim=1).all():
                raise ValueError("Each row of attention_mask must hold at least one valid token")
            weights = valid[..., None].to(tokens.dtype)  # (B, N, 1)
            query = (tokens * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)  # (B, 1, P)
            key_padding_mask = ~valid
        pooled, _ = self.attn(query, tokens, tokens, key_padding_mask=key_padding_mask, need_weights=False)
        return pooled[:, 0]  # (B, 1, P) -> (B, P)

    def dense(self, feature_map: torch.Tensor) -> torch.Tensor:
        """The pooling's value and output projections applied at every voxel, as COLIPRI's `to_dense` (the output a
        token would get if it were the only one attended to).

        Args:
            feature_map (`torch.Tensor` of shape `(B, P, D', H', W')`): the projected feature map.

        Returns:
            `torch.Tensor` of shape `(B, P, D', H', W')`.
        """
        width = feature_map.shape[1]
        value_weight = self.attn.in_proj_weight[2 * width:]  # (P, P): in_proj stacks q, k, v
        value_bias = self.attn.in_proj_bias[2 * width:]
        tokens = rearrange(feature_map, "b p d h w -> b d h w p")
        tokens = self.attn.out_proj(F.linear(tokens, value_weight, value_bias))
        return rearrange(tokens, "b d h w p -> b p d h w")


class ColipriPreTrainedModel(PreTrainedModel):
    config_class = ColipriConfig
    config: ColipriConfig
    base_model_prefix = "colipri"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    _no_split_modules = ["ColipriBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        # EVA's initialisation (dynamic_network_architectures `Eva._init_weights`): truncated normal linears.
        super()._init_weights(module)
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, ColipriBlock):
            vision = getattr(self.config, "vision_config", self.config)
            init.constant_(module.layer_scale1, vision.layer_scale_init_value)
            init.constant_(module.layer_scale2, vision.layer_scale_init_value)
        elif isinstance(module, ColipriModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            init.zeros_(module.logit_bias)

    def save_pretrained(self, save_directory, **kwargs):
        """`PreTrainedModel.save_pretrained`, and a model card with the Hub metadata when the folder has none."""
        super().save_pretrained(save_directory, **kwargs)
        write_model_card_if_missing(self, save_directory, "zero-shot-image-classification", **kwargs)


class ColipriVisionModel(ColipriPreTrainedModel):
    r"""COLIPRI's image encoder: Primus backbone, 1x1x1 conv projector and attention pooling.

    `pixel_values (B, C, D, H, W)` holds the three axes in the order COLIPRI's network sees them: torchio's data
    array after `ToOrientation("RAS")` (its axes run towards the patient's Right, Anterior and Superior), resampled
    to 2 mm and cropped or padded to `image_size`, HU clamped to [-1000, 1000] and scaled to [-1, 1].
    """

    config_class = ColipriVisionConfig
    config: ColipriVisionConfig
    input_modalities = ("image",)

    def __init__(self, config: ColipriVisionConfig):
        super().__init__(config)
        self.patch_embed = nn.Conv3d(config.num_channels, config.embed_dim, kernel_size=config.patch_size,
                                     stride=config.patch_size)
        self.layers = nn.ModuleList(ColipriBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.projector = nn.Conv3d(config.embed_dim, config.hidden_size, kernel_size=1)
        self.pooler = ColipriAttentionPool(config.hidden_size, config.pooler_num_heads)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool = True,
        **kwargs,
    ) -> ColipriVisionOutput | tuple:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(B, C, D, H, W)`): volumes whose sizes the patch size divides.
            output_hidden_states (`bool`, *optional*): also return the tokens entering each block.
            return_dict (`bool`, defaults to `True`): a `ColipriVisionOutput`, else a tuple.
        """
        output_hidden_states = output_hidden_states or self.config.output_hidden_states
        feature_map = self.patch_embed(pixel_values)  # (B, E, D', H', W')
        grid = list(feature_map.shape[2:])
        sin, cos = rotary_embedding(grid, self.config.grid_size, self.config.head_dim, self.config.rope_theta,
                                    device=pixel_values.device)
        sin, cos = sin.to(feature_map.dtype), cos.to(feature_map.dtype)
        hidden_states = rearrange(feature_map, "b e d h w -> b (d h w) e")  # (B, N, E)
        all_hidden_states = []
        for layer in self.layers:
            all_hidden_states.append(hidden_states)
            hidden_states = layer(hidden_states, sin, cos)
        hidden_states = self.norm(hidden_states)
        all_hidden_states.append(hidden_states)
        feature_map = rearrange(hidden_states, "b (d h w) e -> b e d h w", d=grid[0], h=grid[1], w=grid[2])
        projected = self.projector(feature_map)  # (B, P, D', H', W')
        pooled = self.pooler(rearrange(projected, "b p d h w -> b (d h w) p"))  # (B, N, P) -> (B, P)
        output = ColipriVisionOutput(
            last_hidden_state=hidden_states, pooler_output=pooled,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None, projected_features=projected,
        )
        return output if return_dict else output.to_tuple()


class ColipriModel(ColipriPreTrainedModel):
    r"""COLIPRI's image encoder and BERT with its text pooling, in one embedding space (no text projection, as
    COLIPRI was pre-trained); `logit_scale` is the log of `1 / softmax_temperature`."""

    def __init__(self, config: ColipriConfig):
        super().__init__(config)
        self.vision_model = ColipriVisionModel(config.vision_config)
        self.text_model = AutoModel.from_config(config.text_config, add_pooling_layer=False)
        self.text_pooler = ColipriAttentionPool(config.text_config.hidden_size, config.text_pooler_num_heads)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        # COLIPRI's logits have no bias: kept at 0 so that every voxlm dual encoder scores alike.
        self.logit_bias = nn.Parameter(torch.tensor(0.0))
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, scan_mask: torch.Tensor | None = None) -> torch.Tensor:
        """COLIPRI's `encode_image(pool=True, project=True, normalize=True)`: the pooled embedding, L2-normalised.

        Args:
            pixel_values (`torch.Tensor` of shape `(B, 1, D, H, W)`): see [`ColipriVisionModel`].
            scan_mask (`None`): COLIPRI encodes one scan per row; a mask is refused.

        Returns:
            `torch.Tensor` of shape `(B, P)`.
        """
        if scan_mask is not None:
            raise ValueError("COLIPRI encodes one scan per row: `scan_mask` is not supported")
        return F.normalize(self.vision_model(pixel_values).pooler_output, dim=-1)

    def get_dense_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """COLIPRI's `encode_image(pool=False, project=True, normalize=True)`: one embedding per patch (the
        pooling's value and output projections at every voxel), L2-normalised over channels.

        Args:
            pixel_values (`torch.Tensor` of shape `(B, 1, D, H, W)`): see [`ColipriVisionModel`].

        Returns:
            `torch.Tensor` of shape `(B, P, D', H', W')`.
        """
        projected = self.vision_model(pixel_values).projected_features  # (B, P, D', H', W')
        return F.normalize(self.vision_model.pooler.dense(projected), dim=1)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """COLIPRI's `encode_text(pool=True, normalize=True)`: the pooled BERT states, L2-normalised.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`), attention_mask (`torch.Tensor` of shape `(B, L)`,
                *optional*): the tokenized reports.

        Returns:
            `torch.Tensor` of shape `(B, P)`.
        """
        states = self.text_model(input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, P)
        return F.normalize(self.text_pooler(states, attention_mask), dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> ColipriOutput:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(B_img, 1, D, H, W)`, *optional*): volumes.
            input_ids (`torch.LongTensor` of shape `(B_txt, L)`, *optional*), attention_mask (`torch.Tensor` of
                shape `(B_txt, L)`, *optional*): reports.
        """
        vision_output = image_embeds = text_embeds = logits = None
        if pixel_values is not None:
            vision_output = self.vision_model(pixel_values)
            image_embeds = F.normalize(vision_output.pooler_output, dim=-1)  # (B_img, P)
        if input_ids is not None:
            text_embeds = self.get_text_features(input_ids, attention_mask)  # (B_txt, P)
        if image_embeds is not None and text_embeds is not None:
            logits = image_embeds @ text_embeds.T * self.logit_scale.exp() + self.logit_bias  # (B_img, B_txt)
        return ColipriOutput(logits_per_image=logits, logits_per_text=None if logits is None else logits.T,
                             image_embeds=image_embeds, text_embeds=text_embeds, vision_model_output=vision_output)
