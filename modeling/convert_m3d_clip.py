"""Convert a released M3D-CLIP checkpoint (Hub `GoodBaiBai88/M3D-CLIP`, `model_type` `m3d_clip`) into VoxCLIP weights
and config (the folder with its processor and card: `voxlm.conversion.convert_m3d_clip`).

M3D-CLIP (`LaMed/src/model/CLIP.py` of BAAI-DCAI/M3D) is a MONAI `ViT` with a CLS token (`vision_encoder.*`), a
`BertModel` (`language_encoder.*`), two hidden -> hidden Linear projections with bias (`mm_vision_proj.*`,
`mm_language_proj.*`) and a `logit_scale`:

    volume (B, 1, D, H, W) -> ViT -> final norm -> (B, 1 + N, E) -> mm_vision_proj -> L2 norm -> token 0 (CLS)
    report ids (B, L) -> BERT last_hidden_state (B, L, E) -> mm_language_proj -> L2 norm -> token 0 (CLS)

which is a VoxCLIP with CLS pooling on both towers (BERT's pooler unused), `projection_dim = E` and
`projection_bias=True`. The conversion reads `config.json` as JSON (a release's `auto_map` points to M3D's remote
code, which is never run) and the weights without unpickling (`load_state_dict_file`). The release's config holds no
BERT config: the BERT's sizes are read from its weight shapes, except the number of attention heads, which no shape
holds (default `hidden_size // 64`, BERT's head width: 12 for BERT-base; override with
`overrides={"text_config": {"num_attention_heads": ...}}`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .configuration_voxclip import VoxCLIPConfig
from .configuration_voxvit import VoxViTConfig
from .convert_m3d import SINGLE_FILES, checkpoint_files, convert_monai_vit_state_dict, load_state_dict_file
from .modeling_voxclip import VoxCLIPModel

M3D_COMMIT = "63e72005a2304eda74579870239bfc7b04b0edae"  # the BAAI-DCAI/M3D commit tests/m3d_lamed compares against
# Note: M3D tokenizes reports with `max_length=512` (LaMed/src/train/train_CLIP.py DataArguments.max_length, and
# Bench/eval/eval_itr.py --max_length), truncation and padding="max_length"; the config's `max_text_len` (128) is
# never read by M3D's code.
M3D_CLIP_MAX_LENGTH = 512
# M3DCLIPConfig's defaults (LaMed/src/model/CLIP.py), for fields a config.json leaves out.
M3D_CLIP_DEFAULTS = dict(in_channels=1, img_size=(32, 256, 256), patch_size=(4, 16, 16), hidden_size=768,
                         mlp_dim=3072, num_layers=12, num_heads=12, pos_embed="perceptron", dropout_rate=0.0,
                         spatial_dims=3)
# Unsharded weight files of a release, in the order they are looked for (after the sharded indexes):
# `save_pretrained`'s, then train_CLIP.py's `torch.save`.
WEIGHT_FILES = (*SINGLE_FILES, "model_params.bin")
# M3D-CLIP prefix -> VoxCLIP prefix, for everything but the ViT (which `convert_monai_vit_state_dict` maps).
RENAMES = {"language_encoder.": "text_model.", "mm_vision_proj.": "visual_projection.",
           "mm_language_proj.": "text_projection."}
OVERRIDES = ("text_config", "vision_config", "max_length")


def load_m3d_clip_folder(source_folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The `config.json` (as a dict) and the full state dict of a released M3D-CLIP folder.

    Args:
        source_folder (`str` or `Path`): a folder with `config.json` and one of `WEIGHT_FILES` (sharded ones too).

    Raises:
        `FileNotFoundError`: no config or no weights; `ValueError`: the config is not an `m3d_clip` one.
    """
    folder = Path(source_folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (an M3D-CLIP release holds one)")
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "m3d_clip":
        raise ValueError(f"{folder}/config.json has model_type {config.get('model_type')!r}, not 'm3d_clip'")
    state_dict = {}
    for file in checkpoint_files(folder, WEIGHT_FILES):
        state_dict.update(load_state_dict_file(file))
    return config, state_dict


def bert_config_from_weights(state_dict: dict[str, torch.Tensor], prefix: str = "language_encoder.") -> dict:
    """The `BertConfig` fields that M3D-CLIP's BERT weights determine (`model_type` included), read from their shapes.

    `num_attention_heads` is no weight's shape: it is `hidden_size // 64` (the head width of every Google BERT,
    BERT-base's 12 included) when 64 divides the width, else `None` (the caller must give it). Fields no weight
    holds (`layer_norm_eps`, `hidden_act`, ...) keep `BertConfig`'s defaults, which are BERT-base's.

    Args:
        state_dict (`dict[str, torch.Tensor]`): the M3D-CLIP state dict.
        prefix (`str`, defaults to `"language_encoder."`): where the BERT's weights are.

    Raises:
        `ValueError`: naming the BERT weights that are missing.
    """
    shape_keys = {name: f"{prefix}{name}" for name in (
        "embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight", "encoder.layer.0.intermediate.dense.weight")}
    missing = sorted(key for key in shape_keys.values() if key not in state_dict)
    if missing:
        raise ValueError(f"The M3D-CLIP checkpoint has no BERT text encoder weights {missing}")
    words = state_dict[shape_keys["embeddings.word_embeddings.weight"]].shape  # (V, E)
    layers = {int(m.group(1)) for key in state_dict if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.",
                                                                      key))}
    return dict(
        model_type="bert",
        vocab_size=words[0],
        hidden_size=words[1],
        num_hidden_layers=max(layers) + 1,
        num_attention_heads=words[1] // 64 if words[1] % 64 == 0 else None,
        intermediate_size=state_dict[shape_keys["encoder.layer.0.intermediate.dense.weight"]].shape[0],
        max_position_embeddings=state_dict[shape_keys["embeddings.position_embeddings.weight"]].shape[0],
        type_vocab_size=state_dict[shape_keys["embeddings.token_type_embeddings.weight"]].shape[0],
    )


