"""Med3DVLM's released DCFormer-SigLIP (mirthAI/Med3DVLM, Hub `MagicXin/DCFormer_SigLIP`) as a voxlm folder:
`voxlm convert dcformer-siglip SRC OUT`.

    SRC  config.json (read as JSON) + model.safetensors + the DistilBERT tokenizer files
    OUT  DCFormerSiglipModel, a VoxCLIPProcessor (Med3DVLM's M3D-Cap preparation at 128 x 256 x 256, 512-token
         reports), the tokenizer, a model card
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer

from voxlm.model_cards import memory_summary, preprocessing_summary, render_voxclip_card
from voxlm.modeling.convert_dcformer_siglip import (
    DCFORMER_SIGLIP_MAX_LENGTH,
    MED3DVLM_COMMIT,
    check_overrides,
    convert_dcformer_siglip_state_dict,
    dcformer_siglip_config,
    load_converted,
    load_dcformer_siglip_folder,
)
from voxlm.modeling.modeling_dcformer_siglip import DCFormerSiglipModel
from voxlm.processing import VoxCLIPProcessor, dcformer_volume_processor

from .checkpoints import resolve_source
from .m3d import source_card_fields

logger = logging.getLogger(__name__)

MED3DVLM_REPOSITORY = "https://github.com/mirthAI/Med3DVLM"


def dcformer_siglip_card(model: DCFormerSiglipModel, processor, source, output_dir: Path):
    """The model card of a converted DCFormer-SigLIP, with the licences of the source's code and weights."""
    vision, text = model.config.vision_config, model.config.text_config
    return render_voxclip_card(
        f"dcformer-siglip-{output_dir.name}", [], **source_card_fields(source),
        summary=("Med3DVLM's DCFormer-SigLIP (mirthAI/Med3DVLM), converted by `voxlm convert dcformer-siglip`: a "
                 "decomposed-convolution 3D encoder and a DistilBERT text encoder with SigLIP's scale and bias; "
                 "pre-trained by its authors on M3D-Cap (weights unchanged)."),
        vision_source=f"Med3DVLM's DCFormer (`vision_encoder.*`: stem {vision.stem_channels}, stages "
        f"{list(vision.stage_channels)}, depths {list(vision.stage_depths)}), from `{source}`",
        text_source=f"Med3DVLM's DistilBERT (`language_encoder.*`: {text.dim} wide, {text.n_layers} layers; "
        f"the [CLS] token of its last hidden state), from `{source}`",
        data_source="the source's (Med3DVLM: M3D-Cap); the conversion trains nothing",
        stages=f"converted by `voxlm convert dcformer-siglip` from `{source}`; embeddings checked against "
        f"src/model/CLIP.py of {MED3DVLM_REPOSITORY} {MED3DVLM_COMMIT[:8]} on a tiny model",
        objectives="SigLIP sigmoid loss (`cosine * exp(logit_scale) + logit_bias`: Med3DVLM's `t_prime` and `bias`)",
        limits=f"Reports are truncated at {processor.max_length} tokens (Med3DVLM's `max_length`). Licences: "
        f"Med3DVLM's code is MIT ({MED3DVLM_REPOSITORY}, LICENSE); the weights carry the licence of their Hub "
        f"repository's card ({source}), which the conversion could not read offline: check it before reuse.",
        preprocessing=preprocessing_summary(processor.image_processor), memory=memory_summary(model),
        repo_or_path=str(output_dir),
    )


def convert_dcformer_siglip(source: str | Path, output_dir: str | Path, overrides: dict | None = None) -> Path:
    """Convert a released DCFormer-SigLIP (DCFormer, DistilBERT, projections, SigLIP scale and bias) into a voxlm
    folder that loads with `AutoModel` / `AutoProcessor`.

    Args:
        source (`str` or `Path`): the released repo's folder, or its Hub id (downloaded).
        output_dir (`str` or `Path`): the folder to write.
        overrides (`dict`, *optional*): `input_size` (Med3DVLM's (H, W, D)) and `text_config` (DistilBERT fields
            no weight holds, e.g. `{"n_heads": 12}`), see `voxlm.modeling.convert_dcformer_siglip`.

    Raises:
        `ValueError`: the checkpoint does not convert (naming the missing, unexpected or wrongly shaped tensors),
        an unknown override, or a tokenizer larger than the DistilBERT's vocabulary.
    """
    overrides = check_overrides(overrides)
    folder = resolve_source(source)
    source_config, state_dict = load_dcformer_siglip_folder(folder)
    config = dcformer_siglip_config(source_config, state_dict, overrides)
    converted, skipped = convert_dcformer_siglip_state_dict(state_dict)
    model = DCFormerSiglipModel(config).eval()
    load_converted(model, converted)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"The tokenizer of {source} has {len(tokenizer)} tokens, more than the DistilBERT's "
                         f"{config.text_config.vocab_size} word embeddings")
    # Med3DVLM's training volumes, at the size the model's config holds (its `input_size`).
    processor = VoxCLIPProcessor(dcformer_volume_processor(config.vision_config.image_size), tokenizer,
                                 max_length=DCFORMER_SIGLIP_MAX_LENGTH)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    dcformer_siglip_card(model, processor, source, output_dir).save(output_dir / "README.md")
    logger.info("DCFormer-SigLIP tensors not converted: %s", ", ".join(skipped) or "none")
    return output_dir
