"""M3D's released checkpoints (BAAI-DCAI/M3D) as voxlm folders: `voxlm convert m3d-lamed|m3d-clip SRC OUT`.

    SRC (a folder laid out like GoodBaiBai88/M3D-LaMed-Phi-3-4B / -Llama-2-7B, or that Hub id)
      config.json        read as JSON (its auto_map names M3D's remote code)       -> VoxLMConfig
      weights            shard by shard, `.bin` without unpickling                    -> model(-XXXXX-of-YYYYY).safetensors
      tokenizer          M3D's added tokens; `<im_patch>`'s id from it (config.json lacks it)
    OUT: config, weights, voxlm's modeling code (`trust_remote_code`), a processor with M3D's preprocessing
    (`m3d_volume_processor`) and prompt layout (`prompt_layout="m3d"`), the tokenizer, generation config, model card.

    SRC (a folder laid out like GoodBaiBai88/M3D-CLIP, or that Hub id) -> a VoxCLIP folder with a `VoxCLIPProcessor`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, BertTokenizer, GenerationConfig
from transformers.dynamic_module_utils import custom_object_save

from voxlm.model_cards import memory_summary, preprocessing_summary, render_voxclip_card, render_voxlm_card
from voxlm.modeling import VoxCLIPModel, VoxLMForConditionalGeneration
from voxlm.modeling.convert_m3d import (
    LAMED_TEXT_MODEL_TYPES,
    check_m3d_lamed_fields,
    checkpoint_files,
    convert_m3d_lamed_state_dict,
    m3d_lamed_config,
)
from voxlm.modeling.convert_m3d_clip import (
    M3D_CLIP_MAX_LENGTH,
    M3D_COMMIT,
    check_overrides,
    convert_m3d_clip_state_dict,
    load_converted,
    load_m3d_clip_folder,
    m3d_clip_config,
)
from voxlm.processing import VoxCLIPProcessor, VoxLMProcessor, m3d_volume_processor
from voxlm.processing.processing_voxlm import BOX_END_TOKEN, BOX_START_TOKEN, IMAGE_TOKEN, SEG_TOKEN

from .checkpoints import convert_shards, resolve_source

logger = logging.getLogger(__name__)

M3D_REPOSITORY = "https://github.com/BAAI-DCAI/M3D"


def read_source_config(folder: Path) -> dict:
    """The source's `config.json` as a dict, never through `AutoConfig` (M3D's `auto_map` would run its code)."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; a released M3D repo holds one")
    return json.loads(path.read_text())


def lamed_text_config(m3d_config: dict):
    """The config of the LLM inside a LaMed checkpoint, by its model type alone (enough to choose a tokenizer)."""
    check_m3d_lamed_fields(m3d_config)
    return AutoConfig.for_model(LAMED_TEXT_MODEL_TYPES[m3d_config["model_type"]])


def m3d_token_ids(tokenizer, source: Path) -> dict[str, int | None]:
    """The ids of M3D's added tokens in its tokenizer (M3D's train.py adds `<im_patch>`, `<bx_start>`, `<bx_end>` as
    special tokens and `[SEG]` as a normal one), and the pad token's."""
    ids = {}
    for field, token in (("image_token_id", IMAGE_TOKEN), ("seg_token_id", SEG_TOKEN),
                         ("box_start_token_id", BOX_START_TOKEN), ("box_end_token_id", BOX_END_TOKEN)):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"{source}: the tokenizer has no {token} token; it is not an M3D-LaMed tokenizer")
        ids[field] = token_id
    ids["pad_token_id"] = tokenizer.pad_token_id
    return ids


