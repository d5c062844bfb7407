"""HLIP's released checkpoints (Zch0414/hlip) as voxlm folders: `voxlm convert hlip SRC OUT`.

    SRC (a folder laid out like the open_clip Hub releases of HLIP, or that Hub id)
      open_clip_config.json   `model_cfg`: HLIP's timm function and the BERT's Hub id     -> HLIPConfig
                              (or HLIP's bare model config .json beside an older .pt)
      open_clip_model.safetensors (or open_clip_pytorch_model.bin, a .pt), without unpickling -> model.safetensors
      vocab.txt               the BERT tokenizer, when the folder has one; else `text_cfg.hf_tokenizer_name`
    OUT: config, weights, voxlm's modeling code (`trust_remote_code`), a `VoxCLIPProcessor` with HLIP's chest-CT
    preprocessing (`hlip_volume_processor`) and the release's `context_length`, the tokenizer, a model card.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer, BertTokenizer

from voxlm.model_cards import memory_summary, preprocessing_summary, render_voxclip_card
from voxlm.modeling import HLIPModel
from voxlm.modeling.convert_hlip import (
    HLIP_COMMIT,
    check_overrides,
    convert_hlip_state_dict,
    hlip_config,
    load_converted,
    load_hlip_folder,
)
from voxlm.processing import VoxCLIPProcessor, hlip_volume_processor

from .checkpoints import resolve_source

logger = logging.getLogger(__name__)

HLIP_REPOSITORY = "https://github.com/Zch0414/hlip"
# open_clip's CLIPTextCfg default, for model configs without `text_cfg.context_length`.
OPEN_CLIP_CONTEXT_LENGTH = 77


def convert_hlip(source: str | Path, output_dir: str | Path, overrides: dict | None = None) -> Path:
    """Convert a released HLIP (open_clip `CustomTextCLIP`: HLIP's timm ViT, a BERT, two projections and
    `logit_scale`) into an HLIP folder (model, `VoxCLIPProcessor`, model card) that loads with `AutoModel` /
    `AutoProcessor`.

    Args:
        source (`str` or `Path`): the released repo's folder, or its Hub id (downloaded).
        output_dir (`str` or `Path`): the folder to write.
        overrides (`dict`, *optional*): HLIP's model arguments in its own names (`img_size`, `patch_size`, `depth`,
            `embed_dim`, `num_heads`, `reg_tokens`, `pre_norm`, `max_num_scans`, `slice_attn_indexes`, ...: see
            `voxlm.modeling.convert_hlip.OVERRIDES`), replacing those of the timm function the config names, and
            open_clip's `context_length` (the reports' token limit).

    Returns:
        `Path`: `output_dir`.

    Raises:
        `ValueError`: the checkpoint does not match its config (naming the missing, unexpected or wrongly shaped
        tensors), an unknown override, or a tokenizer larger than the BERT's vocabulary.
    """
    overrides = check_overrides(overrides)
    folder = resolve_source(source)
    model_cfg, state_dict = load_hlip_folder(folder)
    config = hlip_config(model_cfg, state_dict, overrides)
    converted, skipped = convert_hlip_state_dict(state_dict)
    model = HLIPModel(config).eval()
    load_converted(model, converted)
    text_cfg = model_cfg.get("text_cfg", {})
    if (folder / "vocab.txt").is_file():
        tokenizer = BertTokenizer.from_pretrained(folder)
    else:
        tokenizer = AutoTokenizer.from_pretrained(text_cfg["hf_tokenizer_name"])  # open_clip's HFTokenizer
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"The tokenizer of {source} has {len(tokenizer)} tokens, more than the BERT's "
                         f"{config.text_config.vocab_size} word embeddings")
    max_length = overrides.get("context_length", text_cfg.get("context_length", OPEN_CLIP_CONTEXT_LENGTH))
    processor = VoxCLIPProcessor(hlip_volume_processor(image_size=tuple(config.vision_config.image_size)), tokenizer,
                                 max_length=max_length)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    hlip_card(model, processor, source, model_cfg, output_dir).save(output_dir / "README.md")
    logger.info("HLIP tensors without an HLIPModel counterpart, not converted: %s", ", ".join(skipped) or "none")
    return output_dir


def hlip_card(model: HLIPModel, processor, source, model_cfg: dict, output_dir: Path):
    """The model card of a converted HLIP: lineage and licences name the source, nothing is measured."""
    vision, text = model.config.vision_config, model.config.text_config
    text_name = model_cfg.get("text_cfg", {}).get("hf_model_name", "a BERT")
    return render_voxclip_card(
        f"hlip-{output_dir.name}", [], base_model=None if Path(source).exists() else str(source), license="other",
        license_name="HLIP code MIT; weights: see the source checkpoint's card",
        summary=("HLIP (Zch0414/hlip), converted by `voxlm convert hlip`: a ViT with slice / scan / study attention "
                 "over whole studies, and a BERT text encoder (open_clip), in one embedding space; pre-trained by its "
                 "authors on studies and reports (weights unchanged)."),
        vision_source=f"HLIP's timm ViT (`visual.trunk.*`: {vision.hidden_size} wide, {vision.num_hidden_layers} "
        f"layers with {'/'.join(vision.attention_levels)} attention, patches {list(vision.patch_size)}, up to "
        f"{vision.max_num_scans} scans), from `{source}`",
        text_source=f"{text_name} (`text.transformer.*`: {text.hidden_size} wide, {text.num_hidden_layers} layers; "
        f"CLS of the last hidden state, open_clip's `cls_last_hidden_state_pooler`), from `{source}`",
        data_source="the source's (HLIP: CT-RATE for chest CT, BrainMRI220K / HeadCT240K for brain); the conversion "
        "trains nothing",
        stages=f"converted by `voxlm convert hlip` from `{source}`; embeddings checked against HLIP's "
        f"src/hlip/visual_encoder.py ({HLIP_REPOSITORY} {HLIP_COMMIT[:8]}) inside open_clip 2.32 on a tiny model",
        objectives="open_clip's contrastive loss (InfoNCE, or SigLIP where `logit_bias` is not 0); `logit_scale` is "
        "in log space in both open_clip and voxlm",
        limits=f"Reports are truncated at {processor.max_length} tokens (the release's `context_length`). Studies "
        "with different scan counts are encoded one at a time (HLIP's study attention has no padding mask); with "
        "several studies in a batch HLIP itself samples random scan positions, voxlm takes the first ones (its "
        "one-study behaviour). The image processor is HLIP's chest-CT preprocessing. HLIP's code is MIT-licensed "
        f"(LICENSE of {HLIP_REPOSITORY}); check the source checkpoint's own license and card ({source}) for the "
        "weights, and the text encoder's (BiomedBERT / CXR-BERT: MIT).",
        preprocessing=preprocessing_summary(processor.image_processor), memory=memory_summary(model),
        repo_or_path=str(output_dir),
    )
