"""Convert M3D-CLIP / MONAI `ViT` and M3D-LaMed checkpoints into voxlm weights.

M3D-CLIP ships its encoder as `pretrained_ViT.bin`, a MONAI `ViT` state dict (`pos_embed="perceptron"`,
`classification=True`). M3D-LaMed checkpoints hold the same encoder under `model.vision_tower.vision_tower.`, the
projector under `model.mm_projector.`, the `[SEG]` projector under `model.seg_projector.`, SegVol under
`model.seg_module.` and the LLM under `model.` / `lm_head.`. Loading never unpickles: `.bin` files are read with
`torch.load(weights_only=True)`, `.safetensors` with safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig

from .configuration_voxlm import VoxLMConfig
from .configuration_voxvit import VoxViTConfig

# The index files transformers writes for sharded checkpoints, then the single-file names, in the order preferred.
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
MONAI_PREFIXES = ("module.", "vision_encoder.", "model.vision_tower.vision_tower.", "vision_tower.vision_tower.")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely: `.safetensors` with safetensors, anything else with `weights_only=True`.

    Args:
        path (`str` or `Path`): the file.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state_dict).__name__})")
    return state_dict.get("state_dict", state_dict)


def checkpoint_files(folder: str | Path, single_files: tuple[str, ...] = SINGLE_FILES) -> list[Path]:
    """The weight files of a checkpoint folder: the shards its index names, in order, or its single weight file.

    Args:
        folder (`str` or `Path`): the checkpoint folder.
        single_files (`tuple[str, ...]`, defaults to `SINGLE_FILES`): the names of unsharded weight files, in the
            order preferred.

    Raises:
        `FileNotFoundError`: naming the folder and the file names looked for, when it holds no weights.
    """
    folder = Path(folder)
    for name in INDEX_FILES:
        if (folder / name).is_file():
            weight_map = json.loads((folder / name).read_text())["weight_map"]
            files = [folder / shard for shard in dict.fromkeys(weight_map.values())]
            missing = [file.name for file in files if not file.is_file()]
            if missing:
                raise FileNotFoundError(f"{folder}: {name} names shards that are not there: {missing}")
            return files
    for name in single_files:
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(f"{folder}: no weights ({', '.join(INDEX_FILES + single_files)})")


def convert_monai_vit_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MONAI `ViT` (or M3D-CLIP `pretrained_ViT.bin`) keys -> `VoxViTModel` keys.

    Handles both MONAI patch-embedding types: `perceptron` (a Linear after a rearrange: only the Sequential index is
    dropped) and `conv` (the Conv3d kernel `(E, C, p_d, p_h, p_w)` is permuted into the Linear layout
    `(E, p_d * p_h * p_w * C)` that `patchify` produces). The classification head and the never-called cross-attention
    parameters of MONAI's blocks are dropped: VoxViT returns tokens.

    Args:
        state_dict (`dict[str, torch.Tensor]`): the MONAI state dict, optionally under one of `MONAI_PREFIXES`.
    """
    converted = {}
    for key, value in state_dict.items():
        for prefix in MONAI_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        # MONAI blocks always hold a cross-attention norm (and older releases a cross-attention) that a ViT never
        # calls; the classification head is unused by M3D. None of them has a VoxViT counterpart.
        if key.startswith("classification_head.") or ".norm_cross_attn." in key or ".cross_attn." in key:
            continue
        if key.startswith("patch_embedding.patch_embeddings.1."):
            key = key.replace("patch_embedding.patch_embeddings.1.", "patch_embedding.patch_embeddings.")
        elif key == "patch_embedding.patch_embeddings.weight" and value.dim() == 5:
            # (E, C, p_d, p_h, p_w) -> (E, p_d, p_h, p_w, C) -> (E, p_d * p_h * p_w * C)
            value = value.permute(0, 2, 3, 4, 1).reshape(value.shape[0], -1)
        converted[key] = value
    return converted


