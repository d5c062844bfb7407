"""VoxViT: a 3D vision transformer for CT and MRI volumes, with MONAI-compatible parameter names.

The encoder is written here rather than imported from MONAI so that `trust_remote_code` users need nothing beyond
torch, transformers and einops. Parameter names follow `monai.networks.nets.ViT` (`patch_embedding`, `blocks.{i}.attn.qkv`,
`blocks.{i}.mlp.linear1`, ...), so M3D-CLIP and MONAI checkpoints convert with a handful of key renames
(`convert_m3d.py`), and a test proves numerical equivalence with MONAI.

    volume (B, C, D, H, W)
      -> patchify (B, N, p_d * p_h * p_w * C) -> Linear -> + position embeddings -> [CLS] + tokens (B, 1 + N, E)
      -> num_hidden_layers x [pre-norm self-attention + pre-norm MLP] -> LayerNorm

Attention runs through transformers' attention interface, so `attn_implementation="eager" | "sdpa"` (in
`from_pretrained` or `set_attn_implementation`) picks the kernel; `output_attentions=True` computes eagerly, as only
eager attention has weights to return.

MAE-style masking: `keep_ids (B, K)` keeps CLS and K patch tokens after the position embeddings are added, so the
blocks see `(B, 1 + K, E)` and each kept token still knows its grid position (VoxCLIP's masked-volume terms).

Study mode (HLIP, seed 001) takes the S scans of a study at once:

    study (B, S, C, D, H, W) + scan_mask (B, S)
      -> each scan embedded as above, + scan-order embedding (scans 1..S-1)       tokens (B, S, 1 + N, E)
      -> each block regroups the tokens by its attention level and runs the same SDPA block on the groups:
           slice: (B * S * D', 1 + H' W', E)   one axial slab of patches of one scan + a copy of the scan's CLS
           scan:  (B * S, 1 + N, E)            one scan
           study: (B, S (1 + N), E)            the whole study; tokens of padded scans are masked out as keys
      -> LayerNorm -> per-scan tokens (B, S, 1 + N, E); study embedding = mean of the valid scans' CLS (B, E)

CLS handling: every scan keeps its own CLS token (the single-scan encoder's). Slice groups each get a copy of their
scan's CLS, and the copies are averaged back into one when a run of slice blocks ends (as HLIP's `_slice2scan`
does); in study blocks the S CLS tokens attend across the study like any token. Unlike HLIP's single study CLS, this
keeps a one-scan study numerically identical to the single-scan encoder and gives per-scan summaries for free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from huggingface_hub import ModelCard, ModelCardData
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

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


def sincos_position_embeddings(grid_size, hidden_size: int) -> torch.Tensor:
    """Fixed 3D sine-cosine position embeddings of a patch grid (HLIP / MAE style, one third of the width per axis).

    Args:
        grid_size (`tuple[int, int, int]`): patch grid `(D', H', W')`.
        hidden_size (`int`): token width `E`.

    Returns:
        `torch.Tensor` of shape `(1, D' H' W', E)` in row-major grid order (the order of [`patchify`]). Each axis gets
        `2 * (E // 6)` channels (half sine, half cosine, frequencies `1 / 10000^(i / k)`); the `E % 6` channels left over
        stay zero, so any width works rather than only multiples of 6.
    """
    half_width = hidden_size // 6  # sine (or cosine) channels per axis
    frequencies = 1.0 / 10000 ** (torch.arange(half_width, dtype=torch.float64) / max(half_width, 1))  # (k,)
    axes = torch.meshgrid(*(torch.arange(size, dtype=torch.float64) for size in grid_size), indexing="ij")
    parts = []
    for positions in axes:
        angles = positions.reshape(-1, 1) * frequencies  # (N, k)
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)  # (N, 6k)
    table = F.pad(table, (0, hidden_size - table.shape[1]))  # (N, 6k) -> (N, E)
    return table.float().unsqueeze(0)


class VoxViTPatchEmbedding(nn.Module):
    """Linear projection of flattened 3D patches plus position embeddings (MONAI `PatchEmbeddingBlock`).

    With `position_embedding_type="learned"` the position embeddings are a trained parameter (MONAI, M3D); with
    `"sincos"` they are a fixed buffer of the same name and shape, saved with the weights so checkpoints are
    self-contained, and untouched by `requires_grad_` or optimisers.
    """

    def __init__(self, config: VoxViTConfig):
        super().__init__()
        self.patch_size = tuple(config.patch_size)
        self.position_embedding_type = config.position_embedding_type
        # A Linear over flattened patches equals MONAI's `conv` projection with permuted weights, so one
        # implementation serves both MONAI patch-embedding types (the converter permutes conv kernels).
        self.patch_embeddings = nn.Linear(config.patch_dim, config.hidden_size)
        if config.position_embedding_type == "sincos":
            self.register_buffer(
                "position_embeddings", sincos_position_embeddings(config.grid_size, config.hidden_size)
            )
        else:
            self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = patchify(pixel_values, self.patch_size)  # (B, N, P)
        embeddings = self.patch_embeddings(patches) + self.position_embeddings  # (B, N, E)
        return self.dropout(embeddings)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    is_causal: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention computed by hand: `attn_implementation="eager"`, and the one implementation that returns weights.
    The signature and output layout are those of transformers' attention functions (`ALL_ATTENTION_FUNCTIONS`).

    Args:
        module (`nn.Module`): the calling attention module (its `training` flag switches dropout on).
        query (`torch.Tensor` of shape `(B, heads, N, d)`), key, value (`torch.Tensor` of shape `(B, heads, M, d)`).
        attention_mask (`torch.Tensor` of shape `(B, 1, N or 1, M)`, *optional*): boolean, `True` where a query may
            attend to a key.
        scaling (`float`): the score scale, `d ** -0.5`.
        dropout (`float`, defaults to 0.0): dropout on the attention weights.
        is_causal (`bool`, defaults to `False`): also hide the keys after each query (aligned top-left, as SDPA does).

    Returns:
        `(output (B, N, heads, d), weights (B, heads, N, M))`.

    Every attention module of voxlm passes boolean masks `(B, 1, N or 1, M)` or none (non-causal, or `is_causal`), the
    contract that this function and SDPA share; that is why the models advertise `_supports_sdpa` and no other kernel.
    """
    scores = query @ key.transpose(-2, -1) * scaling  # (B, heads, N, M)
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()  # (N, M)
        attention_mask = causal if attention_mask is None else attention_mask & causal
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2), weights  # (B, heads, N, d) -> (B, N, heads, d)


class VoxViTAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection, computed by the implementation the config names."""

    def __init__(self, config: VoxViTConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.scaling = (config.hidden_size // config.num_attention_heads) ** -0.5
        self.dropout_p = config.attention_dropout
        self.is_causal = False  # read by transformers' SDPA and flash functions, which default to causal
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.drop_output = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, N, E)`): tokens.
            attention_mask (`torch.Tensor` of shape `(B, 1, N or 1, N)`, *optional*): boolean, `True` where a query
                may attend to a key.
            output_attentions (`bool`): compute eagerly and also return the attention weights `(B, heads, N, N)`.
        """
        # (B, N, 3E) -> 3 x (B, heads, N, E / heads); MONAI's layout: "b n (qkv heads d)"
        query, key, value = rearrange(
            self.qkv(hidden_states), "b n (three h d) -> three b h n d", three=3, h=self.num_heads
        )
        if output_attentions:  # only eager attention computes the weights, whatever the config names
            attention_interface: Callable = eager_attention_forward
        else:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        context, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.dropout_p if self.training else 0.0,
        )
        context = rearrange(context, "b n h d -> b n (h d)")  # (B, N, heads, d) -> (B, N, E)
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


def write_model_card_if_missing(model: PreTrainedModel, save_directory, pipeline_tag: str, **save_kwargs) -> None:
    """After `save_pretrained`: a `README.md` with the Hub metadata (library, pipeline tag, tags) and how to load the
    folder, unless the folder has a card (voxlm's training stages write fuller ones, with lineage and results)."""
    card_path = Path(save_directory) / "README.md"
    if card_path.exists() or not save_kwargs.get("is_main_process", True):
        return
    name = type(model).__name__
    data = ModelCardData(library_name="transformers", pipeline_tag=pipeline_tag, tags=["medical", "3d", "voxlm"])
    ModelCard(
        f"---\n{data.to_yaml()}\n---\n\n# {name}\n\nA {name} saved with `save_pretrained` (the `voxlm` package: 3D "
        "medical vision-language models). Research use only, never on patients.\n\n```python\nfrom transformers "
        "import AutoModel, AutoProcessor\n\nmodel = AutoModel.from_pretrained(path, trust_remote_code=True)  # or "
        "`import voxlm` first\nprocessor = AutoProcessor.from_pretrained(path, trust_remote_code=True)\n```\n"
    ).save(card_path)


