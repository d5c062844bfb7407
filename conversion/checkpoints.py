"""Reading a released checkpoint folder (or Hub repo) and writing its converted weights one shard at a time."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from voxlm.modeling.convert_m3d import load_state_dict_file


def resolve_source(source: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local folder as it is; anything else is a Hub repo id, downloaded with `huggingface_hub.snapshot_download`.

    Args:
        source (`str` or `Path`): a folder or a Hub repo id.
        allow_patterns (`list[str]`, *optional*): the files to download (all by default).
    """
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{source}: a checkpoint source is a folder or a Hub repo id, not a file")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(str(source), allow_patterns=allow_patterns))
    except HFValidationError as error:
        raise ValueError(f"{source}: neither a folder nor a valid Hub repo id ({error})") from error


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of the tensors that share storage with an earlier one: safetensors refuses shared storage (tied
    weights, views a converter made)."""
    seen = set()
    result = {}
    for key, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        result[key] = tensor.clone() if pointer in seen else tensor.contiguous()
        seen.add(pointer)
    return result


def convert_shards(
    files: list[Path],
    output_dir: str | Path,
    convert: Callable[[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], list[str]]],
    metadata: dict[str, str] | None = None,
) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Convert a checkpoint shard by shard: each source file is read, converted and written as one safetensors shard
    of the output before the next is read, so memory holds about one shard (and what the writer needs for it).

    Args:
        files (`list[Path]`): the source weight files (`voxlm.modeling.convert_m3d.checkpoint_files`); `.bin` files are read with
            `torch.load(weights_only=True)`, never unpickling arbitrary objects.
        output_dir (`str` or `Path`): where `model.safetensors` (one file) or `model-XXXXX-of-YYYYY.safetensors` and
            `model.safetensors.index.json` go.
        convert (`Callable`): a key-local converter `state_dict -> (converted, skipped keys)`.
        metadata (`dict[str, str]`, *optional*): stored in every shard's header (transformers wants `format: pt`).

    Returns:
        `(shapes, skipped)`: the shape of every converted tensor by key, and every key that was left out.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", **(metadata or {})}
    shapes: dict[str, tuple[int, ...]] = {}
    skipped: list[str] = []
    weight_map: dict[str, str] = {}
    total_size = 0
    for index, file in enumerate(files, start=1):
        converted, left_out = convert(load_state_dict_file(file))
        duplicates = sorted(set(converted) & set(shapes))
        if duplicates:
            raise ValueError(f"{file.name}: converts to keys an earlier shard already held: {duplicates[:5]}")
        name = "model.safetensors" if len(files) == 1 else f"model-{index:05d}-of-{len(files):05d}.safetensors"
        save_file(unshared(converted), output_dir / name, metadata=metadata)
        shapes.update({key: tuple(tensor.shape) for key, tensor in converted.items()})
        weight_map.update(dict.fromkeys(converted, name))
        total_size += sum(tensor.numel() * tensor.element_size() for tensor in converted.values())
        skipped += left_out
        del converted  # before the next shard is read
    if len(files) > 1:
        index_file = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (output_dir / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2) + "\n")
    return shapes, skipped