def m3d_clip_config(
    m3d_config: dict, state_dict: dict[str, torch.Tensor], overrides: dict | None = None
) -> VoxCLIPConfig:
    """The `VoxCLIPConfig` that reproduces an M3D-CLIP.

    Args:
        m3d_config (`dict`): the release's `config.json` (M3DCLIPConfig's fields; missing ones take its defaults).
        state_dict (`dict[str, torch.Tensor]`): its weights (the BERT's sizes and the ViT's qkv bias come from them).
        overrides (`dict`, *optional*): `text_config` and / or `vision_config`: dicts of fields that replace the
            derived ones (e.g. `{"text_config": {"num_attention_heads": 16}}`).

    Raises:
        `ValueError`: unknown override keys, or an M3D setting VoxCLIP cannot represent.
    """
    overrides = check_overrides(overrides)
    m3d = {**M3D_CLIP_DEFAULTS, **{k: v for k, v in m3d_config.items() if k in M3D_CLIP_DEFAULTS}}
    if m3d["spatial_dims"] != 3:
        raise ValueError(f"M3D-CLIP `spatial_dims` {m3d['spatial_dims']} is not 3: VoxViT encodes 3D volumes")
    if m3d["pos_embed"] not in ("perceptron", "conv"):
        raise ValueError(f"M3D-CLIP `pos_embed` {m3d['pos_embed']!r}: only 'perceptron' and 'conv' patches convert")
    vision = dict(
        image_size=m3d["img_size"], patch_size=m3d["patch_size"], num_channels=m3d["in_channels"],
        hidden_size=m3d["hidden_size"], intermediate_size=m3d["mlp_dim"], num_hidden_layers=m3d["num_layers"],
        num_attention_heads=m3d["num_heads"], hidden_dropout_prob=float(m3d["dropout_rate"]),
        # M3D's ViT builds MONAI blocks with qkv_bias=False; read it from the weights all the same.
        qkv_bias="vision_encoder.blocks.0.attn.qkv.bias" in state_dict, pooling="cls",
    )
    text = bert_config_from_weights(state_dict)
    vision.update(overrides.get("vision_config", {}))
    text.update(overrides.get("text_config", {}))
    heads, width = text["num_attention_heads"], text["hidden_size"]
    if heads is None or width % heads:
        why = ("not a multiple of BERT's 64-wide heads, and no weight holds the number of attention heads"
               if heads is None else f"which {heads} attention heads do not divide")
        raise ValueError(f"The M3D-CLIP BERT is {width} wide, {why}: give the number of heads as "
                         "overrides={'text_config': {'num_attention_heads': ...}}")
    # M3D's projections are Linear(hidden_size, hidden_size) on both towers.
    return VoxCLIPConfig(vision_config=VoxViTConfig(**vision), text_config=text, projection_dim=m3d["hidden_size"],
                         projection_bias=True, text_pooling="cls", contrastive_loss="infonce")