# SegVol (`model.seg_module.`) -> `SegVolHead` keys, by prefix; MONAI's ViT goes through `convert_monai_vit_state_dict`.
SEGVOL_PREFIXES = {
    "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": "prompt_encoder.positional_encoding_gaussian_matrix",
    "prompt_encoder.no_mask_embed.weight": "prompt_encoder.no_mask_embedding",
    "mask_decoder.iou_token.weight": "mask_decoder.iou_token",
    "mask_decoder.mask_tokens.weight": "mask_decoder.mask_tokens",
    "mask_decoder.transformer.": "mask_decoder.",
    "mask_decoder.output_upscaling.": "mask_decoder.output_upscaling.",
    "mask_decoder.output_hypernetworks_mlps.0.layers.0.": "mask_decoder.mask_hypernetwork.0.",
    "mask_decoder.output_hypernetworks_mlps.0.layers.1.": "mask_decoder.mask_hypernetwork.2.",
    "mask_decoder.output_hypernetworks_mlps.0.layers.2.": "mask_decoder.mask_hypernetwork.4.",
    "mask_decoder.txt_align_upscaled_embedding.": "mask_decoder.text_hypernetwork.",
}
# SAM's parts that LaMed's text-prompted SegVol never runs (modeling_segvol.py): point, box and mask prompts, the
# IoU head and the hypernetworks of mask tokens 1..3.
SEGVOL_UNUSED = (
    "prompt_encoder.point_embeddings.", "prompt_encoder.not_a_point_embed.", "prompt_encoder.mask_downscaling.",
    "mask_decoder.iou_prediction_head.", "mask_decoder.output_hypernetworks_mlps.",
)


def convert_segvol_key(key: str) -> str | None:
    """One SegVol key (without `model.seg_module.`) -> its `SegVolHead` key, or `None` for the parts never run."""
    for prefix, target in SEGVOL_PREFIXES.items():
        if key.startswith(prefix):
            # SAM's MLPBlock (`lin1`, `lin2`) is a Sequential in SegVolTwoWayLayer.
            return (target + key[len(prefix):]).replace(".mlp.lin1.", ".mlp.0.").replace(".mlp.lin2.", ".mlp.2.")
    if key.startswith(SEGVOL_UNUSED):
        return None
    raise ValueError(f"Unknown SegVol key `model.seg_module.{key}`: not a part of M3D-LaMed's SegVol")


def convert_m3d_lamed_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """M3D-LaMed keys -> `VoxLMForConditionalGeneration` keys. Every key converts on its own, so a sharded
    checkpoint converts shard by shard.

    Args:
        state_dict (`dict[str, torch.Tensor]`): (a shard of) a LaMed checkpoint (`LamedLlamaForCausalLM`,
            `LamedPhi3ForCausalLM`).

    Returns:
        `(converted, skipped)`: voxlm weights, and the keys that have no voxlm counterpart: the parts of SAM that
        LaMed's SegVol never runs (`SEGVOL_UNUSED`) and MONAI's classification head.
    """
    vision, segvol_vision = {}, {}
    converted = {}
    skipped = []
    for key, value in state_dict.items():
        if key.startswith("model.vision_tower.vision_tower."):
            vision[key] = value
        elif key.startswith("model.mm_projector.projector.0."):
            converted[key.replace("model.mm_projector.projector.0.", "multi_modal_projector.linear_1.")] = value
        elif key.startswith("model.mm_projector.projector.2."):
            converted[key.replace("model.mm_projector.projector.2.", "multi_modal_projector.linear_2.")] = value
        elif key.startswith("model.mm_projector."):  # the `linear` projector: M3D's `FullLinear` holds `linear`
            converted[key.replace("model.mm_projector.", "multi_modal_projector.")] = value
        elif key.startswith("model.seg_projector."):
            converted[key.replace("model.seg_projector.", "seg_head.prompt_projector.")] = value
        elif key.startswith("model.seg_module.image_encoder."):
            segvol_vision[key[len("model.seg_module.image_encoder."):]] = value
        elif key.startswith("model.seg_module."):
            target = convert_segvol_key(key[len("model.seg_module."):])
            if target is None:
                skipped.append(key)
            else:
                converted[f"seg_head.{target}"] = value
        elif key.startswith(("model.", "lm_head.")):
            converted["language_model." + key] = value
        else:
            skipped.append(key)
    skipped += [key for key in vision if ".classification_head." in key]
    converted.update({f"vision_tower.{k}": v for k, v in convert_monai_vit_state_dict(vision).items()})
    converted.update(
        {f"seg_head.image_encoder.{k}": v for k, v in convert_monai_vit_state_dict(segvol_vision).items()}
    )
    return converted, skipped


