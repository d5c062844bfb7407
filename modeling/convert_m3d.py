"""Convert M3D-CLIP / MONAI `ViT` and M3D-LaMed checkpoints into voxlm weights.

M3D-CLIP ships its encoder as `pretrained_ViT.bin`, a MONAI `ViT` state dict (`pos_embed="perceptron"`,
`classification=True`). M3D-LaMed checkpoints hold the same encoder under `model.vision_tower.vision_tower.`, the
projector under `model.mm_projector.`, the `[SEG]` projector under `model.seg_projector.`, SegVol under
`model.seg_module.` and the LLM under `model.` / `lm_head.`. Loading never unpickles: `.bin` files are read with
`torch.load(weights_only=True)`, `.safetensors` with safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

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


def convert_m3d_lamed_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """M3D-LaMed keys -> `VoxLMForConditionalGeneration` keys.

    Args:
        state_dict (`dict[str, torch.Tensor]`): a LaMed checkpoint (`LamedLlamaForCausalLM`, `LamedPhi3ForCausalLM`).

    Returns:
        `(converted, skipped)`: voxlm weights, and the keys that have no voxlm counterpart. Those are M3D's SegVol
        mask decoder (`model.seg_module.*`, a different architecture from `VoxSegHead`, which is trained anew) and
        the MONAI classification head.
    """
    vision = {}
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
        elif key.startswith("model.seg_module."):
            skipped.append(key)
        elif key.startswith("model."):
            converted["language_model." + key] = value
        elif key.startswith("lm_head."):
            converted["language_model." + key] = value
        else:
            skipped.append(key)
    skipped += [key for key in vision if ".classification_head." in key]
    converted.update({f"vision_tower.{k}": v for k, v in convert_monai_vit_state_dict(vision).items()})
    return converted, skipped
