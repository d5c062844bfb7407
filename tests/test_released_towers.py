"""The converted released encoders (COLIPRI, HLIP, Merlin, DCFormer-SigLIP) in voxlm's own commands: `voxlm classify`
on a NIfTI file with each, and VoxCLIP pre-training started from each one's image tower and its saved preprocessing."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from voxlm.cli import main as voxlm_main
from voxlm.conversion import convert_colipri, convert_dcformer_siglip, convert_hlip, convert_merlin
from voxlm.data.phantom_dataset import write_phantom_dataset
from voxlm.processing import VoxVolumeProcessor
from voxlm.training.settings import RunSettings
from voxlm.training.train_clip import ClipDataSettings, ClipPretrainedParts, ClipSettings, train

TESTS = Path(__file__).parent
# kind -> (converter, the tiny release its source's code made, overrides for the tiny sizes)
RELEASES = {
    "colipri": (convert_colipri, TESTS / "colipri" / "colipri",
                json.loads((TESTS / "colipri" / "colipri" / "overrides.json").read_text())),
    "hlip": (convert_hlip, TESTS / "hlip" / "hlip_tiny",
             json.loads((TESTS / "hlip" / "tiny_overrides.json").read_text())),
    "merlin": (convert_merlin, TESTS / "merlin" / "release",
               {"text_encoder": str(TESTS / "merlin" / "Clinical-Longformer")}),
    "dcformer-siglip": (convert_dcformer_siglip, TESTS / "dcformer_siglip" / "dcformer_siglip",
                        {"text_config": {"n_heads": 4}}),
}
# Merlin's processor pads every volume to its released 224 x 224 x 160; the tiny ResNet trains as well on less.
SMALL_INPUTS = {"merlin": {"image_size": [32, 32, 16]}}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("released")
    return {kind: convert(source, folder / kind, overrides) for kind, (convert, source, overrides) in RELEASES.items()}


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory):
    """A small CT in Hounsfield units: a soft-tissue block with a bright insert, in air, at 2 x 1 x 1 mm."""
    volume = np.full((48, 40, 24), -1000.0, dtype=np.float32)  # (x, y, z)
    volume[8:40, 6:34, 4:20] = 40.0
    volume[20:28, 14:22, 8:16] = 900.0
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return path


@pytest.mark.parametrize("kind", sorted(RELEASES))
def test_classify_runs_with_each_converted_encoder(kind, converted, ct_file, capsys):
    labels = ["hemorrhage", "no acute abnormality"]
    assert voxlm_main(["classify", str(ct_file), "--labels", ",".join(labels), "--model", str(converted[kind]),
                       "--json"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{"):])
    assert list(result) == labels and sum(result.values()) == pytest.approx(1.0, abs=1e-3)


def train_from_tower(folder: Path, kind: str, tmp_path: Path, max_steps: int = 2) -> Path:
    """`voxlm train pretrain-clip` on four phantom pairs, starting from the converted encoder's image tower."""
    write_phantom_dataset(tmp_path / "data", num_cases=4, shape=(16, 32, 32), rows_per_shard=4, test_fraction=0.0)
    settings = ClipSettings(
        pretrained=ClipPretrainedParts(vision=str(folder), text_dropout=0.0),
        model={"projection_dim": 16}, processor=SMALL_INPUTS.get(kind, {}),
        data=ClipDataSettings(path=str(tmp_path / "data"), shuffle_buffer=0),
        run=RunSettings(output_dir=str(tmp_path / "run"), max_steps=max_steps, batch_size=2, learning_rate=1e-3,
                        tracker=None),
    )
    return train(settings)


@pytest.mark.parametrize("kind", sorted(RELEASES))
def test_voxclip_pretraining_starts_from_each_image_tower(kind, converted, tmp_path):
    source = AutoModel.from_pretrained(converted[kind])
    saved = VoxVolumeProcessor.from_pretrained(converted[kind])
    final = train_from_tower(converted[kind], kind, tmp_path)
    clip = AutoModel.from_pretrained(final)
    assert type(clip.vision_model) is type(source.vision_model)
    # The tower trained: it started from the converted weights and moved.
    moved = [name for name, tensor in source.vision_model.state_dict().items()
             if tensor.is_floating_point() and not torch.equal(tensor, clip.vision_model.state_dict()[name])]
    assert moved
    # The run kept the converted encoder's own preprocessing (with the test's smaller input for Merlin).
    trained = VoxVolumeProcessor.from_pretrained(final).to_dict()
    expected = {**saved.to_dict(), **SMALL_INPUTS.get(kind, {})}
    assert {key: trained[key] for key in expected if key != "image_processor_type"} == {
        key: value for key, value in expected.items() if key != "image_processor_type"}


def test_voxclip_on_a_converted_tower_loads_without_voxlm(converted, tmp_path):
    final = train_from_tower(converted["dcformer-siglip"], "dcformer-siglip", tmp_path, max_steps=1)
    volume = tmp_path / "volume.npy"
    np.save(volume, np.random.default_rng(0).random((16, 32, 32)).astype(np.float32))
    output = tmp_path / "remote.safetensors"
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": "",
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, str(TESTS / "remote_code_user.py"), "voxclip", str(final), str(output),
                           "A report.", str(volume)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    model = AutoModel.from_pretrained(final).eval()
    remote = load_file(output)
    with torch.no_grad():
        torch.testing.assert_close(remote["image_embeds.0"], model.get_image_features(remote["pixel_values.0"]))


@pytest.mark.parametrize("kind", sorted(RELEASES))
def test_cards_say_what_was_converted_and_its_licences(kind, converted):
    card = (converted[kind] / "README.md").read_text()
    assert f"converted by `voxlm convert {kind}`" in card and "A VoxCLIP" not in card
    assert "MIT" in card
