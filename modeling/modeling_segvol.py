"""SegVol, M3D-LaMed's `[SEG]` mask decoder, as a VoxLM segmentation head (`seg_config.head_type="segvol"`).

    volume (B, 1, D, H, W)                       the LLM's pixel_values
      -> SegVolImageEncoder                      a MONAI-style ViT without CLS -> (B, N, E), the grid (B, E, D', H', W')
    prompt state (B, E_llm)                      the LLM's `[SEG]` (or previous-token) hidden state
      -> prompt_projector                        Linear-ReLU-Linear-Dropout (M3D's `seg_projector`) -> text (B, E)
      -> SegVolPromptEncoder                     sparse prompt = the text token (B, 1, E); dense = "no mask" (B, E, grid)
      -> SegVolMaskDecoder                       SAM's two-way transformer over IoU + mask tokens + text and the image,
                                                 4x transposed-conv upscaling, hypernetwork of mask token 0, plus the
                                                 text-to-image similarity -> (B, 1, 4 D', 4 H', 4 W')
      -> trilinear upsampling                    mask logits (B, 1, D, H, W)

M3D builds it in LaMed/src/model/segmentation_module/ (segvol.py, segment_anything_volumetric/) for text prompts only;
point, box and mask prompts, SAM's IoU head and the hypernetworks of mask tokens 1..3, which LaMed never reads, are
not built (the M3D converter reports their weights as skipped). voxlm's own `VoxSegHead` (modeling_voxlm.py) is
lighter and reads the LLM encoder's patch features instead of running a second ViT.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_voxlm import VoxLMConfig
from .modeling_voxvit import VoxViTBlock, VoxViTPatchEmbedding, eager_attention_forward


class SegVolImageEncoder(nn.Module):
    """SegVol's ViT (MONAI `ViT`, `classification=False`: no CLS token), built from VoxViT's blocks so that its
    weights convert with the VoxViT converter.

    Args:
        config (`VoxLMConfig`): its `seg_config.image_encoder_config` gives the sizes; its own `_attn_implementation`
            drives the attention, as it drives the rest of the seg head (transformers sets it on the sub-configs of
            the sub-models it knows, which the seg head's nested encoder config is not).
    """

    def __init__(self, config: VoxLMConfig):
        super().__init__()
        encoder = config.seg_config.image_encoder_config
        self.grid_size = tuple(encoder.grid_size)
        self.patch_embedding = VoxViTPatchEmbedding(encoder)
        self.blocks = nn.ModuleList([VoxViTBlock(encoder) for _ in range(encoder.num_hidden_layers)])
        for block in self.blocks:
            block.attn.config = config  # read only for `_attn_implementation`, at each call
        self.norm = nn.LayerNorm(encoder.hidden_size, eps=encoder.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values (B, C, D, H, W)` -> the image embedding `(B, E, D', H', W')`."""
        hidden_states = self.patch_embedding(pixel_values)  # (B, N, E)
        for block in self.blocks:
            hidden_states = block(hidden_states)[0]
        d, h, w = self.grid_size
        return rearrange(self.norm(hidden_states), "b (d h w) e -> b e d h w", d=d, h=h, w=w)  # (B, N, E) -> grid


class SegVolPromptEncoder(nn.Module):
    """SAM's prompt encoder for a text prompt: the text embedding is the one sparse token, the dense prompt is the
    learned "no mask" embedding, and the image's positions are encoded with SAM's random Fourier features.

    Args:
        hidden_size (`int`): width `E`.
        grid_size (`tuple[int, int, int]`): the image embedding's grid `(D', H', W')`.
    """

    def __init__(self, hidden_size: int, grid_size):
        super().__init__()
        self.grid_size = tuple(grid_size)
        # A fixed random projection, saved with the weights (SAM's `PositionEmbeddingRandom`).
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, hidden_size // 2))
        self.no_mask_embedding = nn.Parameter(torch.zeros(1, hidden_size))

    def dense_positional_encoding(self) -> torch.Tensor:
        """The positional encoding of every image-embedding cell, `(1, E, D', H', W')`."""
        gaussian = self.positional_encoding_gaussian_matrix
        d, h, w = self.grid_size
        centres = [(torch.arange(n, device=gaussian.device, dtype=gaussian.dtype) + 0.5) / n for n in (d, h, w)]
        depth, height, width = torch.meshgrid(*centres, indexing="ij")  # 3 x (D', H', W'), cell centres in [0, 1]
        # Note: SAM's 2-D code stacks (x, y) = (column, row); its 3-D port in M3D (prompt_encoder.py) stacks
        # (axis 1, axis 0, axis 2) = (H, D, W), which the trained weights expect.
        coords = torch.stack([height, depth, width], dim=-1)  # (D', H', W', 3)
        projected = 2 * math.pi * ((2 * coords - 1) @ gaussian)  # (D', H', W', E / 2)
        encoding = torch.cat([projected.sin(), projected.cos()], dim=-1)  # (D', H', W', E)
        return rearrange(encoding, "d h w e -> 1 e d h w")

    def forward(self, text_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`text_embedding (B, E)` -> `(sparse (B, 1, E), dense (B, E, D', H', W'))`."""
        dense = self.no_mask_embedding.reshape(1, -1, 1, 1, 1).expand(text_embedding.shape[0], -1, *self.grid_size)
        return text_embedding[:, None], dense


class SegVolAttention(nn.Module):
    """SAM's attention: queries, keys and values projected apart to `E / downsample_rate`, then back to `E`.

    Args:
        config (`VoxLMConfig`): read for `_attn_implementation` at each call.
        hidden_size (`int`): width `E`.
        num_heads (`int`): heads (divide `E / downsample_rate`).
        downsample_rate (`int`, defaults to 1): the internal width's divisor.
    """

    def __init__(self, config: VoxLMConfig, hidden_size: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        self.config = config
        internal = hidden_size // downsample_rate
        self.num_heads = num_heads
        self.scaling = (internal // num_heads) ** -0.5
        self.is_causal = False  # read by transformers' SDPA and flash functions, which default to causal
        self.q_proj = nn.Linear(hidden_size, internal)
        self.k_proj = nn.Linear(hidden_size, internal)
        self.v_proj = nn.Linear(hidden_size, internal)
        self.out_proj = nn.Linear(internal, hidden_size)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query `(B, T, E)`, key and value `(B, M, E)` -> `(B, T, E)`."""
        query, key, value = (
            rearrange(projection(tokens), "b n (h d) -> b h n d", h=self.num_heads)  # (B, n, E') -> (B, h, n, d)
            for projection, tokens in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value))
        )
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, _ = attention_interface(self, query, key, value, None, scaling=self.scaling)
        return self.out_proj(rearrange(output, "b t h d -> b t (h d)"))  # (B, T, h, d) -> (B, T, E)


