"""DCFormer-SigLIP (Med3DVLM, github mirthAI/Med3DVLM `src/model/CLIP.py` `DEC_CLIP` with
`src/model/encoder/dcformer.py` `decomp_small`): a decomposed-convolution 3D encoder and a DistilBERT in one
SigLIP embedding space.

    volume (B, 1, D, H, W) -> stem -> 4 stages -> last-stage tokens (B, N, 768) -> mean -> Linear -> L2 norm
    report ids (B, L) -> DistilBERT last_hidden_state (B, L, E) -> token 0 ([CLS]) -> Linear -> L2 norm
    logits_per_image = image_embeds @ text_embeds.T * exp(logit_scale) + logit_bias

Axis order: Med3DVLM reads a volume as SimpleITK's array, (D, H, W), with a channel in front, which is
`pixel_values`' (B, 1, D, H, W). Its encoder then permutes to (B, C, H, W, D) and convolves there; this file convolves
in (B, C, D, H, W) (the converter reorders the kernels' axes), and the tokens come out in Med3DVLM's order,
depth-major: `(d h w)`.
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

from .configuration_dcformer_siglip import DCFormerSiglipConfig, DCFormerSiglipVisionConfig


@dataclass
class DCFormerSiglipOutput(ModelOutput):
    r"""
    image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): L2-normalised volume embeddings.
    text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): L2-normalised report embeddings.
    logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`): SigLIP logits,
        `cosine * exp(logit_scale) + logit_bias` (when both inputs are given).
    logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`): `logits_per_image.T`.
    vision_model_output (`BaseModelOutputWithPooling`): the DCFormer's output.
    """

    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None


class DCFormerDecomposedConv(nn.Module):
    """Three 1-D convolutions of one 3D volume, along D, H and W (each followed by BatchNorm), summed.

    Med3DVLM's `DecompConv3D`: with `groups = channels` it is the depthwise convolution of a block; in the stem it
    is a full convolution. No activation follows (the stem passes `nn.GELU()` as DecompConv3D's `norm` argument,
    where it only switches BatchNorm on: the stem has no activation).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 eps: float = 1e-5):
        super().__init__()
        pad = kernel_size // 2
        self.conv_h = nn.Conv3d(in_channels, out_channels, (1, kernel_size, 1), stride, (0, pad, 0), groups=groups)
        self.norm_h = nn.BatchNorm3d(out_channels, eps=eps)
        self.conv_w = nn.Conv3d(in_channels, out_channels, (1, 1, kernel_size), stride, (0, 0, pad), groups=groups)
        self.norm_w = nn.BatchNorm3d(out_channels, eps=eps)
        self.conv_d = nn.Conv3d(in_channels, out_channels, (kernel_size, 1, 1), stride, (pad, 0, 0), groups=groups)
        self.norm_d = nn.BatchNorm3d(out_channels, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> (B, C_out, D', H', W')."""
        # Med3DVLM sums in this order (its c1, c2, c3 run along H, W, D).
        return (self.norm_h(self.conv_h(hidden_states)) + self.norm_w(self.conv_w(hidden_states))
                + self.norm_d(self.conv_d(hidden_states)))


class DCFormerMLP(nn.Module):
    """Linear -> GELU -> Linear over the channels."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states)))


class DCFormerBlock(nn.Module):
    """Med3DVLM's `ConvBlock`: (2x max-pool + 1 x 1 x 1 projection when it opens a stage), then
    x + layer_scale * MLP(decomposed depthwise conv(x))."""

    def __init__(self, config: DCFormerSiglipVisionConfig, in_channels: int, channels: int, kernel_size: int,
                 downsample: bool):
        super().__init__()
        self.pool = nn.MaxPool3d(3, 2, 1) if downsample else None
        self.proj = nn.Conv3d(in_channels, channels, 1, bias=False) if downsample else None
        self.dwconv = DCFormerDecomposedConv(channels, channels, kernel_size, groups=channels,
                                             eps=config.batch_norm_eps)
        self.mlp = DCFormerMLP(channels, channels * config.mlp_ratio)
        self.layer_scale = nn.Parameter(torch.full((channels,), config.layer_scale_init_value))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> (B, C, D', H', W')."""
        if self.proj is not None:
            hidden_states = self.proj(self.pool(hidden_states))
        update = self.dwconv(hidden_states).permute(0, 2, 3, 4, 1)  # (B, C, D, H, W) -> (B, D, H, W, C)
        update = (self.layer_scale * self.mlp(update)).permute(0, 4, 1, 2, 3)  # -> (B, C, D, H, W)
        return hidden_states + update


class DCFormerSiglipPreTrainedModel(PreTrainedModel):
    config_class = DCFormerSiglipConfig
    base_model_prefix = "dcformer_siglip"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = False
    _no_split_modules = ["DCFormerBlock", "DCFormerDecomposedConv"]

    def _init_weights(self, module):
        """transformers' defaults (N(0, initializer_range) convolutions and Linears, unit norms with reset BatchNorm
        statistics; Med3DVLM trains from PyTorch's own), then the layer scales and the logit scale and bias at their
        config values."""
        super()._init_weights(module)
        if isinstance(module, DCFormerBlock):
            vision = self.config.vision_config if isinstance(self.config, DCFormerSiglipConfig) else self.config
            init.constant_(module.layer_scale, vision.layer_scale_init_value)
        elif isinstance(module, DCFormerSiglipModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            init.constant_(module.logit_bias, self.config.logit_bias_init_value)


class DCFormerSiglipVisionModel(DCFormerSiglipPreTrainedModel):
    r"""The DCFormer image tower: a stem (4 decomposed convolutions, the first strided by 4) and stages of
    [`DCFormerBlock`]s. `last_hidden_state` holds the last stage's tokens, `pooler_output` their mean (Med3DVLM's
    image feature before `mm_vision_proj`), and `hidden_states` (when asked) the stem's and every stage's tokens."""

    config_class = DCFormerSiglipVisionConfig
    base_model_prefix = "vision_model"

    def __init__(self, config: DCFormerSiglipVisionConfig):
        super().__init__(config)
        eps, width = config.batch_norm_eps, config.stem_channels
        self.stem = nn.ModuleList([
            DCFormerDecomposedConv(config.num_channels if i == 0 else width, width, kernel,
                                   config.stem_stride if i == 0 else 1, eps=eps)
            for i, kernel in enumerate(config.stem_kernel_sizes)
        ])
        stage_inputs = (config.stem_channels, *config.stage_channels[:-1])
        self.stages = nn.ModuleList([
            nn.ModuleList([DCFormerBlock(config, in_channels if j == 0 else channels, channels, kernel, j == 0)
                           for j in range(depth)])
            for in_channels, channels, depth, kernel in zip(stage_inputs, config.stage_channels, config.stage_depths,
                                                            config.stage_kernel_sizes)
        ])
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                return_dict: bool = True) -> BaseModelOutputWithPooling | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, depth, height, width)`): volumes
                in [0, 1], (D, H, W) as SimpleITK reads them (Med3DVLM's layout).
            output_hidden_states (`bool`, *optional*): also return the tokens `(B, N_i, C_i)` of the stem and of every
                stage (`1 + len(stage_channels)` entries; Med3DVLM's `DecompModel` output list).
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden_states = pixel_values.to(self.dtype)
        for conv in self.stem:
            hidden_states = conv(hidden_states)
        maps = [hidden_states]
        for stage in self.stages:
            for block in stage:
                hidden_states = block(hidden_states)
            maps.append(hidden_states)
        tokens = [rearrange(m, "b c d h w -> b (d h w) c") for m in maps]  # (B, C_i, D_i, H_i, W_i) -> (B, N_i, C_i)
        last = tokens[-1]  # (B, N, C)
        pooled = last.mean(dim=1)  # (B, C)
        all_states = tuple(tokens) if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (last, pooled, all_states) if v is not None)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=all_states)


class DCFormerSiglipModel(DCFormerSiglipPreTrainedModel):
    r"""DCFormer and a text encoder (any `AutoModel` of `config.text_config`, DistilBERT in the release) with
    Linear projections (with bias) to a shared space and SigLIP's logit scale and bias."""

    def __init__(self, config: DCFormerSiglipConfig):
        super().__init__(config)
        self.vision_model = DCFormerSiglipVisionModel(config.vision_config)
        self.text_model = AutoModel.from_config(config.text_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim)
        self.text_projection = nn.Linear(config.text_hidden_size, config.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.logit_bias = nn.Parameter(torch.tensor(config.logit_bias_init_value))
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, scan_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised embeddings `(B, P)` of volumes `(B, 1, D, H, W)` (Med3DVLM's `encode_image`): the mean of
        the last stage's tokens, projected. `scan_mask` must be `None`: one volume per row."""
        if scan_mask is not None:
            raise ValueError("DCFormer-SigLIP embeds one volume per row: `scan_mask` must be None")
        pooled = self.vision_model(pixel_values).pooler_output  # (B, C)
        return F.normalize(self.visual_projection(pooled), dim=-1)  # (B, P)

    def get_text_features(self, input_ids: torch.LongTensor,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised embeddings `(B, P)` of reports `(B, L)` (Med3DVLM's `encode_text`): the projected first
        ([CLS]) token of the text encoder's last hidden state."""
        states = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, E)
        return F.normalize(self.text_projection(states[:, 0]), dim=-1)  # (B, P)

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None, return_dict: bool = True,
                **kwargs) -> DCFormerSiglipOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 1, depth, height, width)`, *optional*).
            input_ids (`torch.LongTensor` of shape `(text_batch_size, sequence_length)`, *optional*).
            attention_mask (`torch.Tensor` of shape `(text_batch_size, sequence_length)`, *optional*).
        """
        image_embeds = text_embeds = logits_per_image = logits_per_text = vision_output = None
        if pixel_values is not None:
            vision_output = self.vision_model(pixel_values)
            image_embeds = F.normalize(self.visual_projection(vision_output.pooler_output), dim=-1)  # (B, P)
        if input_ids is not None:
            text_embeds = self.get_text_features(input_ids, attention_mask)  # (B_t, P)
        if image_embeds is not None and text_embeds is not None:
            # Med3DVLM's training (deepspeed, a process group) takes exp(t_prime); its forward without a group
            # multiplies by t_prime itself, which its released scale was not trained with.
            logits_per_image = image_embeds @ text_embeds.T * self.logit_scale.exp() + self.logit_bias  # (B, B_t)
            logits_per_text = logits_per_image.T
        output = DCFormerSiglipOutput(image_embeds=image_embeds, text_embeds=text_embeds,
                                      logits_per_image=logits_per_image, logits_per_text=logits_per_text,
                                      vision_model_output=vision_output)
        return output if return_dict else output.to_tuple()


__all__ = ["DCFormerSiglipModel", "DCFormerSiglipPreTrainedModel", "DCFormerSiglipVisionModel"]
