"""Configuration of VoxCLIP: a VoxViT and a BERT-like text encoder trained contrastively on volume-report pairs."""

from __future__ import annotations

import math

from transformers import AutoConfig

from .configuration_voxvit import VoxConfig, VoxViTConfig, auto_text_config
from .vision_towers import vision_tower_config

CONTRASTIVE_LOSSES = ("infonce", "siglip")
TEXT_POOLING = ("cls", "mean")
# Each loss component of `VoxCLIPOutput` and the config field that weights it in the total loss.
LOSS_WEIGHTS = {
    "contrastive_loss": "contrastive_loss_weight",
    "inter_patient_loss": "inter_patient_loss_weight",
    "mvr_loss": "mvr_loss_weight",
    "mim_loss": "mim_loss_weight",
    "mlm_loss": "mlm_loss_weight",
    "report_gen_loss": "report_gen_loss_weight",
}
VOXCLIP_AUTO_MAP = {"AutoConfig": "configuration_voxclip.VoxCLIPConfig", "AutoModel": "modeling_voxclip.VoxCLIPModel"}


class VoxCLIPConfig(VoxConfig):
    r"""
    Configuration of [`VoxCLIPModel`] (M3D-CLIP, with MG-3D's and COLIPRI's extra terms as options).

    Every extra term has a weight; at 0 (the default) the term is off and its modules are not built, so a checkpoint
    holds only what its terms use.

    Args:
        vision_config (`PretrainedConfig` or `dict`, *optional*): the volume encoder: a `VoxViTConfig` (the default),
            or the config of another tower of `voxlm.modeling.vision_towers.VISION_TOWERS` (a dict names it by
            `model_type`), such as a converted encoder's image tower. Other towers than VoxViT train the contrastive
            and inter-patient terms only (the others read VoxViT's patch grid and tokens).
        text_config (`PretrainedConfig` or `dict`, *optional*): a BERT-like encoder config (needs `model_type`);
            defaults to BERT-base.
        projection_dim (`int`, *optional*, defaults to 512): width of the shared embedding space.
        projection_bias (`bool`, *optional*, defaults to `False`): a bias on `visual_projection` and
            `text_projection` (CLIP has none; M3D-CLIP's `mm_vision_proj` / `mm_language_proj` have one).
        logit_scale_init_value (`float`, *optional*, defaults to log(1/0.07)): initial log temperature (CLIP).
        text_pooling (`str`, *optional*, defaults to `"cls"`): `"cls"` (M3D-CLIP's BERT CLS) or `"mean"` (mean over
            tokens, as sentence encoders such as MiniLM are trained).
        contrastive_loss (`str`, *optional*, defaults to `"infonce"`): `"infonce"` (symmetric, CLIP) or `"siglip"`.
        contrastive_loss_weight (`float`, *optional*, defaults to 1.0): weight of the contrastive term.
        inter_patient_loss_weight (`float`, *optional*, defaults to 0.0): weight of MG-3D's inter-patient term (L1
            between image-image similarity and soft targets from report-report similarity); 0 turns it off.
        inter_patient_thresholds (`tuple[float, float]`, *optional*, defaults to `(0.6, 0.9)`): report similarities
            at or below the first give target 0, at or above the second target 1, in between the similarity itself.
        mvr_loss_weight (`float`, *optional*, defaults to 0.0): weight of MG-3D's text-guided masked-volume
            reconstruction (MSE on the normalised voxels of masked patches of paired rows; the decoder cross-attends to
            the report's token features).
        mim_loss_weight (`float`, *optional*, defaults to 0.0): weight of COLIPRI's masked-image modelling on rows
            without a report (the same reconstruction, without text guidance).
        mask_ratio (`float`, *optional*, defaults to 0.75): share of patches hidden from the encoder (MAE, MG-3D).
        volume_decoder_hidden_size (`int`, *optional*, defaults to 256), volume_decoder_layers (`int`, *optional*,
            defaults to 1), volume_decoder_heads (`int`, *optional*, defaults to 8), volume_decoder_intermediate_size
            (`int`, *optional*, defaults to 1024): the light reconstruction decoder (built when `mvr_loss_weight` or
            `mim_loss_weight` is above 0).
        mlm_loss_weight (`float`, *optional*, defaults to 0.0): weight of MG-3D's image-guided masked language
            modelling (the collator masks the reports; the text encoder's features cross-attend to the volume tokens
            and a head tied to the word embeddings predicts the masked tokens).
        mlm_fusion_layers (`int`, *optional*, defaults to 1): fusion layers (self-attention, cross-attention to the
            volume, MLP; the text encoder's width, heads and MLP width) before the MLM head.
        report_gen_loss_weight (`float`, *optional*, defaults to 0.0): weight of COLIPRI's report generation (next-token
            cross-entropy of a small causal decoder that cross-attends to the volume tokens; vocabulary and word
            embeddings are the text encoder's).
        report_decoder_layers (`int`, *optional*, defaults to 1): layers of that decoder (the text encoder's width,
            heads and MLP width).
    """

    model_type = "voxclip"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        projection_dim: int = 512,
        projection_bias: bool = False,
        logit_scale_init_value: float = math.log(1 / 0.07),
        text_pooling: str = "cls",
        contrastive_loss: str = "infonce",
        contrastive_loss_weight: float = 1.0,
        inter_patient_loss_weight: float = 0.0,
        inter_patient_thresholds=(0.6, 0.9),
        mvr_loss_weight: float = 0.0,
        mim_loss_weight: float = 0.0,
        mask_ratio: float = 0.75,
        volume_decoder_hidden_size: int = 256,
        volume_decoder_layers: int = 1,
        volume_decoder_heads: int = 8,
        volume_decoder_intermediate_size: int = 1024,
        mlm_loss_weight: float = 0.0,
        mlm_fusion_layers: int = 1,
        report_gen_loss_weight: float = 0.0,
        report_decoder_layers: int = 1,
        **kwargs,
    ):
        self.vision_config = vision_tower_config(vision_config)
        self.text_config = auto_text_config(text_config, "bert", "'bert'")
        self.projection_dim = projection_dim
        self.projection_bias = projection_bias
        self.logit_scale_init_value = logit_scale_init_value
        self.text_pooling = text_pooling
        self.contrastive_loss = contrastive_loss
        self.contrastive_loss_weight = contrastive_loss_weight
        self.inter_patient_loss_weight = inter_patient_loss_weight
        self.inter_patient_thresholds = [float(t) for t in inter_patient_thresholds]
        self.mvr_loss_weight = mvr_loss_weight
        self.mim_loss_weight = mim_loss_weight
        self.mask_ratio = mask_ratio
        self.volume_decoder_hidden_size = volume_decoder_hidden_size
        self.volume_decoder_layers = volume_decoder_layers
        self.volume_decoder_heads = volume_decoder_heads
        self.volume_decoder_intermediate_size = volume_decoder_intermediate_size
        self.mlm_loss_weight = mlm_loss_weight
        self.mlm_fusion_layers = mlm_fusion_layers
        self.report_gen_loss_weight = report_gen_loss_weight
        self.report_decoder_layers = report_decoder_layers
        kwargs.setdefault("auto_map", dict(VOXCLIP_AUTO_MAP))
        super().__init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Raise `ValueError` naming the field when the settings cannot train."""
        if self.contrastive_loss not in CONTRASTIVE_LOSSES:
            raise ValueError(f"Unknown `contrastive_loss` {self.contrastive_loss!r}; choose one of {CONTRASTIVE_LOSSES}")
        if self.text_pooling not in TEXT_POOLING:
            raise ValueError(f"Unknown `text_pooling` {self.text_pooling!r}; choose one of {TEXT_POOLING}")
        if getattr(self.text_config, "hidden_size", None) is None:
            raise ValueError("`text_config` has no `hidden_size`: it is not a text encoder config")
        if self.projection_dim <= 0:
            raise ValueError(f"`projection_dim` must be positive, got {self.projection_dim}")
        voxvit_terms = [field for field in ("mvr_loss_weight", "mim_loss_weight", "mlm_loss_weight",
                                            "report_gen_loss_weight") if getattr(self, field) > 0]
        if voxvit_terms and self.vision_config.model_type != VoxViTConfig.model_type:
            raise ValueError(f"{voxvit_terms} > 0 read VoxViT's patch grid and tokens; the vision tower "
                             f"{self.vision_config.model_type!r} trains the contrastive and inter-patient terms only")
        low, high = self.inter_patient_thresholds
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"`inter_patient_thresholds` must satisfy 0 <= low < high <= 1, got {(low, high)}")
        for field in LOSS_WEIGHTS.values():
            if getattr(self, field) < 0:
                raise ValueError(f"`{field}` must be >= 0")
        if self.builds_volume_decoder:
            self.validate_volume_decoder()
        if self.mlm_loss_weight > 0 or self.report_gen_loss_weight > 0:
            self.validate_text_decoders()

    @property
    def builds_volume_decoder(self) -> bool:
        """Whether the masked-volume decoder exists (text-guided reconstruction or image-only masked modelling)."""
        return self.mvr_loss_weight > 0 or self.mim_loss_weight > 0

    @property
    def num_visible_patches(self) -> int:
        """Patches the encoder sees in the masked pass: `int(num_patches * (1 - mask_ratio))` (MAE's rounding)."""
        return int(self.vision_config.num_patches * (1 - self.mask_ratio))

    def validate_volume_decoder(self):
        active = "`mvr_loss_weight` / `mim_loss_weight` > 0"
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"`mask_ratio` must be in (0, 1), got {self.mask_ratio}")
        if not 0 < self.num_visible_patches < self.vision_config.num_patches:
            raise ValueError(
                f"`mask_ratio` {self.mask_ratio} leaves {self.num_visible_patches} of "
                f"{self.vision_config.num_patches} patches visible; at least one must be visible and one masked"
            )
        levels = set(self.vision_config.block_attention_levels)
        if levels != {"scan"}:
            # The encoder runs on the visible tokens only (MAE); slice and study blocks group tokens by the full grid.
            raise ValueError(
                f"{active} runs the encoder on visible patches only, which needs scan attention in every block; "
                f"`vision_config.attention_levels` gives {sorted(levels)}"
            )
        for field in ("volume_decoder_hidden_size", "volume_decoder_layers", "volume_decoder_heads",
                      "volume_decoder_intermediate_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"`{field}` must be >= 1 when {active}")
        if self.volume_decoder_hidden_size % self.volume_decoder_heads:
            raise ValueError(
                f"`volume_decoder_hidden_size` {self.volume_decoder_hidden_size} is not divisible by "
                f"`volume_decoder_heads` {self.volume_decoder_heads}"
            )

    def validate_text_decoders(self):
        text = self.text_config
        heads = getattr(text, "num_attention_heads", None)
        if heads is None or getattr(text, "intermediate_size", None) is None:
            raise ValueError(
                "`mlm_loss_weight` / `report_gen_loss_weight` > 0 build layers of the text encoder's shape: "
                "`text_config` needs `num_attention_heads` and `intermediate_size`"
            )
        if text.hidden_size % heads:
            raise ValueError(f"`text_config.hidden_size` {text.hidden_size} is not divisible by its {heads} heads")
        if getattr(text, "embedding_size", text.hidden_size) != text.hidden_size:
            raise ValueError(
                "`mlm_loss_weight` / `report_gen_loss_weight` > 0 tie the output layer to the text encoder's word "
                f"embeddings, which needs `text_config.embedding_size` == `hidden_size` ({text.hidden_size})"
            )
        if self.report_gen_loss_weight > 0 and getattr(text, "max_position_embeddings", None) is None:
            raise ValueError("`report_gen_loss_weight` > 0 learns decoder positions: `text_config` needs "
                             "`max_position_embeddings`")
        for field in ("mlm_fusion_layers", "report_decoder_layers"):
            if getattr(self, field) < 1:
                raise ValueError(f"`{field}` must be >= 1")
