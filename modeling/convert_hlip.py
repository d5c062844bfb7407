"""Convert a released HLIP checkpoint (Zch0414/hlip: an open_clip `CustomTextCLIP` whose vision tower is HLIP's timm
`HLIPVisualEncoder`) into `HLIPModel` weights and config (the folder with its processor and card:
`voxlm.conversion.convert_hlip`).

A release holds an open_clip model config (`open_clip_config.json` with `model_cfg`, as open_clip's Hub releases
do, or the bare model config of HLIP's `src/hlip/model_configs/*.json` beside an older `.pt`) and the weights:

    visual.trunk.*      HLIP's timm ViT: patch_embed.proj, cls_token, reg_token, spatial_posemb, sequential_posemb,
                        norm_pre, blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm
    visual.head.proj    timm_proj "linear" (no bias)
    text.transformer.*  the BERT of `HFTextEncoder` (BiomedBERT, or CXR-BERT for chest CT); text.proj (no bias)
    logit_scale         log space in open_clip as in voxlm (used as it is); logit_bias when trained with SigLIP

The model config names HLIP's timm function (`timm_model_name`), whose architecture is Python code, not JSON: the
functions of HLIP's `visual_encoder.py` are `HLIP_VARIANTS`; any of their arguments (HLIP's own names) can be
overridden, e.g. for checkpoints not at a released size. The BERT's sizes are read from its weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .configuration_hlip import HLIPConfig, HLIPVisionConfig
from .convert_m3d import load_state_dict_file
from .convert_m3d_clip import bert_config_from_weights

HLIP_COMMIT = "fe8d764fd4863e1040a39bfae8eb0b05f6d94fc9"  # the Zch0414/hlip commit tests/hlip compares against
_VIT_BASE = dict(in_chans=1, depth=12, embed_dim=768, num_heads=12, mlp_ratio=4.0, qkv_bias=True, reg_tokens=0,
                 pre_norm=False)
# HLIP's registered timm functions (src/hlip/visual_encoder.py): their model arguments, in HLIP's names.
HLIP_VARIANTS = {
    "vit_base_singlescan_h2_token2744": dict(
        _VIT_BASE, max_num_scans=1, slice_attn_indexes=(0, 1, 3, 4, 6, 7, 9, 10), study_attn_indexes=(2, 5, 8, 11),
        img_size=(112, 336, 336), patch_size=(8, 24, 24)),
    "vit_base_multiscan_h2_token588": dict(
        _VIT_BASE, max_num_scans=40, scan_attn_indexes=(0, 1, 3, 4, 6, 7, 9, 10), study_attn_indexes=(2, 5, 8, 11),
        img_size=(48, 224, 224), patch_size=(16, 16, 16)),
    "vit_base_multiscan_h2_token1176": dict(
        _VIT_BASE, max_num_scans=40, scan_attn_indexes=(0, 1, 3, 4, 6, 7, 9, 10), study_attn_indexes=(2, 5, 8, 11),
        img_size=(48, 224, 224), patch_size=(8, 16, 16)),
    "vit_base_multiscan_h3_token1176": dict(
        _VIT_BASE, max_num_scans=40, slice_attn_indexes=(0, 3, 6, 9), scan_attn_indexes=(1, 4, 7, 10),
        study_attn_indexes=(2, 5, 8, 11), img_size=(48, 224, 224), patch_size=(8, 16, 16)),
}
ATTENTION_INDEXES = {"slice": "slice_attn_indexes", "scan": "scan_attn_indexes", "study": "study_attn_indexes"}
OVERRIDES = (*_VIT_BASE, "max_num_scans", *ATTENTION_INDEXES.values(), "img_size", "patch_size", "context_length")
CONFIG_FILE = "open_clip_config.json"
# Weight files of a release, in the order they are looked for: open_clip's Hub files, then a training `.pt`.
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# HLIP key (after `visual.trunk.` / `visual.` / `text.`) -> HLIPModel key.
VISION_RENAMES = {
    "patch_embed.proj.": "embeddings.patch_embedding.", "cls_token": "embeddings.cls_token",
    "reg_token": "embeddings.register_tokens", "spatial_posemb": "embeddings.spatial_position_embeddings",
    "sequential_posemb": "embeddings.scan_position_embeddings", "norm_pre.": "pre_layernorm.",
    "norm.": "post_layernorm.",
}
BLOCK_RENAMES = {"attn.proj.": "attn.out_proj.", "mlp.fc1.": "mlp.linear1.", "mlp.fc2.": "mlp.linear2."}
RENAMES = {"visual.head.proj.": "visual_projection.", "text.proj.": "text_projection.",
           "text.transformer.": "text_model."}


def load_hlip_folder(source_folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The open_clip model config (as a dict) and the state dict of a released HLIP folder.

    Args:
        source_folder (`str` or `Path`): a folder with `open_clip_config.json` (or one model config `.json`
            with `vision_cfg`) and `open_clip_model.safetensors`, `open_clip_pytorch_model.bin` or one `.pt`.

    Raises:
        `FileNotFoundError`: no config or no weights.
    """
    folder = Path(source_folder)
    if (folder / CONFIG_FILE).is_file():
        model_cfg = json.loads((folder / CONFIG_FILE).read_text()).get("model_cfg")
    else:
        configs = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
        model_cfgs = [config for config in configs if "vision_cfg" in config]
        model_cfg = model_cfgs[0] if len(model_cfgs) == 1 else None
    if not isinstance(model_cfg, dict):
        raise FileNotFoundError(f"{folder}: no open_clip model config ({CONFIG_FILE} with `model_cfg`, or one "
                                "model config .json with `vision_cfg` as HLIP's src/hlip/model_configs hold)")
    weights = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()] or sorted(folder.glob("*.pt"))
    if not weights:
        raise FileNotFoundError(f"{folder}: no weights ({', '.join(WEIGHT_FILES)} or a .pt checkpoint)")
    state_dict = load_state_dict_file(weights[0])
    # HLIP's training saves DDP-wrapped models (open_clip's `module.` prefix).
    return model_cfg, {key.removeprefix("module."): value for key, value in state_dict.items()}


