"""COLIPRI's released checkpoint (microsoft/colipri, PyPI `colipri`) as a voxlm folder: `voxlm convert colipri SRC OUT`.

    SRC (a folder laid out like microsoft/colipri, or that Hub id)
      model.safetensors   colipri `Model.state_dict()` (its own key names)       -> ColipriModel weights
      (no config file)    colipri's packaged Hydra defaults + `overrides`        -> ColipriConfig
      tokenizer files     if the folder holds them; else CXR-BERT-specialized's, which colipri loads from the Hub
    OUT: config, weights, voxlm's modeling code (`trust_remote_code`), a `VoxCLIPProcessor` with COLIPRI's
    preprocessing (`colipri_volume_processor`) and 512-token reports, model card.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import BertTokenizer

from voxlm.model_cards import memory_summary, preprocessing_summary, render_voxclip_card
from voxlm.modeling import ColipriModel
from voxlm.modeling.convert_colipri import (
    COLIPRI_MAX_LENGTH,
    COLIPRI_TOKENIZER,
    COLIPRI_TOKENIZER_REVISION,
    COLIPRI_VERSION,
    check_overrides,
    colipri_config,
    convert_colipri_state_dict,
    load_converted,
)
from voxlm.modeling.convert_m3d import load_state_dict_file
from voxlm.processing import VoxCLIPProcessor, colipri_volume_processor

from .checkpoints import resolve_source

logger = logging.getLogger(__name__)

COLIPRI_HUB_ID = "microsoft/colipri"
WEIGHTS_FILE = "model.safetensors"
# What a Hub download fetches: the weights and, where a repo has them, tokenizer files and the card.
SOURCE_FILES = [WEIGHTS_FILE, "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "README.md"]


def colipri_tokenizer(folder: Path) -> BertTokenizer:
    """The tokenizer in `folder` when it holds a `vocab.txt`, else CXR-BERT-specialized's at the revision colipri
    pins (configs/processor/tokenizer/default.yaml), a plain BERT WordPiece tokenizer."""
    if (folder / "vocab.txt").is_file():
        return BertTokenizer.from_pretrained(folder)
    return BertTokenizer.from_pretrained(COLIPRI_TOKENIZER, revision=COLIPRI_TOKENIZER_REVISION)


def convert_colipri(source: str | Path, output_dir: str | Path, overrides: dict | None = None) -> Path:
    """Convert a released COLIPRI (Primus image encoder, CXR-BERT, attention poolers, `softmax_temperature`) into a
    `ColipriModel` folder (model, `VoxCLIPProcessor` with COLIPRI's preprocessing and 512-token reports, model card)
    that loads with `AutoModel` / `AutoProcessor`.

    Args:
        source (`str` or `Path`): the released repo's folder (`model.safetensors`, optionally tokenizer files), or
            its Hub id (downloaded).
        output_dir (`str` or `Path`): the folder to write.
        overrides (`dict`, *optional*): colipri's own config fields by their dotted Hydra names
            (`voxlm.modeling.convert_colipri.COLIPRI_DEFAULTS`, e.g. `{"input_size": 16}`) and `text_config` (BERT
            fields), for checkpoints not at the released sizes.

    Returns:
        `Path`: `output_dir`.

    Raises:
        `ValueError`: unknown overrides, or a checkpoint that does not match the config (naming the missing,
        unexpected or wrongly shaped tensors); `FileNotFoundError`: no `model.safetensors`.
    """
    overrides = check_overrides(overrides)
    folder = resolve_source(source, allow_patterns=SOURCE_FILES)
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE} (the COLIPRI release holds one)")
    state_dict = load_state_dict_file(folder / WEIGHTS_FILE)
    config = colipri_config(state_dict, overrides)
    converted, skipped = convert_colipri_state_dict(state_dict)
    model = ColipriModel(config).eval()
    load_converted(model, converted)
    tokenizer = colipri_tokenizer(folder)
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"The tokenizer of {source} has {len(tokenizer)} tokens, more than the BERT's "
                         f"{config.text_config.vocab_size} word embeddings")
    image_processor = colipri_volume_processor(image_size=tuple(config.vision_config.image_size))
    processor = VoxCLIPProcessor(image_processor, tokenizer, max_length=COLIPRI_MAX_LENGTH)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    colipri_card(model, processor, source, output_dir).save(output_dir / "README.md")
    logger.info("COLIPRI tensors without a ColipriModel counterpart, not converted: %s", ", ".join(skipped) or "none")
    return output_dir


def colipri_card(model: ColipriModel, processor, source, output_dir: Path):
    """The model card of a converted COLIPRI: lineage and licences name the source, nothing is measured."""
    vision, text = model.config.vision_config, model.config.text_config
    return render_voxclip_card(
        f"colipri-{output_dir.name}", [], base_model=None if Path(source).exists() else str(source), license="mit",
        summary=("COLIPRI (microsoft/colipri), converted by `voxlm convert colipri`: an EVA-style 3D ViT with rotary "
                 "positions and attention pooling, and CXR-BERT-specialized, in one embedding space; pre-trained by "
                 "its authors on CT volumes and reports (weights unchanged)."),
        vision_source=f"COLIPRI's Primus image encoder ({vision.embed_dim} wide, {vision.num_hidden_layers} EVA "
        f"blocks, {vision.num_attention_heads} heads, patches {vision.patch_size}, 3-D rotary embedding), 1x1x1 conv "
        f"projector to {vision.hidden_size} and attention pooling, from `{source}`",
        text_source=f"COLIPRI's CXR-BERT ({text.hidden_size} wide, {text.num_hidden_layers} layers) with attention "
        f"pooling and no projection, from `{source}`",
        data_source="the source's (COLIPRI: tens of thousands of chest CT scans and reports, see arXiv:2510.15042); "
        "the conversion trains nothing",
        stages=f"converted by `voxlm convert colipri` from `{source}`, weights unchanged; embeddings checked against "
        f"colipri {COLIPRI_VERSION} (PyPI) on a tiny model",
        objectives="COLIPRI's (contrastive, report generation, masked-image modelling); `logit_scale` is the log of "
        "1 / colipri's `softmax_temperature`",
        limits=f"Reports are truncated and padded to {processor.max_length} tokens, as colipri's `Processor` does. "
        "Licences: colipri's code and the microsoft/colipri weights are MIT (the colipri 0.1.3 package metadata and "
        "model card); CXR-BERT-specialized, whose tokenizer COLIPRI uses, is MIT "
        "(huggingface.co/microsoft/BiomedVLP-CXR-BERT-specialized).",
        preprocessing=preprocessing_summary(processor.image_processor), memory=memory_summary(model),
        repo_or_path=str(output_dir),
    )