# Numbers of M3D's code that neither its config.json nor its weights hold, named for where M3D's code sets them
# (LaMed/src/model/multimodal_encoder/vit.py `ViT3DTower`, segmentation_module/segment_anything_volumetric/
# build_sam.py `_build_sam` and its `TwoWayTransformer`, lamed_arch.py `seg_projector`); tiny test models override them.
M3D_LAMED_CONSTANTS = {
    "ViT3DTower.num_heads": 12,
    "_build_sam.num_heads": 12,
    "TwoWayTransformer.num_heads": 8,
    "seg_projector.dropout": 0.1,
}
LAMED_TEXT_MODEL_TYPES = {"lamed_llama": "llama", "lamed_phi3": "phi3"}


def count_layers(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    """How many `prefix.<i>.` layers the keys hold."""
    return len({key[len(prefix):].split(".")[0] for key in shapes if key.startswith(prefix)})


def vit_config_from_shapes(shapes: dict[str, tuple[int, ...]], prefix: str, image_size, patch_size, num_heads: int,
                           num_channels: int = 1) -> VoxViTConfig:
    """A VoxViT config read from converted weights under `prefix` (`vision_tower.`, `seg_head.image_encoder.`): the
    width, MLP width, depth and QKV bias are in the weights; the head count is not."""
    if f"{prefix}patch_embedding.patch_embeddings.weight" not in shapes:
        raise ValueError(f"The checkpoint holds no ViT under `{prefix}` (its patch embedding is missing)")
    return VoxViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        hidden_size=shapes[f"{prefix}patch_embedding.patch_embeddings.weight"][0],
        intermediate_size=shapes[f"{prefix}blocks.0.mlp.linear1.weight"][0],
        num_hidden_layers=count_layers(shapes, f"{prefix}blocks."),
        num_attention_heads=num_heads,
        qkv_bias=f"{prefix}blocks.0.attn.qkv.bias" in shapes,
    )


# What transformers 4.x configs hold of the rotary embedding, which 5.x reads when given but no longer writes (its
# `rope_parameters`): Qwen2.5's `rope_theta` is 1e6, not the default 1e4.
LEGACY_ROPE_FIELDS = ("rope_theta", "rope_scaling")


def llm_config_fields(source_config: dict, model_type: str) -> dict:
    """The fields of a released multimodal `config.json` (an LLM config with the project's own fields added) that
    belong to the config of its LLM, `model_type`: what `AutoConfig.for_model(model_type)` knows, and the rotary
    settings of transformers 4.x files (`LEGACY_ROPE_FIELDS`)."""
    known = set(AutoConfig.for_model(model_type).to_dict()) | set(LEGACY_ROPE_FIELDS)
    dropped = ("architectures", "auto_map", "model_type", "transformers_version", "dtype", "torch_dtype")
    return {key: value for key, value in source_config.items() if key in known and key not in dropped}