def check_overrides(overrides: dict | None) -> dict:
    """`overrides`, or `{}`; raises `ValueError` naming unknown keys."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"Unknown HLIP conversion overrides {unknown}; use HLIP's model arguments {OVERRIDES}")
    return overrides


def hlip_vision_config(model_args: dict) -> HLIPVisionConfig:
    """The `HLIPVisionConfig` of HLIP's timm model arguments (a `HLIP_VARIANTS` entry, overrides applied)."""
    levels = [None] * model_args["depth"]
    for level, field in ATTENTION_INDEXES.items():
        for index in model_args.get(field, ()):
            if not 0 <= index < len(levels) or levels[index] is not None:
                raise ValueError(f"HLIP `{field}` index {index}: not a block of `depth` {len(levels)}, or one given "
                                 "two attention levels")
            levels[index] = level
    if None in levels:
        # HLIP's forward leaves such a block's tokens in the (B, S, D', H', W', E) layout, which no block reads.
        raise ValueError(f"HLIP blocks {[i for i, level in enumerate(levels) if level is None]} are in none of "
                         f"{list(ATTENTION_INDEXES.values())}")
    width = model_args["embed_dim"]
    return HLIPVisionConfig(
        image_size=model_args["img_size"], patch_size=model_args["patch_size"], num_channels=model_args["in_chans"],
        hidden_size=width, intermediate_size=int(width * model_args["mlp_ratio"]),
        num_hidden_layers=model_args["depth"], num_attention_heads=model_args["num_heads"],
        qkv_bias=model_args["qkv_bias"], num_register_tokens=model_args["reg_tokens"],
        pre_norm=model_args["pre_norm"], max_num_scans=model_args["max_num_scans"], attention_levels=levels,
    )


def hlip_config(model_cfg: dict, state_dict: dict[str, torch.Tensor], overrides: dict | None = None) -> HLIPConfig:
    """The `HLIPConfig` that reproduces a released HLIP.

    Args:
        model_cfg (`dict`): the open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`).
        state_dict (`dict[str, torch.Tensor]`): its weights (the BERT's sizes come from them).
        overrides (`dict`, *optional*): HLIP model arguments (`OVERRIDES`, e.g. `{"img_size": [48, 224, 224]}`)
            that replace those of the variant `vision_cfg.timm_model_name` names.

    Raises:
        `ValueError`: an unknown variant without complete overrides, unknown override keys, or an open_clip
        setting (pooling, projection) that HLIP's released towers do not use.
    """
    overrides = check_overrides(overrides)
    vision_cfg, text_cfg = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    name = vision_cfg.get("timm_model_name")
    model_args = {**HLIP_VARIANTS.get(name, {}),
                  **{key: value for key, value in overrides.items() if key != "context_length"}}
    missing = sorted({"img_size", "patch_size", "max_num_scans", *_VIT_BASE} - set(model_args))
    if missing:
        raise ValueError(f"Unknown HLIP timm model {name!r} (known: {sorted(HLIP_VARIANTS)}); give its model "
                         f"arguments as overrides, missing {missing}")
    settings = {"vision_cfg.timm_pool": (vision_cfg.get("timm_pool", "avg"), "token"),
                "vision_cfg.timm_proj": (vision_cfg.get("timm_proj", "linear"), "linear"),
                "vision_cfg.timm_proj_bias": (vision_cfg.get("timm_proj_bias", False), False),
                "text_cfg.hf_pooler_type": (text_cfg.get("hf_pooler_type"), "cls_last_hidden_state_pooler"),
                "text_cfg.hf_proj_type": (text_cfg.get("hf_proj_type"), "linear")}
    for field, (value, expected) in settings.items():
        if value != expected:
            raise ValueError(f"HLIP model config `{field}` is {value!r}; only HLIP's {expected!r} converts")
    text = bert_config_from_weights(state_dict, prefix="text.transformer.")
    if text["num_attention_heads"] is None:
        raise ValueError(f"The HLIP BERT is {text['hidden_size']} wide, not a multiple of BERT's 64-wide heads")
    return HLIPConfig(vision_config=hlip_vision_config(model_args), text_config=text,
                      projection_dim=model_cfg.get("embed_dim", 512))


