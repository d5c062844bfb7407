"""VoxViT: a 3D vision transformer for CT and MRI volumes, with MONAI-compatible parameter names.

The encoder is written here rather than imported from MONAI so that `trust_remote_code` users need nothing beyond
torch, transformers and einops. Parameter names follow `monai.networks.nets.ViT` (`patch_embedding`, `blocks.{i}.attn.qkv`,
`blocks.{i}.mlp.linear1`, ...), so M3D-CLIP and MONAI checkpoints convert with a handful of key renames
(`convert_m3d.py`), and a test proves numerical equivalence with MONAI.

    volume (B, C, D, H, W)
      -> patchify (B, N, p_d * p_h * p_w * C) -> Linear -> + position embeddings -> [CLS] + tokens (B, 1 + N, E)
      -> num_hidden_layers x [pre-norm self-attention (SDPA) + pre-norm MLP] -> LayerNorm
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_voxvit import VoxViTConfig


def patchify(pixel_values: torch.Tensor, patch_size) -> torch.Tensor:
    """Cut a volume into flattened non-overlapping patches, in MONAI's `perceptron` order.

    Args:
        pixel_values (`torch.Tensor` of shape `(B, C, D, H, W)`): the volumes.
        patch_size (`tuple[int, int, int]`): patch size `(p_d, p_h, p_w)`; must divide `(D, H, W)`.

    Returns:
        `torch.Tensor` of shape `(B, N, p_d * p_h * p_w * C)` with `N = (D / p_d) (H / p_h) (W / p_w)`, patches in
        row-major grid order and voxels within a patch ordered `(p_d, p_h, p_w, C)`.
    """
    p_d, p_h, p_w = patch_size
    # (B, C, D, H, W) -> (B, N, p_d * p_h * p_w * C)
    return rearrange(pixel_values, "b c (d pd) (h ph) (w pw) -> b (d h w) (pd ph pw c)", pd=p_d, ph=p_h, pw=p_w)


class VoxViTPatchEmbedding(nn.Module):
    """Linear projection of flattened 3D patches plus learned position embeddings (MONAI `PatchEmbeddingBlock`)."""

    def __init__(self, config: VoxViTConfig):
        super().__init__()
        self.patch_size = tuple(config.patch_size)
        # A Linear over flattened patches equals MONAI's `conv` projection with permuted weights, so one
        # implementation serves both MONAI patch-embedding types (the converter permutes conv kernels).
        self.patch_embeddings = nn.Linear(config.patch_dim, config.hidden_size)
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = patchify(pixel_values, self.patch_size)  # (B, N, P)
        embeddings = self.patch_embeddings(patches) + self.position_embeddings  # (B, N, E)
        return self.dropout(embeddings)


class VoxViTAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection, computed by `scaled_dot_product_attention`."""

    def __init__(self, config: VoxViTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.dropout_p = config.attention_dropout
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.drop_output = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, N, E)`): tokens.
            attention_mask (`torch.Tensor` of shape `(B, 1, N, N)`, *optional*): boolean, `True` where a query may
                attend to a key.
            output_attentions (`bool`): also return the attention weights `(B, heads, N, N)`.
        """
        # (B, N, 3E) -> 3 x (B, heads, N, E / heads); MONAI's layout: "b n (qkv heads d)"
        query, key, value = rearrange(
            self.qkv(hidden_states), "b n (three h d) -> three b h n d", three=3, h=self.num_heads
        )
        dropout_p = self.dropout_p if self.training else 0.0
        if output_attentions:
            scores = query @ key.transpose(-2, -1) * query.shape[-1] ** -0.5  # (B, heads, N, N)
            if attention_mask is not None:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            weights = F.dropout(scores.softmax(dim=-1), p=dropout_p, training=self.training)
            context = weights @ value
        else:
            weights = None
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout_p)
        context = rearrange(context, "b h n d -> b n (h d)")  # (B, heads, N, d) -> (B, N, E)
        return self.drop_output(self.out_proj(context)), weights


class VoxViTMLP(nn.Module):
    """Two-layer GELU MLP (MONAI `MLPBlock` in its `vit` dropout mode)."""

    def __init__(self, config: VoxViTConfig):
        super().__init__()
        self.linear1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.drop1 = nn.Dropout(config.hidden_dropout_prob)
        self.drop2 = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.linear2(self.drop1(F.gelu(self.linear1(hidden_states)))))


class VoxViTBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`."""

    def __init__(self, config: VoxViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = VoxViTAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VoxViTMLP(config)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, weights = self.attn(self.norm1(hidden_states), attention_mask, output_attentions)
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.norm2(hidden_states))
        return hidden_states, weights


class VoxViTPreTrainedModel(PreTrainedModel):
    config_class = VoxViTConfig
    config: VoxViTConfig
    base_model_prefix = "vox_vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["VoxViTBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, VoxViTPatchEmbedding):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, VoxViTModel):
            init.zeros_(module.cls_token)


class VoxViTModel(VoxViTPreTrainedModel):
    r"""
    The VoxViT encoder. Input volumes `(B, C, D, H, W)` in [0, 1] (as `VoxVolumeProcessor` produces them); output
    `last_hidden_state` `(B, 1 + N, E)` after the final LayerNorm (index 0 is CLS) and `pooler_output` `(B, E)`, the
    CLS token.
    """

    def __init__(self, config: VoxViTConfig):
        super().__init__(config)
        self.patch_embedding = VoxViTPatchEmbedding(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.blocks = nn.ModuleList([VoxViTBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def check_pixel_values(self, pixel_values: torch.Tensor):
        """Raise `ValueError` with the expected and the given shape when a volume does not fit this encoder."""
        expected = (self.config.num_channels, *self.config.image_size)
        if pixel_values.dim() != 5 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"VoxViT expects pixel_values of shape (B, {', '.join(map(str, expected))}) (B, C, D, H, W); "
                f"got {tuple(pixel_values.shape)}. Preprocess volumes with VoxVolumeProcessor."
            )

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch tokens with position embeddings, CLS prepended: `(B, C, D, H, W)` -> `(B, 1 + N, E)`."""
        self.check_pixel_values(pixel_values)
        tokens = self.patch_embedding(pixel_values.to(self.patch_embedding.patch_embeddings.weight.dtype))
        # Note: MONAI adds position embeddings to patch tokens only, then prepends CLS (monai/networks/nets/vit.py).
        cls_tokens = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, E)
        return torch.cat([cls_tokens, tokens], dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(B, C, D, H, W)`): preprocessed volumes.
            output_attentions (`bool`, *optional*): return each block's attention weights `(B, heads, 1 + N, 1 + N)`
                (computed eagerly instead of with SDPA).
            output_hidden_states (`bool`, *optional*): return the embeddings and each block's output `(B, 1 + N, E)`.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        hidden_states = self.embed(pixel_values)  # (B, 1 + N, E)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for block in self.blocks:
            hidden_states, weights = block(hidden_states, None, output_attentions)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)
        last_hidden_state = self.norm(hidden_states)
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=last_hidden_state[:, 0],
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )


__all__ = ["VoxViTModel", "VoxViTPreTrainedModel", "patchify"]
