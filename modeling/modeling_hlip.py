"""HLIP (Zch0414/hlip, "Towards Scalable Language-Image Pre-training for 3D Medical Imaging"): its study encoder and
its open_clip image-text model, numerically equal to HLIP's `src/hlip/visual_encoder.py` inside open_clip's
`CustomTextCLIP`.

    study (B, S, 1, D, H, W)  (a volume (B, 1, D, H, W) is a one-scan study)
      -> Conv3d patches (B, S, D', H', W', E) + sine-cosine positions (3D table resampled to the grid, + scan row)
      -> groups of the first block's level, each with its own [CLS, registers]: slice (B S D', 1 + R + H' W', E),
         scan (B S, 1 + R + D' H' W', E) or study (B, 1 + R + S D' H' W', E)
      -> pre-norm -> ViT blocks; between levels the groups merge (prefix tokens averaged) or split (broadcast)
      -> merged into the study -> final norm -> CLS (B, E) -> Linear (no bias) -> image embedding (B, P)
    report ids (B, L) -> BERT last_hidden_state[:, 0] -> Linear (no bias) -> text embedding (B, P)

The tokens keep HLIP's order (scan, slice, row, column) throughout, so every regrouping is a reshape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_hlip import HLIPConfig, HLIPVisionConfig
from .modeling_voxvit import VoxViTBlock, sincos_position_embeddings


def hlip_spatial_positions(grid_size, hidden_size: int) -> torch.Tensor:
    """HLIP's 3D sine-cosine table (`pos_embed.get_3d_sincos_pos_embed`): `(1, D', H', W', E)`.

    It is voxlm's table ([`sincos_position_embeddings`]: per axis `E / 3` channels, sines then cosines) with the axes'
    blocks in HLIP's order, width first (`np.concatenate([emb_w, emb_h, emb_d])`).
    """
    table = sincos_position_embeddings(grid_size, hidden_size)  # (1, N, E), blocks (d, h, w)
    table = rearrange(table, "1 n (k c) -> 1 n k c", k=3).flip(2)  # (1, N, 3, E / 3), blocks (w, h, d)
    depth, height, width = grid_size
    return rearrange(table, "1 (d h w) k c -> 1 d h w (k c)", d=depth, h=height, w=width)  # (1, D', H', W', E)


def hlip_scan_positions(num_scans: int, hidden_size: int) -> torch.Tensor:
    """HLIP's 1D sine-cosine table of scan positions (`pos_embed.get_1d_sincos_pos_embed`): `(1, S_max, E)`."""
    frequencies = 1.0 / 10000 ** (torch.arange(hidden_size // 2, dtype=torch.float64) / (hidden_size / 2))  # (E / 2,)
    angles = torch.arange(num_scans, dtype=torch.float64)[:, None] * frequencies  # (S_max, E / 2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float().unsqueeze(0)


class HLIPVisionEmbeddings(nn.Module):
    """HLIP's `PatchEmbed3D` and `_pos_embed`: patch tokens plus fixed positions, and the CLS and register tokens.

    Both position tables are frozen in HLIP (`requires_grad = False` parameters); here they are persistent buffers
    of the same shapes, saved with the weights and left alone by optimisers.
    """

    def __init__(self, config: HLIPVisionConfig):
        super().__init__()
        self.config = config
        # timm's VisionTransformer builds the patch projection without a bias when it has a pre-norm.
        self.patch_embedding = nn.Conv3d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=not config.pre_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.register_tokens = (nn.Parameter(torch.zeros(1, config.num_register_tokens, config.hidden_size))
                                if config.num_register_tokens else None)
        self.register_buffer("spatial_position_embeddings", hlip_spatial_positions(config.grid_size,
                                                                                   config.hidden_size))
        if config.max_num_scans > 1:
            self.register_buffer("scan_position_embeddings", hlip_scan_positions(config.max_num_scans,
                                                                                 config.hidden_size))
        else:
            self.scan_position_embeddings = None

    def position_embeddings(self, num_scans: int, grid_size: tuple[int, int, int]) -> torch.Tensor:
        """Positions `(1, S, D', H', W', E)` for `num_scans` scans of patch grid `grid_size`.

        The 3D table is resampled trilinearly when the grid differs from the config's (HLIP's `resample_3d_posemb`).
        Scans take the first rows of the scan table, or a linear resampling of it beyond `max_num_scans`
        (`resample_1d_posemb` at inference).
        """
        spatial = self.spatial_position_embeddings.float()  # (1, D', H', W', E)
        if tuple(grid_size) != tuple(self.config.grid_size):
            spatial = rearrange(spatial, "1 d h w e -> 1 e d h w")
            spatial = F.interpolate(spatial, size=tuple(grid_size), mode="trilinear")
            spatial = rearrange(spatial, "1 e d h w -> 1 d h w e")
        if self.scan_position_embeddings is None:
            return spatial[:, None]  # (1, 1, D', H', W', E)
        # Note: HLIP samples random scan rows when its batch holds more than one study (`is_train = bs != 1` in
        # visual_encoder.py `_pos_embed`), even at inference; the first rows, its one-study behaviour, are used here.
        scans = self.scan_position_embeddings.float()  # (1, S_max, E)
        if num_scans > scans.shape[1]:
            scans = F.interpolate(scans.transpose(1, 2), size=num_scans, mode="linear").transpose(1, 2)
        scans = scans[:, :num_scans]  # (1, S, E)
        return scans[:, :, None, None, None, :] + spatial[:, None]  # (1, S, D', H', W', E)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(B, S, C, D, H, W)`): studies.

        Returns:
            `torch.Tensor` of shape `(B, S, D', H', W', E)`: the patch tokens with their positions.
        """
        batch_size, num_scans = pixel_values.shape[:2]
        scans = rearrange(pixel_values, "b s c d h w -> (b s) c d h w")
        patches = self.patch_embedding(scans)  # (B S, E, D', H', W')
        patches = rearrange(patches, "(b s) e d h w -> b s d h w e", b=batch_size)  # (B, S, D', H', W', E)
        return patches + self.position_embeddings(num_scans, patches.shape[2:5]).to(patches.dtype)

    def prefix_tokens(self, num_groups: int) -> torch.Tensor:
        """CLS then the register tokens, one copy per group: `(num_groups, 1 + R, E)`."""
        tokens = self.cls_token if self.register_tokens is None else torch.cat([self.cls_token, self.register_tokens],
                                                                               dim=1)
        return tokens.expand(num_groups, -1, -1)