class VoxViTPreTrainedModel(PreTrainedModel):
    config_class = VoxViTConfig
    config: VoxViTConfig
    base_model_prefix = "vox_vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["VoxViTBlock"]
    _supports_sdpa = True

    def save_pretrained(self, save_directory, **kwargs):
        """`PreTrainedModel.save_pretrained`, and a model card with the Hub metadata when the folder has none."""
        super().save_pretrained(save_directory, **kwargs)
        write_model_card_if_missing(self, save_directory, "feature-extraction", **kwargs)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, VoxViTPatchEmbedding):
            if module.position_embedding_type == "sincos":
                table = sincos_position_embeddings(self.config.grid_size, self.config.hidden_size)
                init.copy_(module.position_embeddings, table)
            else:
                init.trunc_normal_(module.position_embeddings, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, VoxViTModel):
            init.zeros_(module.cls_token)
            if module.scan_embeddings is not None:
                init.trunc_normal_(module.scan_embeddings, mean=0.0, std=self.config.initializer_range)


def pool_scan_tokens(last_hidden_state: torch.Tensor, pooling: str) -> torch.Tensor:
    """One embedding per scan: its CLS token, or the mean or max of its patch tokens: `(..., 1 + N, E)` -> `(..., E)`."""
    if pooling == "cls":
        return last_hidden_state[..., 0, :]
    patch_tokens = last_hidden_state[..., 1:, :]  # (..., N, E)
    return patch_tokens.mean(dim=-2) if pooling == "mean" else patch_tokens.amax(dim=-2)


@dataclass
class VoxViTModelOutput(BaseModelOutputWithPooling):
    r"""
    Output of [`VoxViTModel`]. For a single volume `(B, C, D, H, W)` the fields are those of
    `BaseModelOutputWithPooling`; for a study `(B, S, C, D, H, W)` they carry a scan axis.

    Args:
        last_hidden_state (`torch.Tensor` of shape `(B, 1 + N, E)` or `(B, S, 1 + N, E)`):
            Tokens after the final LayerNorm; index 0 of each scan is its CLS token. With `keep_ids (B, K)`,
            `(B, 1 + K, E)`: CLS, then the kept patches in `keep_ids` order.
        pooler_output (`torch.Tensor` of shape `(B, E)`):
            The volume embedding (`config.pooling`: CLS token by default, or mean / max over patch tokens); for a
            study, the mean of its valid scans' embeddings.
        hidden_states (`tuple[torch.Tensor]`, *optional*):
            The embeddings and each block's output, shaped like `last_hidden_state` (before the final LayerNorm).
        attentions (`tuple[torch.Tensor]`, *optional*):
            Each block's attention weights `(groups, heads, n, n)` over its groups: `B * S` scans of `1 + N` tokens,
            `B * S * D'` slabs of `1 + H' W'` tokens, or `B` studies of `S (1 + N)` tokens.
        scan_mask (`torch.Tensor` of shape `(B, S)`, *optional*):
            For a study, `True` for the real scans (all `True` when no mask was given); `None` for a volume.
    """

    scan_mask: torch.Tensor | None = None


