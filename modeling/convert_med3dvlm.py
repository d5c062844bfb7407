"""Convert a released Med3DVLM (Hub `MagicXin/Med3DVLM-Qwen-2.5-7B`, `model_type` `vlm_qwen`, of github
mirthAI/Med3DVLM) into `VoxLMForConditionalGeneration` weights and config (the folder with its processor and card:
`voxlm.conversion.convert_med3dvlm`).

Med3DVLM's `VLMQwenForCausalLM` (src/model/llm/qwen.py, vlm_arch.py) holds a Qwen2 (`model.embed_tokens`,
`model.layers.*`, `model.norm`, `lm_head`), the DCFormer `model.vision_tower.vision_tower.encoder.s0..s4.*`
(dcformer.py's `DecompModel`, the same network as DCFormer-SigLIP's image tower) and the mixer
`model.mm_projector.{low,high}_mixer.<i>.{ln1,ln2,mlp1,mlp2}.*` (projector/mlp.py `MixerLowHighHybridMLP`; `mlp1`
mixes tokens, `mlp2` channels, each a `MultiModalProjector` whose `mm_projector` is `Linear` then `depth - 1` x
`Sequential(GELU, Linear)`). Every key converts on its own, so the 7B checkpoint converts shard by shard.
Its config.json (a `Qwen2Config` with train_vlm.py's `ModelArguments` written in) holds the mixer's token counts and
the input size; the DCFormer's widths and depths are read from the weights' shapes.
"""

from __future__ import annotations

import re

import torch

from .configuration_dcformer_siglip import DCFormerSiglipVisionConfig
from .configuration_voxlm import VoxLMConfig
from .convert_dcformer_siglip import convert_dcformer_weight, dcformer_config_from_weights
from .convert_m3d import llm_config_fields

VISION = "model.vision_tower.vision_tower.encoder."
PROJECTOR = "model.mm_projector."
STREAMS = {"low_mixer": 0, "high_mixer": 1}  # vlm_arch.py: `low_x, high_x = hidden_states[-2:]`
MIXER_PARTS = {"ln1": "token_norm", "mlp1": "token_mlp", "ln2": "channel_norm", "mlp2": "channel_mlp"}
# What a released config.json must say for voxlm to reproduce it (train_vlm.py's settings of the release).
# `vision_select_layer=-2`: the mixer's two streams read the last two DCFormer stages.
EXPECTED_FIELDS = {"model_type": "vlm_qwen", "vision_tower": "dcformer", "mm_projector_type": "mixer",
                   "vision_select_feature": "cls_patch", "vision_select_layer": -2}
DEFAULT_FIELDS = {"vision_select_feature": "cls_patch", "vision_select_layer": -2}  # train_vlm.py's defaults


def check_med3dvlm_fields(source_config: dict) -> None:
    """Raise `ValueError` naming the field when a config.json is not a Med3DVLM voxlm reproduces."""
    for field, value in EXPECTED_FIELDS.items():
        if source_config.get(field, DEFAULT_FIELDS.get(field)) != value:
            raise ValueError(f"Med3DVLM config: `{field}` = {source_config.get(field)!r}; voxlm converts {value!r}")


def convert_mixer_key(key: str) -> str | None:
    """A `model.mm_projector.*` key -> its `multi_modal_projector.*` key (`None`: no mixer key).

    `{low,high}_mixer.<i>.mlp1.mm_projector.0.` -> `streams.<s>.<i>.token_mlp.0.`, and `...mm_projector.<k>.1.`
    (the Linear of the k-th `Sequential(GELU, Linear)`) -> `...token_mlp.<2k>.` (voxlm's flat Linear-GELU-Linear)."""
    match = re.match(r"(low_mixer|high_mixer)\.(\d+)\.(ln1|ln2|mlp1|mlp2)\.(.+)$", key[len(PROJECTOR):])
    if match is None:
        return None
    stream, layer, part, rest = match.groups()
    rest = re.sub(r"^mm_projector\.0\.", "0.", rest)
    rest = re.sub(r"^mm_projector\.(\d+)\.1\.", lambda m: f"{2 * int(m.group(1))}.", rest)
    return f"multi_modal_projector.streams.{STREAMS[stream]}.{layer}.{MIXER_PARTS[part]}.{rest}"


def convert_med3dvlm_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Med3DVLM keys -> `VoxLMForConditionalGeneration` keys, key by key (a shard at a time).

    - `model.vision_tower.vision_tower.encoder.*` -> `vision_tower.*` (a `DCFormerSiglipVisionModel`: kernels from
      Med3DVLM's (H, W, D) layout to (D, H, W));
    - `model.mm_projector.*` -> `multi_modal_projector.streams.*` (`convert_mixer_key`);
    - the Qwen2's `model.*` and `lm_head.*` -> `language_model.model.*`, `language_model.lm_head.*`.

    Returns:
        `(converted, skipped)`: the weights, and the keys of no voxlm part (left for `check_converted_keys` to name
        only when a part misses them).
    """
    converted, skipped = {}, []
    for key, value in state_dict.items():
        if key.startswith(VISION):
            name, value = convert_dcformer_weight(key[len(VISION):], value)
            converted["vision_tower." + name] = value
        elif key.startswith(PROJECTOR):
            name = convert_mixer_key(key)
            if name is None:
                skipped.append(key)
            else:
                converted[name] = value
        elif key.startswith(("model.", "lm_head.")):
            converted["language_model." + key] = value
        else:
            skipped.append(key)
    return converted, skipped


def med3dvlm_config(source_config: dict, vision_shapes: dict[str, torch.Tensor], token_ids: dict[str, int | None],
                    vocab_size: int) -> VoxLMConfig:
    """The `VoxLMConfig` of a converted Med3DVLM.

    Args:
        source_config (`dict`): the released config.json, read as JSON (`auto_map` names Med3DVLM's code).
        vision_shapes (`dict[str, torch.Tensor]`): the source's `model.vision_tower.vision_tower.encoder.*` tensors
            (meta tensors do: only their shapes are read), for the DCFormer's sizes.
        token_ids (`dict`): `image_token_id` (the placeholder the processor writes, see
            `voxlm.conversion.med3dvlm`) and `pad_token_id` (may be `None`).
        vocab_size (`int`): rows of the converted `embed_tokens`.
    """
    check_med3dvlm_fields(source_config)
    input_size = source_config.get("input_size", (256, 256, 128))  # (H, W, D), train_vlm.py's default
    vision = DCFormerSiglipVisionConfig(**dcformer_config_from_weights(vision_shapes, input_size, prefix=VISION))
    text_fields = {**llm_config_fields(source_config, "qwen2"), "vocab_size": vocab_size}
    return VoxLMConfig(
        vision_config=vision,
        text_config={"model_type": "qwen2", **text_fields},
        projector_type="mixer",
        vision_feature_layers=[-2, -1],  # VisionTower: hidden_states[vision_select_layer:]
        mixer_num_tokens=[source_config.get("low_output_size", [192, 128]),
                          source_config.get("high_output_size", [64, 128])],
        mixer_mlp_depth=source_config.get("mm_mlp_depth", 2),
        image_token_id=token_ids["image_token_id"],
        pad_token_id=token_ids.get("pad_token_id"),
    )


__all__ = ["VISION", "check_med3dvlm_fields", "convert_med3dvlm_state_dict", "convert_mixer_key", "med3dvlm_config"]