def convert_hlip_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HLIP (open_clip) keys -> `HLIPModel` keys.

    Args:
        state_dict (`dict[str, torch.Tensor]`): a released HLIP state dict (`module.` prefixes removed).

    Returns:
        `(converted, skipped)`: HLIPModel weights, and the source keys that have no counterpart (BERT's pooler,
        which open_clip's `cls_last_hidden_state_pooler` never calls, and an old `position_ids` buffer). Keys of no
        known HLIP part are kept under their own names, so that loading reports them as unexpected.
    """
    converted, skipped = {}, []
    for key, value in state_dict.items():
        if key.startswith("text.transformer.pooler.") or key == "text.transformer.embeddings.position_ids":
            skipped.append(key)
        elif key.startswith("visual.trunk."):
            converted["vision_model." + vision_key(key[len("visual.trunk."):])] = value
        else:
            prefix = next((p for p in RENAMES if key.startswith(p)), None)
            converted[key if prefix is None else RENAMES[prefix] + key[len(prefix):]] = value
    converted.setdefault("logit_bias", torch.tensor(0.0))  # open_clip has one only when trained with SigLIP
    return converted, skipped


def vision_key(key: str) -> str:
    """A key of HLIP's timm ViT (without `visual.trunk.`) -> its `HLIPVisionModel` key (unknown ones unchanged)."""
    block = re.match(r"blocks\.(\d+)\.(.+)", key)
    if block:
        index, rest = block.groups()
        prefix = next((p for p in BLOCK_RENAMES if rest.startswith(p)), None)
        return f"layers.{index}." + (rest if prefix is None else BLOCK_RENAMES[prefix] + rest[len(prefix):])
    prefix = next((p for p in VISION_RENAMES if key == p or (p.endswith(".") and key.startswith(p))), None)
    return key if prefix is None else VISION_RENAMES[prefix] + key[len(prefix):]


def hlip_key(key: str) -> str:
    """The HLIP key an `HLIPModel` key comes from (for error messages)."""
    if key.startswith("vision_model."):
        key = key[len("vision_model."):]
        block = re.match(r"layers\.(\d+)\.(.+)", key)
        if block:
            index, rest = block.groups()
            for source, target in BLOCK_RENAMES.items():
                rest = source + rest[len(target):] if rest.startswith(target) else rest
            return f"visual.trunk.blocks.{index}.{rest}"
        for source, target in VISION_RENAMES.items():
            if key.startswith(target):
                return "visual.trunk." + source + key[len(target):]
        return "visual.trunk." + key
    for source, target in RENAMES.items():
        if key.startswith(target):
            return source + key[len(target):]
    return key


def load_converted(model, converted: dict[str, torch.Tensor]) -> None:
    """`model.load_state_dict(converted, strict=True)`, after a check that raises `ValueError` naming every missing,
    unexpected or wrongly shaped tensor by its HLIP name."""
    expected = model.state_dict()
    missing = [f"{hlip_key(key)} (-> {key})" for key in expected if key not in converted]
    unexpected = sorted(key for key in converted if key not in expected)
    shapes = [f"{hlip_key(key)}: {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
              for key, value in converted.items() if key in expected and value.shape != expected[key].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors of no HLIP part: {', '.join(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} tensors whose shape does not match the model config: {'; '.join(shapes)}")
    if problems:
        raise ValueError("The HLIP checkpoint does not convert: " + " | ".join(problems))
    model.load_state_dict(converted, strict=True)


__all__ = [
    "HLIP_COMMIT", "HLIP_VARIANTS", "check_overrides", "convert_hlip_state_dict", "hlip_config", "load_converted",
    "load_hlip_folder",
]
