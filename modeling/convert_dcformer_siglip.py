"""Convert a released DCFormer-SigLIP checkpoint (Hub `MagicXin/DCFormer_SigLIP`, `model_type` `dec_clip`, of
github mirthAI/Med3DVLM) into `DCFormerSiglipModel` weights and config (the folder with its processor and card:
`voxlm.conversion.convert_dcformer_siglip`).

Med3DVLM's `DEC_CLIP` (`src/model/CLIP.py`) holds `vision_encoder.encoder.s0..s4.*` (dcformer.py's `DecompModel`:
`s0` the stem, `s1`..`s4` the stages), `language_encoder.*` (a DistilBERT), `mm_vision_proj.*`,
`mm_language_proj.*`, and SigLIP's `t_prime` (a log scale) and `bias`. Its config.json holds none of the DCFormer's
sizes (DEC_CLIP always builds `decomp_small`) nor the DistilBERT's (it names `medicalai/ClinicalBERT`): both are read
from the weights' shapes, except the DistilBERT's head count (`dim // 64`, DistilBERT-base's 12 for 768) and the
stem's stride (4, dcformer.py's `DecomposedStem`), which no shape holds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .configuration_dcformer_siglip import DCFormerSiglipConfig, DCFormerSiglipVisionConfig
from .convert_m3d import SINGLE_FILES, checkpoint_files, load_state_dict_file
from .modeling_dcformer_siglip import DCFormerSiglipModel

MED3DVLM_COMMIT = "cbbd6335a64370f829710a1412e46afc68f243ff"  # the mirthAI/Med3DVLM commit the tests compare against
DCFORMER_SIGLIP_MAX_LENGTH = 512  # scripts/train_clip.sh --max_length
OVERRIDES = ("input_size", "text_config")
VISION = "vision_encoder.encoder."
TEXT = "language_encoder."
# dcformer.py's DecompConv3D: c1, c2, c3 convolve along its (H, W, D) layout's first, second and third axis.
AXES = {"1": "h", "2": "w", "3": "d"}
RENAMES = {TEXT: "text_model.", "mm_vision_proj.": "visual_projection.", "mm_language_proj.": "text_projection."}


def load_dcformer_siglip_folder(source_folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The `config.json` (as a dict, never through `AutoConfig`) and the state dict of a released folder.

    Raises:
        `FileNotFoundError`: no config or no weights; `ValueError`: not a DCFormer `dec_clip` with the sigmoid loss.
    """
    folder = Path(source_folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (a DCFormer-SigLIP release holds one)")
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "dec_clip":
        raise ValueError(f"{folder}/config.json has model_type {config.get('model_type')!r}, not 'dec_clip'")
    if config.get("vision_encoder") != "dcformer":
        raise ValueError(f"{folder}/config.json has vision_encoder {config.get('vision_encoder')!r}, not 'dcformer'")
    if config.get("loss_type") != "sigmoid":
        raise ValueError(f"{folder}/config.json has loss_type {config.get('loss_type')!r}: only 'sigmoid' (SigLIP, "
                         "t_prime and bias) converts")
    state_dict = {}
    for file in checkpoint_files(folder, SINGLE_FILES):
        state_dict.update(load_state_dict_file(file))
    return config, state_dict


def require(state_dict: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """The shape of `state_dict[key]`; `ValueError` naming the key when it is missing."""
    if key not in state_dict:
        raise ValueError(f"The DCFormer-SigLIP checkpoint has no tensor {key}")
    return tuple(state_dict[key].shape)


def dcformer_config_from_weights(state_dict: dict[str, torch.Tensor], input_size, prefix: str = VISION) -> dict:
    """`DCFormerSiglipVisionConfig` fields read from the weight shapes of a Med3DVLM `DecompModel.encoder` under
    `prefix` (DEC_CLIP's `vision_encoder.encoder.`, the VLM's `model.vision_tower.vision_tower.encoder.`);
    `input_size` is Med3DVLM's (H, W, D)."""
    escaped = re.escape(prefix)
    stem = sorted({int(m.group(1)) for k in state_dict if (m := re.match(rf"{escaped}s0\.0\.(\d+)\.", k))})
    first = require(state_dict, f"{prefix}s0.0.0.c1.0.weight")  # (C_stem, C_in, k, 1, 1)
    stages = sorted({int(m.group(1)) for k in state_dict if (m := re.match(rf"{escaped}s([1-9])\.", k))})
    channels, depths, kernels = [], [], []
    for stage in stages:
        blocks = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{escaped}s{stage}\.(\d+)\.", k))}
        shape = require(state_dict, f"{prefix}s{stage}.0.dwconv.c1.0.weight")  # (C, 1, k, 1, 1)
        hidden = require(state_dict, f"{prefix}s{stage}.0.mlp.mlp.0.weight")  # (C * ratio, C)
        channels.append(shape[0])
        depths.append(max(blocks) + 1)
        kernels.append(shape[2])
    height, width, depth = input_size
    return dict(
        num_channels=first[1], image_size=(depth, height, width), stem_channels=first[0],
        stem_kernel_sizes=[require(state_dict, f"{prefix}s0.0.{i}.c1.0.weight")[2] for i in stem],
        stage_channels=channels, stage_depths=depths, stage_kernel_sizes=kernels, mlp_ratio=hidden[0] // hidden[1],
    )


def distilbert_config_from_weights(state_dict: dict[str, torch.Tensor]) -> dict:
    """The `DistilBertConfig` fields the DistilBERT's weights determine; `n_heads = dim // 64` (DistilBERT-base's
    head width), which no shape holds."""
    words = require(state_dict, f"{TEXT}embeddings.word_embeddings.weight")  # (V, E)
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{TEXT}transformer\.layer\.(\d+)\.", k))}
    return dict(
        model_type="distilbert", vocab_size=words[0], dim=words[1], n_layers=max(layers, default=-1) + 1,
        n_heads=words[1] // 64 if words[1] % 64 == 0 else None,
        hidden_dim=require(state_dict, f"{TEXT}transformer.layer.0.ffn.lin1.weight")[0],
        max_position_embeddings=require(state_dict, f"{TEXT}embeddings.position_embeddings.weight")[0],
    )


def check_overrides(overrides: dict | None) -> dict:
    """`overrides`, or `{}`; raises `ValueError` naming unknown keys."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"Unknown DCFormer-SigLIP conversion overrides {unknown}; use {OVERRIDES}")
    return overrides


def dcformer_siglip_config(source_config: dict, state_dict: dict[str, torch.Tensor],
                           overrides: dict | None = None) -> DCFormerSiglipConfig:
    """The `DCFormerSiglipConfig` that reproduces a released DEC_CLIP.

    Args:
        source_config (`dict`): its config.json (`hidden_size`, `input_size`, `t_prime`, `bias` are read).
        state_dict (`dict[str, torch.Tensor]`): its weights (the DCFormer's and DistilBERT's sizes).
        overrides (`dict`, *optional*): `input_size` (Med3DVLM's (H, W, D)) and `text_config` (DistilBERT fields,
            e.g. `{"n_heads": 16}`).

    Raises:
        `ValueError`: unknown overrides, missing weights, or a DistilBERT width no head count divides.
    """
    overrides = check_overrides(overrides)
    input_size = overrides.get("input_size", source_config.get("input_size", (256, 256, 128)))
    vision = DCFormerSiglipVisionConfig(**dcformer_config_from_weights(state_dict, input_size))
    text = {**distilbert_config_from_weights(state_dict), **overrides.get("text_config", {})}
    if text["n_heads"] is None or text["dim"] % text["n_heads"]:
        raise ValueError(f"The DistilBERT is {text['dim']} wide and no weight holds its head count: give it as "
                         "overrides={'text_config': {'n_heads': ...}}")
    return DCFormerSiglipConfig(
        vision_config=vision, text_config=text, projection_dim=source_config.get("hidden_size", 768),
        logit_scale_init_value=source_config.get("t_prime", 2.659260036932778),
        logit_bias_init_value=source_config.get("bias", 0.0),
    )


def convert_dcformer_weight(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """A weight of Med3DVLM's `DecompModel.encoder` (its key after the `encoder.`) -> its key in
    `DCFormerSiglipVisionModel` and the tensor, convolution kernels' spatial axes from Med3DVLM's (H, W, D) layout to
    (D, H, W)."""
    key = re.sub(r"^s0\.0\.(\d+)\.", r"stem.\1.", key)
    key = re.sub(r"^s([1-9])\.", lambda m: f"stages.{int(m.group(1)) - 1}.", key)
    key = re.sub(r"c([123])\.0\.", lambda m: f"conv_{AXES[m.group(1)]}.", key)
    key = re.sub(r"c([123])\.1\.", lambda m: f"norm_{AXES[m.group(1)]}.", key)
    key = key.replace("mlp.mlp.0.", "mlp.fc1.").replace("mlp.mlp.3.", "mlp.fc2.")
    value = value.permute(0, 1, 4, 2, 3) if value.dim() == 5 else value  # (O, I, H, W, D) -> (O, I, D, H, W)
    return re.sub(r"\.scale$", ".layer_scale", key), value


def convert_dcformer_siglip_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Med3DVLM DEC_CLIP keys -> `DCFormerSiglipModel` keys.

    - `vision_encoder.encoder.*` -> `vision_model.*`; the convolution kernels' spatial axes go from Med3DVLM's
      (H, W, D) layout to (D, H, W);
    - `language_encoder.*` -> `text_model.*`; `mm_vision_proj.*` / `mm_language_proj.*` -> `visual_projection.*` /
      `text_projection.*`;
    - `t_prime` -> `logit_scale` (both log scales: Med3DVLM's training multiplies by `exp(t_prime)`), `bias` ->
      `logit_bias`, as float32 (DEC_CLIP makes `t_prime` float64).

    Returns:
        `(converted, skipped)`: the weights, and the source keys with no counterpart (an old release's
        `position_ids` buffer). Other keys keep their names, so that loading reports them as unexpected.
    """
    converted, skipped = {}, []
    for key, value in state_dict.items():
        if key.startswith(VISION):
            name, value = convert_dcformer_weight(key[len(VISION):], value)
            converted["vision_model." + name] = value
        elif key == "t_prime":
            converted["logit_scale"] = value.float()
        elif key == "bias":
            converted["logit_bias"] = value.float()
        elif key == f"{TEXT}embeddings.position_ids":
            skipped.append(key)
        else:
            prefix = next((p for p in RENAMES if key.startswith(p)), None)
            converted[key if prefix is None else RENAMES[prefix] + key[len(prefix):]] = value
    return converted, skipped


def load_converted(model: DCFormerSiglipModel, converted: dict[str, torch.Tensor]) -> None:
    """`model.load_state_dict(converted, strict=True)`, after a check that raises `ValueError` naming every missing,
    unexpected or wrongly shaped tensor."""
    expected = model.state_dict()
    missing = sorted(key for key in expected if key not in converted)
    unexpected = sorted(key for key in converted if key not in expected)
    shapes = [f"{key}: {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
              for key, value in converted.items() if key in expected and value.shape != expected[key].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors of no DCFormer-SigLIP part: {', '.join(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} tensors of the wrong shape: {'; '.join(shapes)}")
    if problems:
        raise ValueError("The DCFormer-SigLIP checkpoint does not convert: " + " | ".join(problems))
    model.load_state_dict(converted, strict=True)


__all__ = [
    "DCFORMER_SIGLIP_MAX_LENGTH", "MED3DVLM_COMMIT", "check_overrides", "convert_dcformer_siglip_state_dict",
    "convert_dcformer_weight", "dcformer_config_from_weights",
    "dcformer_siglip_config", "load_converted", "load_dcformer_siglip_folder",
]
