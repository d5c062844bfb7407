"""Convert a released COLIPRI checkpoint (Hub `microsoft/colipri`: one `model.safetensors`, the state dict of colipri's
`Model`) into `ColipriModel` weights and config (the folder with its processor and card:
`voxlm.conversion.convert_colipri`).

The release ships no config file: its architecture is colipri's packaged Hydra configs (colipri 0.1.3
`configs/config.yaml` and `configs/model/**/default.yaml`), whose values are `COLIPRI_DEFAULTS` here under their own
dotted names. `overrides` replaces them with the same names (what colipri's `get_model(**kwargs)` takes as Hydra
dot-list overrides), plus `text_config` (BERT fields: the sizes are read from the weights, but the head count is in no
weight; 12 for CXR-BERT, i.e. `hidden_size // 64`).
"""

from __future__ import annotations

import math
import re

import torch

from .configuration_colipri import ColipriConfig, ColipriVisionConfig
from .convert_m3d_clip import bert_config_from_weights
from .modeling_colipri import ColipriModel

COLIPRI_VERSION = "0.1.3"  # the PyPI release of microsoft/colipri whose code tests/colipri compares against
# Note: colipri's `Processor.process_text` pads and truncates every report to 512 tokens (`max_length=512  # TODO`).
COLIPRI_MAX_LENGTH = 512
# CXR-BERT-specialized, whose tokenizer colipri loads (configs/processor/tokenizer/default.yaml).
COLIPRI_TOKENIZER = "microsoft/BiomedVLP-CXR-BERT-specialized"
COLIPRI_TOKENIZER_REVISION = "5157bdba1437a3aed316dacb1a5b68edf96b9902"
BACKBONE = "model.image_encoder.backbone."
# colipri 0.1.3's packaged config values, by their dotted Hydra names (`${...}` interpolations resolved).
COLIPRI_DEFAULTS = {
    "input_size": 192,
    "image_embed_dim": 864,
    "projection_dim": 768,
    f"{BACKBONE}input_channels": 1,
    f"{BACKBONE}eva_depth": 16,
    f"{BACKBONE}eva_numheads": 12,
    f"{BACKBONE}patch_embed_size": [8, 8, 8],
    f"{BACKBONE}use_rot_pos_emb": True,
    f"{BACKBONE}use_abs_pos_embed": False,
    f"{BACKBONE}init_values": 0.1,
    f"{BACKBONE}scale_attn_inner": True,
    f"{BACKBONE}num_register_tokens": 0,
    "model.image_encoder.pooler.num_heads": 12,
    "model.text_encoder.pooler.num_heads": 12,
}
# Settings `ColipriModel` builds in, with the released value: another value is another architecture.
FIXED = {f"{BACKBONE}use_rot_pos_emb": True, f"{BACKBONE}use_abs_pos_embed": False,
         f"{BACKBONE}scale_attn_inner": True, f"{BACKBONE}num_register_tokens": 0}
OVERRIDES = (*COLIPRI_DEFAULTS, "text_config")
# colipri prefix -> ColipriModel prefix. Keys are matched by their full prefix, which no two entries share.
PREFIXES = {
    "image_encoder.backbone.down_projection.proj.": "vision_model.patch_embed.",
    "image_encoder.backbone.eva.norm.": "vision_model.norm.",
    "image_encoder.projector.": "vision_model.projector.",
    "image_encoder.pooler.": "vision_model.pooler.",
    "text_encoder.backbone.": "text_model.",
    "text_encoder.pooler.": "text_pooler.",
}
BLOCK = re.compile(r"image_encoder\.backbone\.eva\.blocks\.(\d+)\.(.+)")
# timm EvaBlock names -> ColipriBlock names, per module path inside a block (the rest keep their names).
BLOCK_MODULES = {"attn.norm": "attn.inner_norm", "attn.proj": "attn.out_proj", "mlp.fc1_g": "mlp.gate_proj",
                 "mlp.fc1_x": "mlp.up_proj", "mlp.fc2": "mlp.down_proj", "gamma_1": "layer_scale1",
                 "gamma_2": "layer_scale2"}
# Primus' mask token fills the patches that masked-image-modelling dropped; inference never drops any.
SKIPPED = ("image_encoder.backbone.mask_token",)


