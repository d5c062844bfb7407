"""Shard-by-shard conversion (`voxlm.conversion.checkpoints`): a multi-shard source converts without holding more
than about one shard in memory, `.bin` shards are read without unpickling, and incomplete sources are named."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from voxlm.conversion import checkpoint_files, convert_shards

SHARDS, SHARD_MB = 6, 40

MEASURE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from voxlm.conversion import checkpoint_files, convert_shards
    from voxlm.modeling.convert_m3d import convert_m3d_lamed_state_dict

    def status_mb(field):  # VmRSS: resident now; VmHWM: the peak since the last reset
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
        return int(line.split()[1]) / 1024

    source, output = Path(sys.argv[1]), Path(sys.argv[2])
    files = checkpoint_files(source)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS: the imports' peak is not the conversion's
    before = status_mb("VmRSS:")
    convert_shards(files, output, convert_m3d_lamed_state_dict)
    print(before, status_mb("VmHWM:"))
    """
)


def write_sharded_source(folder, shards: int, shard_mb: int) -> None:
    """A LaMed-style checkpoint of `shards` safetensors files of about `shard_mb` MB each, with its index."""
    folder.mkdir()
    weight_map = {}
    rows = shard_mb * 2**20 // (4 * 1024)
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {f"model.layers.{index}.mlp.{part}.weight": torch.randn(rows // 2, 1024) for part in ("up", "down")}
        save_file(tensors, folder / name)
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_a_multi_shard_checkpoint_converts_holding_about_one_shard(tmp_path):
    source = tmp_path / "source"
    write_sharded_source(source, SHARDS, SHARD_MB)
    done = subprocess.run([sys.executable, "-c", MEASURE, str(source), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    before, peak = map(float, done.stdout.split())
    # One shard read (its file pages, mapped, count as resident) and written; all of them would be 240 MB.
    assert peak - before < 2 * SHARD_MB, (before, peak)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == SHARDS
    converted = load_file(tmp_path / "out" / index["weight_map"]["language_model.model.layers.3.mlp.up.weight"])
    original = load_file(source / f"model-00004-of-{SHARDS:05d}.safetensors")
    assert torch.equal(converted["language_model.model.layers.3.mlp.up.weight"], original["model.layers.3.mlp.up.weight"])


def test_bin_shards_are_read_without_unpickling_objects(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"model.norm.weight": torch.ones(2), "payload": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        convert_shards(checkpoint_files(tmp_path), tmp_path / "out", lambda state: (state, []))


def test_missing_weights_and_shards_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights"):
        checkpoint_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"names shards that are not there: \['model-1.safetensors'\]"):
        checkpoint_files(tmp_path)