def check_overrides(overrides: dict | None) -> dict:
    """`overrides`, or `{}`; raises `ValueError` naming unknown keys."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"Unknown M3D-CLIP conversion overrides {unknown}; use {OVERRIDES}")
    return overrides


def convert_m3d_clip_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """M3D-CLIP keys -> `VoxCLIPModel` keys.

    - `vision_encoder.*` -> `vision_model.*` (`convert_monai_vit_state_dict`; MONAI's never-called cross-attention
      norms and classification head have no counterpart);
    - `language_encoder.*` -> `text_model.*`, except BERT's pooler (`M3DCLIP.encode_text` embeds the CLS token of
      `last_hidden_state`; VoxCLIP's BERT has no pooler) and an old release's `embeddings.position_ids` buffer;
    - `mm_vision_proj.*` / `mm_language_proj.*` -> `visual_projection.*` / `text_projection.*`;
    - `logit_scale` -> its log (see the note below); `logit_bias` (SigLIP's, unused by InfoNCE) is set to 0.

    Args:
        state_dict (`dict[str, torch.Tensor]`): an M3D-CLIP checkpoint.

    Returns:
        `(converted, skipped)`: VoxCLIP weights, and the source keys that have no counterpart. Keys of no known
        M3D-CLIP part are kept under their own names, so that loading reports them as unexpected.

    Raises:
        `ValueError`: a `logit_scale` that is not positive (VoxCLIP's scale is `exp(logit_scale)`).
    """
    converted, skipped = {}, []
    for key, value in state_dict.items():
        if key.startswith("vision_encoder."):
            vision = convert_monai_vit_state_dict({key: value})  # empty for the keys without a VoxViT counterpart
            converted.update({f"vision_model.{name}": tensor for name, tensor in vision.items()})
            skipped += [] if vision else [key]
        elif key.startswith("language_encoder.pooler.") or key == "language_encoder.embeddings.position_ids":
            skipped.append(key)
        elif key == "logit_scale":
            # Note: M3DCLIP.forward multiplies the cosines by `logit_scale` itself (LaMed/src/model/CLIP.py), VoxCLIP
            # by `exp(logit_scale)` (CLIP's convention): the converted value is the log of M3D's.
            if not value.item() > 0:
                raise ValueError(f"M3D-CLIP `logit_scale` is {value.item()}; VoxCLIP's exp(logit_scale) needs it > 0")
            converted["logit_scale"] = value.double().log().float()
        else:
            prefix = next((p for p in RENAMES if key.startswith(p)), None)
            converted[key if prefix is None else RENAMES[prefix] + key[len(prefix):]] = value
    converted["logit_bias"] = torch.tensor(0.0)
    return converted, skipped


def m3d_clip_key(key: str) -> str:
    """The M3D-CLIP key a VoxCLIP key comes from (for error messages; a `perceptron` patch embedding)."""
    if key.startswith("vision_model."):
        key = "vision_encoder." + key[len("vision_model."):]
        return key.replace("patch_embedding.patch_embeddings.", "patch_embedding.patch_embeddings.1.")
    for source, target in RENAMES.items():
        if key.startswith(target):
            return source + key[len(target):]
    return key


def load_converted(model: VoxCLIPModel, converted: dict[str, torch.Tensor]) -> None:
    """`model.load_state_dict(converted, strict=True)`, after a check that raises `ValueError` naming every missing,
    unexpected or wrongly shaped tensor by its M3D-CLIP name."""
    expected = model.state_dict()
    missing = [f"{m3d_clip_key(key)} (-> {key})" for key in expected if key not in converted]
    unexpected = sorted(key for key in converted if key not in expected)
    shapes = [f"{m3d_clip_key(key)}: {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
              for key, value in converted.items() if key in expected and value.shape != expected[key].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors of no M3D-CLIP part: {', '.join(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} tensors whose shape does not match config.json: {'; '.join(shapes)}")
    if problems:
        raise ValueError("The M3D-CLIP checkpoint does not convert: " + " | ".join(problems))
    model.load_state_dict(converted, strict=True)


__all__ = [
    "M3D_CLIP_MAX_LENGTH", "bert_config_from_weights", "convert_m3d_clip_state_dict", "load_converted",
    "load_m3d_clip_folder", "m3d_clip_config",
]
