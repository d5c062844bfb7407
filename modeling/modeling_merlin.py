"""Merlin (StanfordMIMI/Merlin, merlin/models/build.py and i3res.py): a 3-D CT vision-language encoder pair.

    volume (B, 1, R, A, S) -> S to the front -> (B, 1, S, R, A) -> repeat x3 (B, 3, S, R, A)
        -> stem: conv (3, 7, 7) / (1, 2, 2), batch norm, ReLU, max pool 3 / 2
        -> 4 stages of 3-D bottlenecks (ResNet-152: 3, 8, 36, 3 blocks) -> (B, 2048, d, h, w)
        -> global average pool -> pooled (B, 2048) -+-> classifier -> phenotype logits (B, 1692)
                                                    +-> visual_projection -> image embedding (B, 512)
    report ids (B, L) -> Longformer (Clinical-Longformer) -> CLS state (B, 768) -> text_projection -> (B, 512)

Merlin's image tower is torchvision's ImageNet ResNet-152 inflated to 3-D (I3D); its heads are 1x1x1 convolutions
over the pooled `(B, 2048, 1, 1, 1)` feature, which are linear layers here. Parameter names inside the tower follow
torchvision's ResNet (`conv1`, `bn1`, `layerN.M.conv2`, `downsample.0`), which Merlin's I3ResNet keeps, with the
stages in `stages` (`stages.0` is torchvision's `layer1`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_merlin import MerlinConfig, MerlinVisionConfig


@dataclass
class MerlinVisionModelOutput(BaseModelOutputWithPooling):
    """Output of [`MerlinVisionModel.forward`].

    Args:
        last_hidden_state (`torch.Tensor` of shape `(B, N, C)`): the last stage's feature map as `N = d h w` tokens.
        pooler_output (`torch.Tensor` of shape `(B, C)`): its global average (Merlin's `ImageEmbedding` feature),
            before the contrastive projection.
        hidden_states (`tuple[torch.Tensor]`, *optional*): with `output_hidden_states=True`, the stem's and every
            stage's feature map `(B, C_i, d_i, h_i, w_i)`.
        phenotype_logits (`torch.Tensor` of shape `(B, num_phenotypes)`): the phenotype head's logits (Merlin's
            `PhenotypeCls` mode returns their sigmoid).
    """

    phenotype_logits: torch.FloatTensor | None = None


@dataclass
class MerlinOutput(ModelOutput):
    """Output of [`MerlinModel.forward`].

    Args:
        logits_per_image (`torch.Tensor` of shape `(B_img, B_txt)`), logits_per_text (`torch.Tensor` of shape
            `(B_txt, B_img)`): `exp(logit_scale)` times the cosine similarities, plus `logit_bias`, when both inputs
            are given.
        image_embeds (`torch.Tensor` of shape `(B_img, P)`), text_embeds (`torch.Tensor` of shape `(B_txt, P)`):
            L2-normalised, as `MerlinArchitecture.forward` returns them.
        phenotype_logits (`torch.Tensor` of shape `(B_img, num_phenotypes)`): the vision tower's phenotype logits.
        vision_model_output (`MerlinVisionModelOutput`): the vision tower's output.
    """

    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    phenotype_logits: torch.FloatTensor | None = None
    vision_model_output: MerlinVisionModelOutput | None = None


class MerlinBottleneck(GradientCheckpointingLayer):
    """A torchvision ResNet v1.5 bottleneck inflated to 3-D (i3res.py `Bottleneck3d`): 1x1x1 -> 3x3x3 (the stride,
    on all three axes) -> 1x1x1 expanding, each followed by batch norm, with a strided 1x1x1 projection shortcut
    where the shape changes.

    Args:
        in_channels (`int`): input channels; width (`int`): middle channels; out_channels (`int`): output channels;
        stride (`int`): stride of the middle convolution and the shortcut; eps (`float`): batch norm epsilon.
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int, eps: float):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(width, eps=eps)
        self.conv2 = nn.Conv3d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(width, eps=eps)
        self.conv3 = nn.Conv3d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_channels, eps=eps)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv3d(in_channels, out_channels, kernel_size=1, stride=stride,
                                                      bias=False), nn.BatchNorm3d(out_channels, eps=eps))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(B, C_in, D, H, W)` -> `(B, C_out, D / s, H / s, W / s)`."""
        residual = hidden_states if self.downsample is None else self.downsample(hidden_states)
        hidden_states = F.relu(self.bn1(self.conv1(hidden_states)))
        hidden_states = F.relu(self.bn2(self.conv2(hidden_states)))
        return F.relu(self.bn3(self.conv3(hidden_states)) + residual)


class MerlinStem(nn.Module):
    """The inflated ResNet stem: a `(3, 7, 7)` convolution with stride `(1, 2, 2)` (inflate.py gives the 7x7 kernel
    this shape whatever its arguments), batch norm, ReLU, a `3 x 3 x 3` max pool with stride 2."""

    def __init__(self, config: MerlinVisionConfig):
        super().__init__()
        in_channels = config.num_channels * config.num_channel_repeats
        self.conv1 = nn.Conv3d(in_channels, config.stem_width, kernel_size=(3, 7, 7), stride=(1, 2, 2),
                               padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(config.stem_width, eps=config.batch_norm_eps)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, C, D, H, W)` -> `(B, stem_width, D / 2, H / 4, W / 4)`."""
        return self.maxpool(F.relu(self.bn1(self.conv1(pixel_values))))


class MerlinPreTrainedModel(PreTrainedModel):
    config_class = MerlinConfig
    config: MerlinConfig
    base_model_prefix = "merlin"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["MerlinBottleneck", "LongformerLayer"]

    def _init_weights(self, module):
        """torchvision's ResNet initialisation: Kaiming-normal (fan out) convolutions, unit batch norms."""
        super()._init_weights(module)
        if isinstance(module, nn.Conv3d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm3d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
        elif isinstance(module, MerlinModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            init.zeros_(module.logit_bias)


class MerlinVisionModel(MerlinPreTrainedModel):
    r"""Merlin's image tower: an inflated 3-D ResNet and the phenotype head (see the module docstring)."""

    config_class = MerlinVisionConfig
    config: MerlinVisionConfig
    base_model_prefix = "merlin_vision"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["MerlinBottleneck"]

    def __init__(self, config: MerlinVisionConfig):
        super().__init__(config)
        self.stem = MerlinStem(config)
        channels, stages = config.stem_width, []
        for depth, width, stride in zip(config.depths, config.widths, config.strides):
            out_channels = width * config.expansion
            blocks = [MerlinBottleneck(channels if index == 0 else out_channels, width, out_channels,
                                       stride if index == 0 else 1, config.batch_norm_eps) for index in range(depth)]
            stages.append(nn.Sequential(*blocks))
            channels = out_channels
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Linear(config.hidden_size, config.num_phenotypes)
        self.post_init()

    def embed_volume(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Merlin's input layout -> the 3-D convolutions' (i3res.py `I3ResNet.forward`): the last (superior) axis
        becomes the depth axis and the channels are repeated for the RGB-inflated stem.

        Args:
            pixel_values (`torch.Tensor` of shape `(B, C, R, A, S)`): Merlin's arrays (224 x 224 x 160 voxels of
                1.5 x 1.5 x 3 mm in RAS order after its MONAI transforms; `merlin_volume_processor`).
        """
        volume = rearrange(pixel_values, "b c r a s -> b c s r a")  # (B, C, R, A, S) -> (B, C, S, R, A)
        return volume.repeat(1, self.config.num_channel_repeats, 1, 1, 1)  # (B, 3 C, S, R, A)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = True,
        **kwargs,
    ) -> MerlinVisionModelOutput | tuple:
        """Encode volumes.

        Args:
            pixel_values (`torch.Tensor` of shape `(B, C, R, A, S)`): see `embed_volume`.
            output_hidden_states (`bool`, *optional*): also return the stem's and every stage's feature map.
            return_dict (`bool`, *optional*, defaults to `True`): a `MerlinVisionModelOutput`, else a tuple.
        """
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        features = self.stem(self.embed_volume(pixel_values))  # (B, stem_width, S / 2, R / 4, A / 4)
        hidden_states = [features]
        for stage in self.stages:
            features = stage(features)  # (B, C_i, d_i, h_i, w_i)
            hidden_states.append(features)
        pooled = features.mean(dim=(2, 3, 4))  # (B, C, d, h, w) -> (B, C): Merlin's AdaptiveAvgPool3d(1)
        output = MerlinVisionModelOutput(
            last_hidden_state=rearrange(features, "b c d h w -> b (d h w) c"),  # (B, C, d, h, w) -> (B, N, C)
            pooler_output=pooled,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            phenotype_logits=self.classifier(pooled),  # (B, num_phenotypes)
        )
        return output if return_dict or return_dict is None else output.to_tuple()


class MerlinModel(MerlinPreTrainedModel):
    r"""Merlin's image and text towers in one 512-d embedding space (see the module docstring).

    `get_image_features` / `get_text_features` return what Merlin's `encode_image` (its contrastive output) and
    `encode_text` return: projected, not normalised; `forward` normalises them, as `MerlinArchitecture.forward` does.
    """

    def __init__(self, config: MerlinConfig):
        super().__init__(config)
        self.vision_model = MerlinVisionModel(config.vision_config)
        self.text_model = AutoModel.from_config(config.text_config, add_pooling_layer=False)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.logit_bias = nn.Parameter(torch.tensor(0.0))
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, scan_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Merlin's contrastive image embeddings `(B, P)`, not normalised.

        Args:
            pixel_values (`torch.Tensor` of shape `(B, 1, R, A, S)`): Merlin's arrays (`MerlinVisionModel`).
            scan_mask: must be `None`: Merlin encodes one volume per row, not studies.
        """
        if scan_mask is not None:
            raise ValueError("Merlin encodes one volume per row: `scan_mask` (studies) is not supported")
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def get_text_features(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Merlin's report embeddings `(B, P)`, not normalised: the projected first (`<s>`) token state.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`): reports tokenised as Merlin does (lower case, words
                and punctuation split by `nltk.wordpunct_tokenize` and joined by spaces, at most 1024 tokens).
            attention_mask (`torch.Tensor` of shape `(B, L)`, *optional*): 1 on real tokens; default all ones.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, E)
        return self.text_projection(states[:, 0])

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = True,
        **kwargs,
    ) -> MerlinOutput | tuple:
        """Normalised embeddings of volumes and / or reports, their similarity logits when both are given, and the
        phenotype logits of the volumes.

        Args:
            pixel_values (`torch.Tensor` of shape `(B_img, 1, R, A, S)`, *optional*): Merlin's arrays.
            input_ids (`torch.LongTensor` of shape `(B_txt, L)`, *optional*), attention_mask (`torch.Tensor` of shape
                `(B_txt, L)`, *optional*): tokenised reports.
            return_dict (`bool`, *optional*, defaults to `True`): a `MerlinOutput`, else a tuple.
        """
        if pixel_values is None and input_ids is None:
            raise ValueError("Give `pixel_values`, `input_ids` or both")
        output = MerlinOutput()
        if pixel_values is not None:
            vision_output = self.vision_model(pixel_values)
            output.vision_model_output = vision_output
            output.phenotype_logits = vision_output.phenotype_logits
            output.image_embeds = F.normalize(self.visual_projection(vision_output.pooler_output), dim=-1)  # (B, P)
        if input_ids is not None:
            output.text_embeds = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)  # (B, P)
        if pixel_values is not None and input_ids is not None:
            logits = output.image_embeds @ output.text_embeds.T * self.logit_scale.exp() + self.logit_bias
            output.logits_per_image, output.logits_per_text = logits, logits.T  # (B_img, B_txt), (B_txt, B_img)
        return output if return_dict or return_dict is None else output.to_tuple()


__all__ = ["MerlinModel", "MerlinOutput", "MerlinPreTrainedModel", "MerlinVisionModel", "MerlinVisionModelOutput"]
