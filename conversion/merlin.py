"""Merlin's released checkpoint (StanfordMIMI/Merlin) as a voxlm folder: `voxlm convert merlin SRC OUT`.

    SRC (a folder laid out like stanfordmimi/Merlin, or that Hub id)
      i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt   read with weights_only=True
    TEXT (`overrides["text_encoder"]`: a folder laid out like yikuan8/Clinical-Longformer, or that Hub id, the default)
      config.json (read as JSON), the tokenizer files
    OUT: config, weights, voxlm's modeling code (`trust_remote_code`), a `VoxCLIPProcessor` with Merlin's
    preprocessing (`merlin_volume_processor`) and 1024-token reports, the tokenizer, a model card.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import AutoTokenizer

from voxlm.model_cards import memory_summary, preprocessing_summary, render_voxclip_card
from voxlm.modeling import MerlinModel
from voxlm.modeling.convert_m3d import load_state_dict_file
from voxlm.modeling.convert_merlin import (
    CLINICAL_LONGFORMER,
    MERLIN_CHECKPOINT,
    MERLIN_COMMIT,
    MERLIN_MAX_LENGTH,
    check_overrides,
    convert_merlin_state_dict,
    load_converted,
    merlin_config,
)
from voxlm.processing import VoxCLIPProcessor, merlin_volume_processor

from .checkpoints import resolve_source
from .m3d import source_card_fields

logger = logging.getLogger(__name__)

MERLIN_REPOSITORY = "https://github.com/StanfordMIMI/Merlin"


def convert_merlin(source: str | Path, output_dir: str | Path, overrides: dict | None = None) -> Path:
    """Convert Merlin's released contrastive checkpoint (I3D ResNet-152, phenotype head, Clinical-Longformer,
    projections) into a `MerlinModel` folder with its processor and card, loadable with `AutoModel` /
    `AutoProcessor`.

    Args:
        source (`str` or `Path`): the released repo's folder, or its Hub id (only the checkpoint is downloaded).
        output_dir (`str` or `Path`): the folder to write.
        overrides (`dict`, *optional*): in Merlin's own names: `checkpoint` (the weight file, default
            `MERLIN_CHECKPOINT`), `text_encoder` (a folder or Hub id with the text encoder's `config.json` and
            tokenizer, default `yikuan8/Clinical-Longformer`), `max_length` (report tokens, default 1024).

    Returns:
        `Path`: `output_dir`.

    Raises:
        `ValueError`: unknown overrides, or a checkpoint that does not convert (naming the missing, unexpected or
        wrongly shaped tensors); `FileNotFoundError`: no checkpoint or text encoder config.
    """
    overrides = check_overrides(overrides)
    checkpoint = overrides.get("checkpoint", MERLIN_CHECKPOINT)
    weights = resolve_source(source, allow_patterns=[checkpoint]) / checkpoint
    if not weights.is_file():
        raise FileNotFoundError(f"{source}: no {checkpoint} (Merlin's release holds it)")
    text_source = overrides.get("text_encoder", CLINICAL_LONGFORMER)
    text_folder = resolve_source(text_source)
    if not (text_folder / "config.json").is_file():
        raise FileNotFoundError(f"{text_source}: no config.json (Clinical-Longformer's repo holds one)")
    state_dict = load_state_dict_file(weights)
    config = merlin_config(state_dict, json.loads((text_folder / "config.json").read_text()))
    converted, skipped = convert_merlin_state_dict(state_dict)
    model = MerlinModel(config).eval()
    load_converted(model, converted)
    tokenizer = AutoTokenizer.from_pretrained(text_folder)
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"The tokenizer of {text_source} has {len(tokenizer)} tokens, more than the text encoder's "
                         f"{config.text_config.vocab_size} word embeddings")
    processor = VoxCLIPProcessor(merlin_volume_processor(), tokenizer,
                                 max_length=overrides.get("max_length", MERLIN_MAX_LENGTH))
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    merlin_card(model, processor, source, text_source, output_dir).save(output_dir / "README.md")
    logger.info("Merlin tensors without a MerlinModel counterpart, not converted: %s", ", ".join(skipped) or "none")
    return output_dir


def merlin_card(model: MerlinModel, processor, source, text_source, output_dir: Path):
    """The model card of a converted Merlin: lineage names the sources and their licences, nothing is measured."""
    vision, text = model.config.vision_config, model.config.text_config
    return render_voxclip_card(
        f"merlin-{output_dir.name}", [], **source_card_fields(source),
        summary=("Merlin (StanfordMIMI/Merlin), converted by `voxlm convert merlin`: an I3D-inflated 3D ResNet-152 "
                 "(with a 1,692-phenotype head) and Clinical-Longformer, in one embedding space; pre-trained by its "
                 "authors on abdominal CTs, reports and EHR codes (weights unchanged)."),
        vision_source=f"Merlin's I3D-inflated ResNet (`encode_image.i3_resnet.*`: blocks {vision.depths}, "
        f"{vision.hidden_size}-d pooled feature, {vision.num_phenotypes} phenotype logits), from `{source}`",
        text_source=f"Merlin's Clinical-Longformer (`encode_text.text_encoder.*`: {text.hidden_size} wide, "
        f"{text.num_hidden_layers} layers; its unused pooler dropped), config and tokenizer from `{text_source}`",
        data_source="the source's (Merlin: abdominal CT with reports and EHR diagnosis codes, Stanford); the "
        "conversion trains nothing",
        stages=f"converted by `voxlm convert merlin` from `{source}`; image, phenotype and text embeddings checked "
        f"against merlin/models/build.py of {MERLIN_REPOSITORY} {MERLIN_COMMIT[:8]} on a tiny model",
        objectives="contrastive (Merlin's training code is unreleased; its `logit_scale` is kept as the log scale)",
        limits=f"Merlin lower-cases reports and splits words from punctuation (`nltk.wordpunct_tokenize`) before "
        f"tokenising: do the same to reports given to the processor. Reports are truncated at {processor.max_length} "
        f"tokens. Merlin's code is MIT-licensed ({MERLIN_REPOSITORY}); check the weights' own licence and card "
        f"({source}) and Clinical-Longformer's ({text_source}).",
        preprocessing=preprocessing_summary(processor.image_processor), memory=memory_summary(model),
        repo_or_path=str(output_dir),
    )