def check_m3d_lamed_fields(m3d_config: dict) -> None:
    """Raise `ValueError` for M3D-LaMed settings that voxlm does not reproduce, naming the field."""
    expected = {"vision_select_layer": -1, "vision_select_feature": "patch"}
    if m3d_config.get("mm_projector_type", "spp") == "spp":
        expected.update(proj_layer_type="mlp", proj_layer_num=2, proj_pooling_type="spatial")
    for field, value in expected.items():
        if field in m3d_config and m3d_config[field] != value:
            raise ValueError(f"M3D config: `{field}` = {m3d_config[field]!r} is not supported (voxlm converts {value!r})")
    if m3d_config.get("model_type") not in LAMED_TEXT_MODEL_TYPES:
        raise ValueError(
            f"M3D config: `model_type` {m3d_config.get('model_type')!r} is not an M3D-LaMed model "
            f"({', '.join(LAMED_TEXT_MODEL_TYPES)})"
        )


def m3d_lamed_config(
    m3d_config: dict, shapes: dict[str, tuple[int, ...]], token_ids: dict[str, int], constants: dict | None = None
) -> VoxLMConfig:
    """The `VoxLMConfig` of a converted M3D-LaMed checkpoint.

    Args:
        m3d_config (`dict`): the released `config.json`, read as JSON (it names M3D's remote code in `auto_map`).
        shapes (`dict[str, tuple]`): shapes of the converted weights, by voxlm key.
        token_ids (`dict[str, int]`): `image_token_id` (the tokenizer's `<im_patch>`: M3D never writes it to
            config.json), `seg_token_id`, `box_start_token_id`, `box_end_token_id`, `pad_token_id` (may be `None`).
        constants (`dict`, *optional*): overrides of `M3D_LAMED_CONSTANTS`.
    """
    check_m3d_lamed_fields(m3d_config)
    unknown = set(constants or {}) - set(M3D_LAMED_CONSTANTS)
    if unknown:
        raise ValueError(f"Unknown M3D constants {sorted(unknown)}; known: {sorted(M3D_LAMED_CONSTANTS)}")
    constants = {**M3D_LAMED_CONSTANTS, **(constants or {})}
    image_size, patch_size = m3d_config["image_size"], m3d_config["patch_size"]
    text_type = LAMED_TEXT_MODEL_TYPES[m3d_config["model_type"]]
    text_fields = llm_config_fields(m3d_config, text_type)
    text_fields["vocab_size"] = shapes["language_model.model.embed_tokens.weight"][0]
    seg_config = None
    if m3d_config.get("segmentation_module") and "seg_head.prompt_projector.0.weight" in shapes:
        seg_config = dict(
            head_type="segvol",
            prompt_token="previous",
            hidden_size=shapes["seg_head.prompt_projector.2.weight"][0],
            num_hidden_layers=count_layers(shapes, "seg_head.mask_decoder.layers."),
            num_attention_heads=constants["TwoWayTransformer.num_heads"],
            intermediate_size=shapes["seg_head.mask_decoder.layers.0.mlp.0.weight"][0],
            prompt_dropout=constants["seg_projector.dropout"],
            num_mask_tokens=shapes["seg_head.mask_decoder.mask_tokens"][0],
            image_encoder_config=vit_config_from_shapes(
                shapes, "seg_head.image_encoder.", image_size, patch_size, constants["_build_sam.num_heads"]
            ),
        )
    return VoxLMConfig(
        vision_config=vit_config_from_shapes(shapes, "vision_tower.", image_size, patch_size,
                                             constants["ViT3DTower.num_heads"],
                                             m3d_config.get("image_channel", 1)),
        text_config={"model_type": text_type, **text_fields},
        seg_config=seg_config,
        projector_type=m3d_config.get("mm_projector_type", "spp"),
        pooling_size=m3d_config.get("proj_pooling_size", 2),
        image_token_id=token_ids["image_token_id"],
        seg_token_id=token_ids.get("seg_token_id") if seg_config else None,
        box_start_token_id=token_ids.get("box_start_token_id"),
        box_end_token_id=token_ids.get("box_end_token_id"),
        pad_token_id=token_ids.get("pad_token_id"),
    )