def regroup(hidden_states: torch.Tensor, num_prefix: int, groups_from: int, groups_to: int) -> torch.Tensor:
    """Move tokens from one attention level to another (HLIP's `_slice2scan`, `_scan2study`, `_study2slice`, ...).

    Each group holds its prefix tokens, then its patch tokens in (scan, slice, row, column) order, so a coarser level
    concatenates consecutive groups and a finer one cuts them. Merging averages the prefix tokens of the merged
    groups; splitting gives each new group a copy of its parent's.

    Args:
        hidden_states (`torch.Tensor` of shape `(B G_from, P + L, E)`): the groups of the current level.
        num_prefix (`int`): `P`, CLS plus registers.
        groups_from (`int`), groups_to (`int`): groups per study at the current and the next level (slice: S D',
            scan: S, study: 1).

    Returns:
        `torch.Tensor` of shape `(B G_to, P + L G_from / G_to, E)`.
    """
    prefix, patches = hidden_states[:, :num_prefix], hidden_states[:, num_prefix:]  # (B G, P, E), (B G, L, E)
    if groups_to < groups_from:
        ratio = groups_from // groups_to
        prefix = reduce(prefix, "(g r) p e -> g p e", "mean", r=ratio)
        patches = rearrange(patches, "(g r) l e -> g (r l) e", r=ratio)
    elif groups_to > groups_from:
        ratio = groups_to // groups_from
        prefix = repeat(prefix, "g p e -> (g r) p e", r=ratio)
        patches = rearrange(patches, "g (r l) e -> (g r) l e", r=ratio)
    return torch.cat([prefix, patches], dim=1)


