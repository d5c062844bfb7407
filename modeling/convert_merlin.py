"""Convert a released Merlin checkpoint (Hub `stanfordmimi/Merlin`,
`i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt`) into `MerlinModel` weights and config (the
folder with its processor and card: `voxlm.conversion.convert_merlin`).

The release is one `torch.save`d state dict of `MerlinArchitecture` (merlin/models/build.py), read here with
`torch.load(weights_only=True)`, never unpickled:

    encode_image.i3_resnet.{conv1,bn1,layerN.M.*}   -> vision_model.stem.{conv1,bn1}, vision_model.stages.(N-1).M.*
    encode_image.i3_resnet.classifier               -> vision_model.classifier (1x1x1 conv -> linear)
    encode_image.i3_resnet.contrastive_head         -> visual_projection (1x1x1 conv -> linear)
    encode_text.text_encoder.*                      -> text_model.* (its pooler, unused by Merlin, dropped)
    encode_text.linear_layer                        -> text_projection
    logit_scale                                     -> logit_scale (unchanged, see the note in the key map)

The release holds no config: the ResNet's depths and widths, the phenotype count and the embedding width are read
from the weights' shapes; the text encoder's config and tokenizer are Clinical-Longformer's (`yikuan8/Clinical-
Longformer`, which Merlin's `TextEncoder` loads), its `config.json` read as JSON.
"""

from __future__ import annotations

import re

import torch
from transformers import AutoConfig

from .configuration_merlin import MerlinConfig, MerlinVisionConfig
from .modeling_merlin import MerlinModel

MERLIN_COMMIT = "2489a96bab716b6b27e3e693e2e9e9a1587135a5"  # the StanfordMIMI/Merlin commit tests/merlin compares to
MERLIN_CHECKPOINT = "i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt"  # load.py "default"
CLINICAL_LONGFORMER = "yikuan8/Clinical-Longformer"  # build.py TextEncoder's tokenizer and text encoder
MERLIN_MAX_LENGTH = 1024  # build.py TextEncoder.forward: tokenizer(..., truncation=True, max_length=1024)
# Merlin's names for what a conversion can be told (load.py MODEL_CONFIGS' `checkpoint`, build.py's `text_encoder`
# and its tokenizer's `max_length`).
OVERRIDES = ("checkpoint", "text_encoder", "max_length")
VISION = "encode_image.i3_resnet."
TEXT = "encode_text.text_encoder."
RENAMES = {"encode_text.linear_layer.": "text_projection.", f"{VISION}contrastive_head.": "visual_projection.",
           f"{VISION}classifier.": "vision_model.classifier.", f"{VISION}conv1.": "vision_model.stem.conv1.",
           f"{VISION}bn1.": "vision_model.stem.bn1.", TEXT: "text_model."}
HEADS = ("vision_model.classifier.weight", "visual_projection.weight")  # 1x1x1 convolutions in the release