def convert_m3d_lamed(source: str | Path, output_dir: str | Path, constants: dict | None = None) -> Path:
    """Convert a released M3D-LaMed checkpoint (Phi-3 or Llama, with SegVol) into a voxlm folder that
    `AutoModel` / `AutoProcessor` load, with voxlm installed or through `trust_remote_code`.

    Args:
        source (`str` or `Path`): the released repo's folder, or its Hub id (downloaded).
        output_dir (`str` or `Path`): the voxlm folder to write.
        constants (`dict`, *optional*): numbers of M3D's code that its files do not hold
            (`voxlm.modeling.convert_m3d.M3D_LAMED_CONSTANTS`: head counts, dropout), for checkpoints not built
            with M3D's released sizes.

    Returns:
        `Path`: `output_dir`.
    """
    folder = resolve_source(source)
    m3d_config = read_source_config(folder)
    # Given the LLM's config, AutoTokenizer never reads config.json, whose auto_map would ask to run M3D's code.
    tokenizer = AutoTokenizer.from_pretrained(folder, config=lamed_text_config(m3d_config))
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token  # as M3D's train.py pads
    token_ids = m3d_token_ids(tokenizer, folder)
    output_dir = Path(output_dir)
    shapes, skipped = convert_shards(checkpoint_files(folder), output_dir, convert_m3d_lamed_state_dict,
                                     metadata={"converted_from": str(source)})
    config = m3d_lamed_config(m3d_config, shapes, token_ids, constants)
    write_converted_voxlm(config, shapes, skipped, source, folder, output_dir, token_ids["pad_token_id"])
    processor = VoxLMProcessor(
        image_processor=m3d_volume_processor(config.vision_config.image_size),
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        prompt_layout="m3d",
    )
    processor.save_pretrained(output_dir)
    write_m3d_lamed_card(output_dir, source, config, processor, shapes)
    return output_dir


def write_converted_voxlm(config, shapes: dict[str, tuple[int, ...]], skipped: list[str], source, source_folder: Path,
                          output_dir: Path, pad_token_id: int | None) -> None:
    """Beside the weights `convert_shards` wrote: check that they fill the model of `config` exactly (`ValueError`
    naming the keys otherwise), then write voxlm's code (for `trust_remote_code`), the config, and the source's
    generation config (or one from the LLM's config) with the pad token."""
    if skipped:
        logger.info("%s: %d weights have no voxlm counterpart and were left out (e.g. %s)", source, len(skipped),
                    skipped[0])
    # Built on the meta device: only its class and config are needed, to write the code files and check the keys.
    with torch.device("meta"):
        model = VoxLMForConditionalGeneration(config)
    check_converted_keys(model, shapes, source)
    custom_object_save(model, output_dir, config=config)
    config.save_pretrained(output_dir)
    if (source_folder / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(source_folder)
    else:
        generation_config = GenerationConfig.from_model_config(model.config.text_config)
    generation_config.pad_token_id = pad_token_id
    generation_config.save_pretrained(output_dir)


def check_converted_keys(model, shapes: dict[str, tuple[int, ...]], source) -> None:
    """Raise `ValueError` naming the keys when the converted weights do not fill the model exactly."""
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(key for key in set(expected) & set(shapes) if expected[key] != shapes[key])
    if missing or unexpected or wrong:
        raise ValueError(
            f"{source}: the converted weights do not fit the model built from its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {[(k, shapes[k], expected[k]) for k in wrong[:5]]}"
        )


def source_card_fields(source) -> dict:
    """Card metadata of a converted checkpoint: its Hub id as `base_model` (a local folder has none), and its
    source's license, which the conversion keeps."""
    return dict(base_model=None if Path(source).exists() else str(source), license="other",
                license_name="the source checkpoint's license")


def write_m3d_lamed_card(output_dir: Path, source, config, processor, shapes) -> None:
    """A model card that names the source checkpoint and M3D's code, and what differs from voxlm's own models."""
    parameters = sum(torch.Size(shape).numel() for shape in shapes.values())
    seg = ("M3D's SegVol (its own ViT over the volume, SAM's prompt encoder and mask decoder), prompted by the "
           "hidden state of the token before `[SEG]`, as M3D trained it" if config.seg_config is not None
           else "none (the source has no SegVol)")
    card = render_voxlm_card(
        Path(output_dir).name,
        [],
        vision_source=f"M3D-LaMed's 3D ViT, converted from `{source}`",
        llm_source=f"{config.text_config.model_type}, converted from `{source}`",
        data_source=f"M3D-Data (M3D-Cap, M3D-VQA, M3D-Seg, M3D-RefSeg), as the source was trained ({M3D_REPOSITORY})",
        stages=(f"trained by M3D's authors; converted by `voxlm convert m3d-lamed` from `{source}`, weights unchanged. "
                f"Segmentation head: {seg}. Prompts as M3D wrote them (`prompt_layout=\"m3d\"`: BOS, the image "
                "tokens, the question; no chat template)"),
        limits=f"M3D's code is MIT-licensed; check the source checkpoint's own license and card ({source}).",
        preprocessing=preprocessing_summary(processor.image_processor),
        memory=f"{parameters / 1e6:.1f} M parameters (in the source's dtype)",
        repo_or_path=str(output_dir),
        **source_card_fields(source),
    )
    card.save(Path(output_dir) / "README.md")


def convert_m3d_clip(source: str | Path, output_dir: str | Path, overrides: dict | None = None) -> Path:
    """Convert a released M3D-CLIP (its MONAI ViT, BERT, projections and `logit_scale`) into a VoxCLIP folder (model,
    `VoxCLIPProcessor` with M3D-Cap's preprocessing and M3D's 512-token reports, model card) that loads with
    `AutoModel` / `AutoProcessor`.

    Args:
        source (`str` or `Path`): the released repo's folder (`config.json`, weights, BERT tokenizer files), or its
            Hub id (downloaded).
        output_dir (`str` or `Path`): the VoxCLIP folder to write.
        overrides (`dict`, *optional*): `text_config` / `vision_config` (dicts of config fields, see
            `voxlm.modeling.convert_m3d_clip.m3d_clip_config`; the BERT's head count is in no weight) and
            `max_length` (the reports' token limit, default `M3D_CLIP_MAX_LENGTH`).

    Returns:
        `Path`: `output_dir`.

    Raises:
        `ValueError`: the checkpoint does not match its config (naming the missing, unexpected or wrongly shaped
        tensors), or the tokenizer's vocabulary does not fit the BERT.
    """
    overrides = check_overrides(overrides)
    folder = resolve_source(source)
    m3d_config, state_dict = load_m3d_clip_folder(folder)
    config = m3d_clip_config(m3d_config, state_dict, overrides)
    converted, skipped = convert_m3d_clip_state_dict(state_dict)
    model = VoxCLIPModel(config).eval()
    load_converted(model, converted)
    tokenizer = BertTokenizer.from_pretrained(folder)  # M3D's train_CLIP.py: BertTokenizer
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"The tokenizer of {source} has {len(tokenizer)} tokens, more than the BERT's "
                         f"{config.text_config.vocab_size} word embeddings")
    # M3D-CLIP was trained on M3D-Cap's volumes.
    processor = VoxCLIPProcessor(m3d_volume_processor(config.vision_config.image_size, dataset="cap"), tokenizer,
                                 max_length=overrides.get("max_length", M3D_CLIP_MAX_LENGTH))
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    m3d_clip_card(model, processor, source, output_dir).save(output_dir / "README.md")
    logger.info("M3D-CLIP tensors without a VoxCLIP counterpart, not converted: %s", ", ".join(skipped) or "none")
    return output_dir