def check_overrides(overrides: dict | None) -> dict:
    """`overrides`, or `{}`; raises `ValueError` naming unknown keys and unsupported values."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"Unknown COLIPRI conversion overrides {unknown}; use {list(OVERRIDES)}")
    for key, value in FIXED.items():
        if overrides.get(key, value) != value:
            raise ValueError(f"COLIPRI `{key}`={overrides[key]!r} is not convertible: ColipriModel builds {value!r}")
    if overrides.get(f"{BACKBONE}init_values", 0.1) is None:
        raise ValueError(f"COLIPRI `{BACKBONE}init_values`=None (no layer scale) is not convertible")
    return overrides


def colipri_config(state_dict: dict[str, torch.Tensor], overrides: dict | None = None) -> ColipriConfig:
    """The `ColipriConfig` of a COLIPRI checkpoint: colipri's packaged values with `overrides` applied, and the BERT's
    sizes from its weights.

    Args:
        state_dict (`dict[str, torch.Tensor]`): the colipri state dict.
        overrides (`dict`, *optional*): keys of `COLIPRI_DEFAULTS` (colipri's own dotted names) and `text_config`.

    Raises:
        `ValueError`: unknown overrides, unsupported values, or a BERT head count that must be given.
    """
    overrides = check_overrides(overrides)
    settings = {**COLIPRI_DEFAULTS, **{k: v for k, v in overrides.items() if k != "text_config"}}
    width, heads = settings["image_embed_dim"], settings[f"{BACKBONE}eva_numheads"]
    vision = ColipriVisionConfig(
        image_size=settings["input_size"], patch_size=settings[f"{BACKBONE}patch_embed_size"],
        num_channels=settings[f"{BACKBONE}input_channels"], embed_dim=width,
        num_hidden_layers=settings[f"{BACKBONE}eva_depth"], num_attention_heads=heads,
        intermediate_size=int(width * 4 * 2 / 3),  # Primus' mlp_ratio, truncated as timm's EvaBlock does
        layer_scale_init_value=settings[f"{BACKBONE}init_values"], hidden_size=settings["projection_dim"],
        pooler_num_heads=settings["model.image_encoder.pooler.num_heads"],
    )
    text = {**bert_config_from_weights(state_dict, prefix="text_encoder.backbone."),
            **overrides.get("text_config", {})}
    if text["num_attention_heads"] is None:
        raise ValueError(f"The COLIPRI BERT is {text['hidden_size']} wide, not a multiple of BERT's 64-wide heads, "
                         "and no weight holds its head count: give overrides={'text_config': "
                         "{'num_attention_heads': ...}}")
    return ColipriConfig(vision_config=vision, text_config=text,
                         text_pooler_num_heads=settings["model.text_encoder.pooler.num_heads"])


def colipri_key(key: str) -> str | None:
    """The `ColipriModel` key of a colipri key, or `None` when it has none."""
    if match := BLOCK.fullmatch(key):
        index, name = match.groups()
        module, _, param = name.rpartition(".")
        if module in BLOCK_MODULES:
            name = f"{BLOCK_MODULES[module]}.{param}"
        elif name in BLOCK_MODULES:  # the layer scales are parameters of the block itself
            name = BLOCK_MODULES[name]
        return f"vision_model.layers.{index}.{name}"
    prefix = next((p for p in PREFIXES if key.startswith(p)), None)
    return None if prefix is None else PREFIXES[prefix] + key[len(prefix):]


def convert_colipri_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """colipri keys -> `ColipriModel` keys.

    - `image_encoder.backbone.*` (Primus without its decoder) -> `vision_model.patch_embed / layers / norm`;
    - `image_encoder.projector.*`, `image_encoder.pooler.*` -> `vision_model.projector.*`, `vision_model.pooler.*`;
    - `text_encoder.backbone.*` (CXR-BERT's `BertModel`, no pooler) -> `text_model.*`; `text_encoder.pooler.*` ->
      `text_pooler.*`;
    - `softmax_temperature` -> `logit_scale = -log(T)`; `logit_bias` = 0;
    - `image_encoder.backbone.mask_token` is skipped (`SKIPPED`).

    Returns:
        `(converted, skipped)`. Keys of no known part are kept under their own names, so that loading reports them.

    Raises:
        `ValueError`: a `softmax_temperature` that is not positive.
    """
    converted, skipped = {}, []
    for key, value in state_dict.items():
        if key in SKIPPED:
            skipped.append(key)
        elif key == "softmax_temperature":
            # Note: colipri's `classify` divides the cosines by `softmax_temperature` (model/multimodal.py), voxlm
            # multiplies them by `exp(logit_scale)` (CLIP's convention).
            if not value.item() > 0:
                raise ValueError(f"COLIPRI `softmax_temperature` is {value.item()}; it must be > 0")
            converted["logit_scale"] = torch.tensor(-math.log(value.item()), dtype=torch.float32)
        else:
            converted[colipri_key(key) or key] = value
    converted["logit_bias"] = torch.tensor(0.0)
    return converted, skipped


def source_key(key: str) -> str:
    """The colipri key a `ColipriModel` key comes from (for error messages)."""
    if match := re.fullmatch(r"vision_model\.layers\.(\d+)\.(.+)", key):
        index, name = match.groups()
        module, _, param = name.rpartition(".")
        inverse = {target: source for source, target in BLOCK_MODULES.items()}
        name = f"{inverse[module]}.{param}" if module in inverse else inverse.get(name, name)
        return f"image_encoder.backbone.eva.blocks.{index}.{name}"
    target = next((t for t in PREFIXES.values() if key.startswith(t)), None)
    source = next((s for s, t in PREFIXES.items() if t == target), None)
    return key if source is None else source + key[len(target):]


def load_converted(model: ColipriModel, converted: dict[str, torch.Tensor]) -> None:
    """`model.load_state_dict(converted, strict=True)`, after a check that raises `ValueError` naming every missing,
    unexpected or wrongly shaped tensor (by its colipri name where it has one)."""
    expected = model.state_dict()
    missing = [f"{source_key(key)} (-> {key})" for key in expected if key not in converted]
    unexpected = sorted(key for key in converted if key not in expected)
    shapes = [f"{source_key(key)}: {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
              for key, value in converted.items() if key in expected and value.shape != expected[key].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors of no COLIPRI part: {', '.join(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} tensors whose shape does not match the config: {'; '.join(shapes)}")
    if problems:
        raise ValueError("The COLIPRI checkpoint does not convert: " + " | ".join(problems))
    model.load_state_dict(converted, strict=True)


__all__ = ["COLIPRI_DEFAULTS", "COLIPRI_MAX_LENGTH", "colipri_config", "convert_colipri_state_dict", "load_converted"]