def check_overrides(overrides: dict | None) -> dict:
    """`overrides`, or `{}`; raises `ValueError` naming unknown keys."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"Unknown Merlin conversion overrides {unknown}; use {OVERRIDES}")
    return overrides


def shape_of(state_dict: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """The shape of `state_dict[key]`; `ValueError` naming the key when the checkpoint lacks it."""
    if key not in state_dict:
        raise ValueError(f"The Merlin checkpoint has no {key}; it is not a MerlinArchitecture state dict")
    return tuple(state_dict[key].shape)


def resnet_config_from_weights(state_dict: dict[str, torch.Tensor]) -> dict:
    """The `MerlinVisionConfig` fields that the I3ResNet's weight shapes determine.

    Strides are no weight's shape: torchvision's `(1, 2, 2, ...)` (stride 1 in the first stage only).

    Raises:
        `ValueError`: naming the weights that are missing.
    """
    stem = shape_of(state_dict, f"{VISION}conv1.weight")  # (stem_width, 3, 3, 7, 7)
    blocks = {}
    for key in state_dict:
        if match := re.match(re.escape(VISION) + r"layer(\d+)\.(\d+)\.", key):
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    if not blocks or sorted(blocks) != list(range(1, len(blocks) + 1)):
        raise ValueError(f"The Merlin checkpoint's ResNet stages are {sorted(blocks)}, not layer1 .. layerN")
    stages = range(1, len(blocks) + 1)
    widths = [shape_of(state_dict, f"{VISION}layer{stage}.0.conv1.weight")[0] for stage in stages]
    out_channels = shape_of(state_dict, f"{VISION}layer1.0.conv3.weight")[0]
    return dict(
        num_channel_repeats=stem[1], stem_width=stem[0], depths=[blocks[stage] for stage in stages], widths=widths,
        strides=[1] + [2] * (len(widths) - 1), expansion=out_channels // widths[0],
        num_phenotypes=shape_of(state_dict, f"{VISION}classifier.weight")[0],
    )


def merlin_config(state_dict: dict[str, torch.Tensor], text_config: dict) -> MerlinConfig:
    """The `MerlinConfig` that reproduces a Merlin checkpoint.

    Args:
        state_dict (`dict[str, torch.Tensor]`): the release's weights (the ResNet's and heads' sizes).
        text_config (`dict`): Clinical-Longformer's `config.json` (with its `model_type`).

    Raises:
        `ValueError`: missing weights, or a text config without `model_type`.
    """
    if "model_type" not in text_config:
        raise ValueError("The text encoder's config.json has no `model_type` (Clinical-Longformer's: 'longformer')")
    fields = {key: value for key, value in text_config.items() if key not in ("architectures", "transformers_version")}
    text = AutoConfig.for_model(fields.pop("model_type"), **fields)
    return MerlinConfig(vision_config=MerlinVisionConfig(**resnet_config_from_weights(state_dict)), text_config=text,
                        projection_dim=shape_of(state_dict, f"{VISION}contrastive_head.weight")[0])


def convert_key(key: str) -> str | None:
    """The `MerlinModel` key of a Merlin key; `None` for tensors without a counterpart (the Longformer pooler, which
    Merlin's CLS embedding does not use, and an old release's `position_ids` buffer). Keys of no known Merlin part are
    returned unchanged, so that loading reports them as unexpected."""
    if key.startswith(f"{TEXT}pooler.") or key == f"{TEXT}embeddings.position_ids":
        return None
    if match := re.match(re.escape(VISION) + r"layer(\d+)\.(.*)", key):
        return f"vision_model.stages.{int(match.group(1)) - 1}.{match.group(2)}"
    prefix = next((p for p in RENAMES if key.startswith(p)), None)
    return key if prefix is None else RENAMES[prefix] + key[len(prefix):]


def merlin_key(key: str) -> str:
    """The Merlin key a `MerlinModel` key comes from (for error messages)."""
    if match := re.match(r"vision_model\.stages\.(\d+)\.(.*)", key):
        return f"{VISION}layer{int(match.group(1)) + 1}.{match.group(2)}"
    target = next((t for t in sorted(RENAMES.values(), key=len, reverse=True) if key.startswith(t)), None)
    return key if target is None else {v: k for k, v in RENAMES.items()}[target] + key[len(target):]


def convert_merlin_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Merlin keys -> `MerlinModel` keys (see the module docstring); the 1x1x1 convolution heads become linear
    weights, `logit_bias` (SigLIP's; Merlin has none) is set to 0.

    Returns:
        `(converted, skipped)`: the weights, and the source keys that have no counterpart.
    """
    converted, skipped = {}, []
    for key, value in state_dict.items():
        name = convert_key(key)
        if name is None:
            skipped.append(key)
        elif name in HEADS and value.dim() == 5:
            converted[name] = value.flatten(1)  # (P, C, 1, 1, 1) -> (P, C)
        else:
            converted[name] = value
    # Note: Merlin's released code never reads `logit_scale` (build.py only defines it, init 1.0; its training code
    # is unreleased), so the value is kept as it is and read as the log of the scale, CLIP's convention.
    converted["logit_bias"] = torch.tensor(0.0)
    return converted, skipped


def load_converted(model: MerlinModel, converted: dict[str, torch.Tensor]) -> None:
    """`model.load_state_dict(converted, strict=True)`, after a check that raises `ValueError` naming every missing,
    unexpected or wrongly shaped tensor by its Merlin name."""
    expected = model.state_dict()
    missing = [f"{merlin_key(key)} (-> {key})" for key in expected if key not in converted]
    unexpected = sorted(key for key in converted if key not in expected)
    shapes = [f"{merlin_key(key)}: {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
              for key, value in converted.items() if key in expected and value.shape != expected[key].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors of no Merlin part: {', '.join(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} tensors whose shape does not fit the rest of the checkpoint: "
                        f"{'; '.join(shapes)}")
    if problems:
        raise ValueError("The Merlin checkpoint does not convert: " + " | ".join(problems))
    model.load_state_dict(converted, strict=True)


__all__ = [
    "CLINICAL_LONGFORMER", "MERLIN_CHECKPOINT", "MERLIN_COMMIT", "MERLIN_MAX_LENGTH", "check_overrides",
    "convert_merlin_state_dict", "load_converted", "merlin_config", "resnet_config_from_weights",
]