class SegVolTwoWayLayer(nn.Module):
    """One layer of SAM's two-way transformer: token self-attention, tokens to image, MLP, image to tokens. The
    token positions (`query_pe`, the initial tokens) and image positions are added to queries and keys, not values;
    the first layer's self-attention sees no positions and has no residual (SAM's `skip_first_layer_pe`)."""

    def __init__(self, config: VoxLMConfig, skip_first_layer_pe: bool):
        super().__init__()
        seg = config.seg_config
        width, heads, rate = seg.hidden_size, seg.num_attention_heads, seg.attention_downsample_rate
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = SegVolAttention(config, width, heads)
        self.norm1 = nn.LayerNorm(width)
        self.cross_attn_token_to_image = SegVolAttention(config, width, heads, rate)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, seg.intermediate_size), nn.ReLU(),
                                 nn.Linear(seg.intermediate_size, width))
        self.norm3 = nn.LayerNorm(width)
        self.norm4 = nn.LayerNorm(width)
        self.cross_attn_image_to_token = SegVolAttention(config, width, heads, rate)

    def forward(self, queries, keys, query_pe, key_pe):
        """queries `(B, T, E)`, keys `(B, N, E)`, query_pe `(B, T, E)`, key_pe `(B, N, E)` -> updated both."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            positioned = queries + query_pe
            queries = queries + self.self_attn(positioned, positioned, queries)
        queries = self.norm1(queries)
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, keys + key_pe, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(keys + key_pe, queries + query_pe, queries))
        return queries, keys


class SegVolMaskDecoder(nn.Module):
    """SAM's mask decoder as SegVol's 3-D port has it, for one (the first) mask and a text prompt.

    Args:
        config (`VoxLMConfig`): `seg_config` gives the widths; the image grid comes from its `image_encoder_config`.
    """

    def __init__(self, config: VoxLMConfig):
        super().__init__()
        seg = config.seg_config
        width = seg.hidden_size
        self.grid_size = tuple(seg.image_encoder_config.grid_size)
        self.iou_token = nn.Parameter(torch.zeros(1, width))
        self.mask_tokens = nn.Parameter(torch.zeros(seg.num_mask_tokens, width))
        self.layers = nn.ModuleList(
            [SegVolTwoWayLayer(config, skip_first_layer_pe=index == 0) for index in range(seg.num_hidden_layers)]
        )
        self.final_attn_token_to_image = SegVolAttention(
            config, width, seg.num_attention_heads, seg.attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(width)
        upscaled_grid = tuple(2 * n for n in self.grid_size)
        # Note: SegVol normalises the first upscaling over channels *and* space (mask_decoder.py), so the head is
        # tied to its image size, as M3D's is.
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(width, width // 4, kernel_size=2, stride=2),
            nn.LayerNorm((width // 4, *upscaled_grid)),
            nn.GELU(),
            nn.ConvTranspose3d(width // 4, width // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.mask_hypernetwork = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width // 8)
        )
        self.text_hypernetwork = nn.Linear(width, width // 8)

    def forward(self, image_embedding, image_pe, sparse_prompt, dense_prompt, text_embedding) -> torch.Tensor:
        """
        Args:
            image_embedding (`torch.Tensor` of shape `(B, E, D', H', W')`), image_pe (`(1, E, D', H', W')`),
            sparse_prompt (`(B, T_p, E)`), dense_prompt (`(B, E, D', H', W')`), text_embedding (`(B, E)`).

        Returns:
            `torch.Tensor` of shape `(B, 1, 4 D', 4 H', 4 W')`: low-resolution mask logits.
        """
        batch_size = sparse_prompt.shape[0]
        output_tokens = torch.cat([self.iou_token, self.mask_tokens], dim=0).expand(batch_size, -1, -1)  # (B, 1+M, E)
        tokens = torch.cat([output_tokens, sparse_prompt.to(output_tokens.dtype)], dim=1)  # (B, T, E)
        image = rearrange(image_embedding + dense_prompt, "b e d h w -> b (d h w) e")  # (B, N, E)
        image_pe = rearrange(image_pe, "b e d h w -> b (d h w) e").expand(batch_size, -1, -1)  # (B, N, E)
        queries, keys = tokens, image
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, image_pe)
        attended = self.final_attn_token_to_image(queries + tokens, keys + image_pe, keys)
        queries = self.norm_final_attn(queries + attended)  # (B, T, E)
        d, h, w = self.grid_size
        upscaled = self.output_upscaling(rearrange(keys, "b (d h w) e -> b e d h w", d=d, h=h, w=w))  # (B, E/8, 4x)
        mask_weights = self.mask_hypernetwork(queries[:, 1])  # mask token 0 -> (B, E / 8)
        text_weights = self.text_hypernetwork(text_embedding)  # (B, E / 8)
        # SAM's hypernetwork mask plus SegVol's text-to-image similarity, which share the upscaled embedding.
        return torch.einsum("bc,bcdhw->bdhw", mask_weights + text_weights, upscaled)[:, None]


class SegVolHead(nn.Module):
    """M3D-LaMed's SegVol segmentation head: the projected prompt state and SegVol's own view of the volume.

    It reads `pixel_values` (its ViT's input), where [`VoxSegHead`] reads the LLM encoder's patch features.

    Args:
        config (`VoxLMConfig`): with `seg_config.head_type == "segvol"`.
    """

    input_name = "pixel_values"

    def __init__(self, config: VoxLMConfig):
        super().__init__()
        seg = config.seg_config
        text_width = config.text_config.hidden_size
        self.image_size = tuple(seg.image_encoder_config.image_size)
        self.prompt_projector = nn.Sequential(
            nn.Linear(text_width, text_width),
            nn.ReLU(),
            nn.Linear(text_width, seg.hidden_size),
            nn.Dropout(seg.prompt_dropout),
        )
        self.image_encoder = SegVolImageEncoder(config)
        self.prompt_encoder = SegVolPromptEncoder(seg.hidden_size, seg.image_encoder_config.grid_size)
        self.mask_decoder = SegVolMaskDecoder(config)

    @staticmethod
    def no_weight_decay() -> set[str]:
        """The ViT's position embeddings, SAM's IoU and mask tokens and the "no mask" embedding (see
        `VoxLMForConditionalGeneration.no_weight_decay`)."""
        return {"image_encoder.patch_embedding.position_embeddings", "mask_decoder.iou_token",
                "mask_decoder.mask_tokens", "prompt_encoder.no_mask_embedding"}

    def forward(self, seg_hidden_states: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """
        Args:
            seg_hidden_states (`torch.Tensor` of shape `(B, E_llm)`): the prompt state of each sample.
            pixel_values (`torch.Tensor` of shape `(B, C, D, H, W)`): the same samples' volumes.

        Returns:
            `torch.Tensor` of shape `(B, 1, D, H, W)`: mask logits at the input size.
        """
        text_embedding = self.prompt_projector(seg_hidden_states)  # (B, E)
        image_embedding = self.image_encoder(pixel_values.to(text_embedding.dtype))  # (B, E, D', H', W')
        sparse, dense = self.prompt_encoder(text_embedding)  # (B, 1, E), (B, E, D', H', W')
        image_pe = self.prompt_encoder.dense_positional_encoding().to(image_embedding.dtype)  # (1, E, D', H', W')
        low_res = self.mask_decoder(image_embedding, image_pe, sparse, dense, text_embedding)
        return F.interpolate(low_res, size=self.image_size, mode="trilinear", align_corners=False)


__all__ = ["SegVolHead", "SegVolImageEncoder", "SegVolMaskDecoder", "SegVolPromptEncoder"]