class HLIPPreTrainedModel(PreTrainedModel):
    config_class = HLIPConfig
    config: HLIPConfig
    base_model_prefix = "hlip"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["VoxViTBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, HLIPVisionEmbeddings):
            vision = module.config
            init.normal_(module.cls_token, std=1e-6)  # timm's ViT initialisation of prefix tokens
            if module.register_tokens is not None:
                init.normal_(module.register_tokens, std=1e-6)
            init.copy_(module.spatial_position_embeddings, hlip_spatial_positions(vision.grid_size,
                                                                                  vision.hidden_size))
            if module.scan_position_embeddings is not None:
                init.copy_(module.scan_position_embeddings, hlip_scan_positions(vision.max_num_scans,
                                                                                vision.hidden_size))
        elif isinstance(module, HLIPModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            init.zeros_(module.logit_bias)


class HLIPVisionModel(HLIPPreTrainedModel):
    r"""HLIP's study encoder (`HLIPVisualEncoder.forward_features` and timm's `token` pooling).

    `pixel_values` are in the axis order HLIP's network reads, `(D, H, W)` = (slices, rows, columns) of each scan as
    HLIP's data scripts store them (CT-RATE: axial slices first); voxlm's HLIP processor produces that array.
    """

    config_class = HLIPVisionConfig
    config: HLIPVisionConfig
    input_modalities = ("image",)

    def __init__(self, config: HLIPVisionConfig):
        super().__init__(config)
        self.embeddings = HLIPVisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_norm else None
        self.layers = nn.ModuleList([VoxViTBlock(config) for _ in range(config.num_hidden_layers)])
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    @staticmethod
    def groups_per_study(level: str, num_scans: int, num_slices: int) -> int:
        """How many attention groups a study of `num_scans` scans of `num_slices` patch slices has at `level`."""
        return {"slice": num_scans * num_slices, "scan": num_scans, "study": 1}[level]

    def check_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """A volume `(B, C, D, H, W)` as a one-scan study, a study `(B, S, C, D, H, W)` as it is; `ValueError` else."""
        if pixel_values.dim() == 5:
            pixel_values = pixel_values.unsqueeze(1)  # (B, C, D, H, W) -> (B, 1, C, D, H, W)
        if pixel_values.dim() != 6 or pixel_values.shape[2] != self.config.num_channels:
            raise ValueError(f"pixel_values must be (B, {self.config.num_channels}, D, H, W) or (B, S, "
                             f"{self.config.num_channels}, D, H, W), got {tuple(pixel_values.shape)}")
        too_small = [size for size, patch in zip(pixel_values.shape[3:], self.config.patch_size) if size < patch]
        if too_small:
            raise ValueError(f"pixel_values of spatial size {tuple(pixel_values.shape[3:])} are smaller than one "
                             f"patch {tuple(self.config.patch_size)}")
        return pixel_values

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool = True,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(B, C, D, H, W)` or `(B, S, C, D, H, W)`): volumes or studies of
                S scans each (all of one size; sizes other than `config.image_size` resample the position table).
            output_hidden_states (`bool`, *optional*): also return the input of every block and the last output, each
                merged into the study layout `(B, P + S N, E)`.
            return_dict (`bool`, *optional*, defaults to `True`): a `BaseModelOutputWithPooling`, else a tuple.

        Returns:
            `BaseModelOutputWithPooling`: `last_hidden_state (B, P + S N, E)` (CLS, registers, then the patch tokens
            of every scan in (scan, slice, row, column) order, after the final norm) and `pooler_output (B, E)` (the
            CLS token: HLIP's image feature before the projection).
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        pixel_values = self.check_pixel_values(pixel_values)
        tokens = self.embeddings(pixel_values)  # (B, S, D', H', W', E)
        batch_size, num_scans, num_slices = tokens.shape[:3]
        num_prefix = self.config.num_prefix_tokens
        groups = [self.groups_per_study(level, num_scans, num_slices) for level in self.config.attention_levels]
        hidden_states = rearrange(tokens, "b s d h w e -> b (s d h w) e")  # (B, S N, E)
        hidden_states = rearrange(hidden_states, "b (g l) e -> (b g) l e", g=groups[0])  # (B G, L, E)
        hidden_states = torch.cat([self.embeddings.prefix_tokens(hidden_states.shape[0]), hidden_states], dim=1)
        if self.pre_layernorm is not None:
            hidden_states = self.pre_layernorm(hidden_states)  # (B G, P + L, E)
        all_hidden_states = []
        for index, layer in enumerate(self.layers):
            if index > 0:
                hidden_states = regroup(hidden_states, num_prefix, groups[index - 1], groups[index])
            if output_hidden_states:
                all_hidden_states.append(regroup(hidden_states, num_prefix, groups[index], 1))
            hidden_states = layer(hidden_states)[0]
        hidden_states = regroup(hidden_states, num_prefix, groups[-1], 1)  # (B, P + S N, E)
        last_hidden_state = self.post_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        output = BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=last_hidden_state[:, 0],  # timm's `global_pool="token"`
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()


@dataclass
class HLIPOutput(ModelOutput):
    """Output of [`HLIPModel.forward`].

    Args:
        logits_per_image (`torch.Tensor` of shape `(B_img, B_txt)`), logits_per_text (`torch.Tensor` of shape
            `(B_txt, B_img)`): `exp(logit_scale)` times the cosine similarities, plus `logit_bias`.
        image_embeds (`torch.Tensor` of shape `(B_img, P)`), text_embeds (`torch.Tensor` of shape `(B_txt, P)`):
            L2-normalised embeddings.
    """

    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None


class HLIPModel(HLIPPreTrainedModel):
    r"""HLIP's image-text model (open_clip `CustomTextCLIP` with HLIP's timm tower and an `HFTextEncoder`).

    `get_image_features` / `get_text_features` return what open_clip's `encode_image` / `encode_text` return by
    default: the projected embeddings, not normalised; `forward` normalises them for the logits as open_clip does.
    """

    def __init__(self, config: HLIPConfig):
        super().__init__(config)
        self.vision_model = HLIPVisionModel(config.vision_config)
        self.text_model = AutoModel.from_config(config.text_config, add_pooling_layer=False)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.logit_bias = nn.Parameter(torch.tensor(0.0))
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, scan_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected (not normalised) embeddings `(B, P)` of volumes or of whole studies.

        Args:
            pixel_values (`torch.Tensor` of shape `(B, C, D, H, W)` or `(B, S, C, D, H, W)`): volumes, or studies of
                S scans each.
            scan_mask (`torch.Tensor` of shape `(B, S)`, *optional*): must mark every scan as real: HLIP's study
                attention has no padding mask, so studies of different scan counts are encoded one at a time.

        Raises:
            `ValueError`: a `scan_mask` with padded scans.
        """
        if scan_mask is not None and not bool(scan_mask.bool().all()):
            raise ValueError("HLIP's study attention has no padding mask: encode studies with different numbers of "
                             "scans one at a time (scan_mask must be all True)")
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def get_text_features(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected (not normalised) report embeddings `(B, P)`: the CLS token of the last hidden state.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`): token ids.
            attention_mask (`torch.Tensor` of shape `(B, L)`, *optional*): defaults to `input_ids != pad_token_id`,
                the mask open_clip's `HFTextEncoder` always builds.
        """
        if attention_mask is None:
            attention_mask = (input_ids != self.config.text_config.pad_token_id).long()
        text_states = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_projection(text_states[:, 0])  # (B, L, E_txt) -> (B, P)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        scan_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> HLIPOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(B, C, D, H, W)` or `(B, S, C, D, H, W)`, *optional*): volumes or
                studies.
            input_ids (`torch.LongTensor` of shape `(B, L)`, *optional*), attention_mask (`(B, L)`, *optional*):
                reports.
            scan_mask (`torch.Tensor` of shape `(B, S)`, *optional*): see [`get_image_features`].
            return_dict (`bool`, *optional*, defaults to `True`): an `HLIPOutput`, else a tuple.

        Returns:
            `HLIPOutput`: the normalised embeddings of what is given, and the logits when both are.
        """
        if pixel_values is None and input_ids is None:
            raise ValueError("Give pixel_values, input_ids or both")
        image_embeds = text_embeds = logits_per_image = logits_per_text = None
        if pixel_values is not None:
            image_embeds = F.normalize(self.get_image_features(pixel_values, scan_mask), dim=-1)  # (B_img, P)
        if input_ids is not None:
            text_embeds = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)  # (B_txt, P)
        if image_embeds is not None and text_embeds is not None:
            logits_per_image = self.logit_scale.exp() * image_embeds @ text_embeds.T + self.logit_bias
            logits_per_text = logits_per_image.T
        output = HLIPOutput(logits_per_image=logits_per_image, logits_per_text=logits_per_text,
                            image_embeds=image_embeds, text_embeds=text_embeds)
        return output if return_dict else output.to_tuple()


__all__ = ["HLIPModel", "HLIPOutput", "HLIPPreTrainedModel", "HLIPVisionModel"]