class VoxViTModel(VoxViTPreTrainedModel):
    r"""
    The VoxViT encoder. Input volumes `(B, C, D, H, W)` in [0, 1] (as `VoxVolumeProcessor` produces them); output
    `last_hidden_state` `(B, 1 + N, E)` after the final LayerNorm (index 0 is CLS) and `pooler_output` `(B, E)`, the
    CLS token or the pooled patch tokens (`config.pooling`). Studies `(B, S, C, D, H, W)` with an optional
    `scan_mask (B, S)` run HLIP hierarchical attention as `config.attention_levels` assigns it (module docstring) and give per-scan tokens `(B, S, 1 + N, E)` and a study
    embedding `(B, E)`.
    """

    def __init__(self, config: VoxViTConfig):
        super().__init__(config)
        self.patch_embedding = VoxViTPatchEmbedding(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        # Scan 0 gets no scan-order embedding, so a one-scan study is exactly the single-scan encoder and single-scan
        # checkpoints (M3D-CLIP) start study training from where they are.
        self.scan_embeddings = (
            nn.Parameter(torch.zeros(config.max_scans - 1, config.hidden_size)) if config.max_scans > 1 else None
        )
        self.blocks = nn.ModuleList([VoxViTBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def no_weight_decay(self) -> set[str]:
        """Names, as in `named_parameters()`, of the matrix parameters that AdamW must not decay (timm / MAE
        convention); 1-D parameters (biases, norm weights) are left to the optimiser's `dim < 2` rule.

        - `patch_embedding.position_embeddings` (learned type only; the sine-cosine table is a buffer),
        - `cls_token`,
        - `scan_embeddings` (when `max_scans > 1`).

        Each is a table added to the tokens, not a map applied to them: decay only pulls it toward zero, that is toward
        "no position", "no summary token", "no scan order", and nothing in the loss asks for that.

        Returns:
            `set[str]`: the names of those that this encoder holds.
        """
        names = {"patch_embedding.position_embeddings", "cls_token", "scan_embeddings"}
        return names & dict(self.named_parameters()).keys()

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

    def check_keep_ids(self, keep_ids: torch.Tensor, pixel_values: torch.Tensor):
        """Raise `ValueError` when `keep_ids` cannot select patches of `pixel_values`: a study, an encoder with slice
        attention (its slabs need the whole patch grid), a shape other than `(B, K)` with `1 <= K <= N`, a float
        dtype, or an index outside `[0, N)` or repeated."""
        if pixel_values.dim() == 6:
            raise ValueError("keep_ids masks single volumes (B, C, D, H, W); a study (B, S, C, D, H, W) takes none")
        if "slice" in self.config.block_attention_levels:
            raise ValueError(
                "keep_ids needs scan or study attention in every block (slice attention groups the full patch grid "
                f"into slabs); this VoxViT's attention_levels are {list(self.config.block_attention_levels)}"
            )
        batch_size, num_patches = pixel_values.shape[0], self.config.num_patches
        if keep_ids.dim() != 2 or keep_ids.shape[0] != batch_size or not 1 <= keep_ids.shape[1] <= num_patches:
            raise ValueError(
                f"keep_ids must have shape (B, K) = ({batch_size}, K) with 1 <= K <= {num_patches} patches; "
                f"got {tuple(keep_ids.shape)}"
            )
        if keep_ids.is_floating_point() or keep_ids.is_complex() or keep_ids.dtype == torch.bool:
            raise ValueError(f"keep_ids must hold integer patch indices, got dtype {keep_ids.dtype}")
        if bool((keep_ids < 0).any() | (keep_ids >= num_patches).any()):
            raise ValueError(
                f"keep_ids must lie in [0, {num_patches}) (the patch grid); got values in "
                f"[{int(keep_ids.min())}, {int(keep_ids.max())}]"
            )
        if bool((keep_ids.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise ValueError("keep_ids repeats a patch index within a row; each kept patch must be listed once")

    @staticmethod
    def keep_patch_tokens(hidden_states: torch.Tensor, keep_ids: torch.Tensor) -> torch.Tensor:
        """CLS and the kept patch tokens of one-scan studies (MAE's masking), in `keep_ids` order.

        Args:
            hidden_states (`torch.Tensor` of shape `(B, 1, 1 + N, E)`): embedded tokens, position embeddings added.
            keep_ids (`torch.LongTensor` of shape `(B, K)`): the patches to keep.

        Returns:
            `torch.Tensor` of shape `(B, 1, 1 + K, E)`.
        """
        index = keep_ids[:, None, :, None].expand(-1, -1, -1, hidden_states.shape[-1])  # (B, K) -> (B, 1, K, E)
        patches = hidden_states[:, :, 1:].gather(2, index)  # (B, 1, K, E)
        return torch.cat([hidden_states[:, :, :1], patches], dim=2)

    def check_study(self, pixel_values: torch.Tensor, scan_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Raise `ValueError` when a study `(B, S, C, D, H, W)` or its `scan_mask (B, S)` does not fit this encoder.

        Returns:
            The mask as booleans `(B, S)`, or `None` when none was given (every scan is real).
        """
        expected = (self.config.num_channels, *self.config.image_size)
        if pixel_values.dim() != 6 or tuple(pixel_values.shape[2:]) != expected:
            raise ValueError(
                f"VoxViT expects a study of shape (B, S, {', '.join(map(str, expected))}) (B, S, C, D, H, W); "
                f"got {tuple(pixel_values.shape)}"
            )
        num_scans = pixel_values.shape[1]
        if num_scans > self.config.max_scans:
            raise ValueError(
                f"the study holds {num_scans} scans but `max_scans` of this VoxViT config is {self.config.max_scans}"
            )
        if scan_mask is None:
            return None
        if tuple(scan_mask.shape) != tuple(pixel_values.shape[:2]):
            raise ValueError(
                f"scan_mask must have shape (B, S) = {tuple(pixel_values.shape[:2])}, got {tuple(scan_mask.shape)}"
            )
        scan_mask = scan_mask.to(device=pixel_values.device, dtype=torch.bool)
        if not scan_mask.any(dim=1).all():
            raise ValueError("scan_mask marks every scan of a study as padding; each study needs one real scan")
        return scan_mask

    def embed_study(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Embed every scan of a study and add the scan-order embedding to the patch tokens of scans 1..S-1.

        Args:
            pixel_values (`torch.Tensor` of shape `(B, S, C, D, H, W)`): the scans of each study.

        Returns:
            `torch.Tensor` of shape `(B, S, 1 + N, E)`: per scan, CLS then its patch tokens.
        """
        batch_size, num_scans = pixel_values.shape[:2]
        scans = rearrange(pixel_values, "b s c d h w -> (b s) c d h w")  # (B, S, C, D, H, W) -> (B S, C, D, H, W)
        tokens = rearrange(self.embed(scans), "(b s) n e -> b s n e", b=batch_size)  # -> (B, S, 1 + N, E)
        if num_scans == 1:
            return tokens
        scan_offsets = F.pad(self.scan_embeddings[: num_scans - 1], (0, 0, 1, 0))  # (S - 1, E) -> (S, E), scan 0: zero
        patches = tokens[:, :, 1:] + scan_offsets[:, None].to(tokens.dtype)  # (B, S, N, E)
        return torch.cat([tokens[:, :, :1], patches], dim=2)

    def group_tokens(
        self, hidden_states: torch.Tensor, level: str, scan_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Regroup study tokens so that attention over the batch axis is attention within one `level` group.

        Args:
            hidden_states (`torch.Tensor` of shape `(B, S, 1 + N, E)`): study tokens, CLS first in each scan.
            level (`str`): `"slice"`, `"scan"` or `"study"`.
            scan_mask (`torch.Tensor` of shape `(B, S)`, *optional*): `True` for real scans.

        Returns:
            The groups `(G, n, E)` and, for study groups with a mask, the key mask `(B, 1, 1, S (1 + N))`.
        """
        if level == "scan":
            return rearrange(hidden_states, "b s n e -> (b s) n e"), None  # (B, S, 1 + N, E) -> (B S, 1 + N, E)
        if level == "study":
            groups = rearrange(hidden_states, "b s n e -> b (s n) e")  # (B, S, 1 + N, E) -> (B, S (1 + N), E)
            if scan_mask is None:
                return groups, None
            key_mask = repeat(scan_mask, "b s -> b 1 1 (s n)", n=hidden_states.shape[2])  # (B, 1, 1, S (1 + N))
            return groups, key_mask
        depth = self.config.grid_size[0]
        # (B, S, N, E) -> (B, S, D', H' W', E): patchify orders tokens depth first, so a slab is a contiguous run
        slabs = rearrange(hidden_states[:, :, 1:], "b s (d hw) e -> b s d hw e", d=depth)
        cls_copies = hidden_states[:, :, None, :1].expand(-1, -1, depth, -1, -1)  # (B, S, D', 1, E)
        groups = torch.cat([cls_copies, slabs], dim=3)  # (B, S, D', 1 + H' W', E)
        return rearrange(groups, "b s d n e -> (b s d) n e"), None  # -> (B S D', 1 + H' W', E)

    def ungroup_tokens(self, groups: torch.Tensor, level: str, num_scans: int) -> torch.Tensor:
        """Inverse of [`group_tokens`]: `(G, n, E)` -> `(B, S, 1 + N, E)`; slice CLS copies are averaged into one."""
        if level == "scan":
            return rearrange(groups, "(b s) n e -> b s n e", s=num_scans)  # (B S, 1 + N, E) -> (B, S, 1 + N, E)
        if level == "study":
            return rearrange(groups, "b (s n) e -> b s n e", s=num_scans)  # (B, S (1 + N), E) -> (B, S, 1 + N, E)
        # (B S D', 1 + H' W', E) -> (B, S, D', 1 + H' W', E)
        slabs = rearrange(groups, "(b s d) n e -> b s d n e", s=num_scans, d=self.config.grid_size[0])
        cls_tokens = slabs[:, :, :, :1].mean(dim=2)  # (B, S, 1, E)
        patches = rearrange(slabs[:, :, :, 1:], "b s d hw e -> b s (d hw) e")  # (B, S, N, E)
        return torch.cat([cls_tokens, patches], dim=2)

    def forward_blocks(
        self,
        hidden_states: torch.Tensor,
        scan_mask: torch.Tensor | None,
        output_attentions: bool,
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        """Run the blocks, regrouping tokens once per run of consecutive blocks with the same attention level.

        Args:
            hidden_states (`torch.Tensor` of shape `(B, S, 1 + N, E)`): embedded study tokens.
            scan_mask (`torch.Tensor` of shape `(B, S)`, *optional*): `True` for real scans.

        Returns:
            The block output `(B, S, 1 + N, E)`, the hidden states per block (or `None`) and the attention weights per
            block (or `None`).
        """
        num_scans = hidden_states.shape[1]
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        levels_and_blocks = zip(self.config.block_attention_levels, self.blocks)
        for level, run in groupby(levels_and_blocks, key=lambda level_and_block: level_and_block[0]):
            groups, attention_mask = self.group_tokens(hidden_states, level, scan_mask)
            for _, block in run:
                groups, weights = block(groups, attention_mask, output_attentions)
                if output_hidden_states:
                    all_hidden_states += (self.ungroup_tokens(groups, level, num_scans),)
                if output_attentions:
                    all_attentions += (weights,)
            hidden_states = self.ungroup_tokens(groups, level, num_scans)
        return hidden_states, all_hidden_states, all_attentions

    def pool_scans(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """One embedding per scan as `config.pooling` says: `(B, S, 1 + N, E)` -> `(B, S, E)`."""
        return pool_scan_tokens(last_hidden_state, self.config.pooling)

    @staticmethod
    def pool_study(scan_embeddings: torch.Tensor, scan_mask: torch.Tensor | None) -> torch.Tensor:
        """Study embedding: the mean scan embedding over real scans, `(B, S, E)` -> `(B, E)`."""
        if scan_mask is None:
            return scan_embeddings.mean(dim=1)
        weights = scan_mask.to(scan_embeddings.dtype).unsqueeze(-1)  # (B, S, 1)
        return (scan_embeddings * weights).sum(dim=1) / weights.sum(dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        scan_mask: torch.Tensor | None = None,
        keep_ids: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> VoxViTModelOutput:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(B, C, D, H, W)` or `(B, S, C, D, H, W)`): preprocessed volumes,
                or studies of S scans each (padded to the same S; at most `config.max_scans`).
            scan_mask (`torch.Tensor` of shape `(B, S)`, *optional*): for studies, `True` (or 1) for real scans and
                `False` for padding; padded scans are hidden from study attention and left out of the study embedding.
            keep_ids (`torch.LongTensor` of shape `(B, K)`, *optional*): for volumes, the patches to keep (indices
                in [`patchify`]'s grid order, `1 <= K <= N`, none repeated; MAE's masking): the encoder runs on CLS and
                these K tokens only, and every output has `1 + K` tokens in `keep_ids` order (the pooled output pools
                them). Needs scan or study attention in every block; raises `ValueError` otherwise or for studies.
            output_attentions (`bool`, *optional*): return each block's attention weights (computed eagerly, whatever
                `config._attn_implementation` says); `(B, heads, 1 + N, 1 + N)` for a volume with scan attention, else
                see [`VoxViTModelOutput`].
            output_hidden_states (`bool`, *optional*): return the embeddings and each block's output.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        is_study = pixel_values.dim() == 6
        if keep_ids is not None:
            self.check_keep_ids(keep_ids, pixel_values)
        if is_study:
            scan_mask = self.check_study(pixel_values, scan_mask)
        else:
            self.check_pixel_values(pixel_values)
            pixel_values = pixel_values.unsqueeze(1)  # (B, C, D, H, W) -> (B, 1, C, D, H, W): a one-scan study
        hidden_states = self.embed_study(pixel_values)  # (B, S, 1 + N, E)
        if keep_ids is not None:
            hidden_states = self.keep_patch_tokens(hidden_states, keep_ids.to(hidden_states.device))  # (B, 1, 1 + K, E)
        hidden_states, all_hidden_states, all_attentions = self.forward_blocks(
            hidden_states, scan_mask, output_attentions, output_hidden_states
        )
        last_hidden_state = self.norm(hidden_states)  # (B, S, 1 + N, E)
        if not is_study:
            return VoxViTModelOutput(
                last_hidden_state=last_hidden_state[:, 0],
                pooler_output=self.pool_scans(last_hidden_state)[:, 0],
                hidden_states=tuple(state[:, 0] for state in all_hidden_states) if output_hidden_states else None,
                attentions=all_attentions,
            )
        if scan_mask is None:
            scan_mask = torch.ones(pixel_values.shape[:2], dtype=torch.bool, device=pixel_values.device)
        return VoxViTModelOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=self.pool_study(self.pool_scans(last_hidden_state), scan_mask),
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            scan_mask=scan_mask,
        )


__all__ = ["VoxViTModel", "VoxViTModelOutput", "VoxViTPreTrainedModel", "patchify", "sincos_position_embeddings"]