def m3d_clip_card(model: VoxCLIPModel, processor, source, output_dir: Path):
    """The model card of a converted M3D-CLIP: lineage names the source, nothing is measured."""
    vision, text = model.config.vision_config, model.config.text_config
    return render_voxclip_card(
        f"voxclip-{output_dir.name}", [], **source_card_fields(source),
        vision_source=f"M3D-CLIP's MONAI ViT (`vision_encoder.*`: {vision.hidden_size} wide, "
        f"{vision.num_hidden_layers} layers, patches {list(vision.patch_size)}, CLS token), from `{source}`",
        text_source=f"M3D-CLIP's BERT (`language_encoder.*`: {text.hidden_size} wide, {text.num_hidden_layers} "
        f"layers, {text.num_attention_heads} heads; its pooler, which M3D-CLIP does not use, dropped), from `{source}`",
        data_source="the source's (M3D-CLIP: M3D-Cap); the conversion trains nothing",
        stages=f"converted by `voxlm convert m3d-clip` from `{source}`; embeddings checked against "
        f"LaMed/src/model/CLIP.py of {M3D_REPOSITORY} {M3D_COMMIT[:8]} on a tiny model",
        objectives="infonce contrastive (M3D-CLIP's symmetric cross-entropy; M3D scales the cosines by `logit_scale`, "
        "VoxCLIP by `exp(logit_scale)`, so the converted `logit_scale` is the log of M3D's)",
        limits=f"Reports are truncated at {processor.max_length} tokens (M3D's `max_length`); M3D's own loader keeps "
        f"randomly chosen whole sentences of longer ones instead. M3D's code is MIT-licensed; check the source "
        f"checkpoint's own license and card ({source}).",
        preprocessing=preprocessing_summary(processor.image_processor), memory=memory_summary(model),
        repo_or_path=str(output_dir),
    )
