"""DCFormer-SigLIP (Med3DVLM) -> voxlm: a tiny `dec_clip` release that Med3DVLM's own code made
(`tests/dcformer_siglip/make_dcformer_siglip.py`, which also wrote DEC_CLIP's outputs for it) converts into a folder
whose embeddings, stage tokens and SigLIP logits are Med3DVLM's."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor

from voxlm.cli import main as voxlm_main
from voxlm.conversion import convert_dcformer_siglip
from voxlm.modeling import DCFormerSiglipModel
from voxlm.modeling.convert_dcformer_siglip import MED3DVLM_COMMIT
from voxlm.processing import VoxCLIPProcessor

FIXTURES = Path(__file__).parent / "dcformer_siglip"
SOURCE = FIXTURES / "dcformer_siglip"
REFERENCE = FIXTURES / "reference.safetensors"
OVERRIDES = {"text_config": {"n_heads": 4}}  # the tiny DistilBERT is 32 wide: no 64-wide heads
ATOL = 1e-5
REMOTE_USER = """
import sys
sys.modules["voxlm"] = None  # a user without voxlm
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel
folder, reference, output = sys.argv[1:]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
ref = load_file(reference)
with torch.no_grad():
    save_file({"image_embeds": model.get_image_features(ref["pixel_values"]),
               "text_embeds": model.get_text_features(ref["input_ids"], ref["attention_mask"])}, output)
print(type(model).__module__)
"""


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(REFERENCE)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`(folder, model)`: the fixture release converted, then loaded with `AutoModel`."""
    folder = convert_dcformer_siglip(SOURCE, tmp_path_factory.mktemp("dcformer") / "dcformer-siglip", OVERRIDES)
    return folder, AutoModel.from_pretrained(folder).eval()


def test_reference_was_made_by_med3dvlm_at_the_tested_commit():
    with safe_open(REFERENCE, "pt") as saved:
        metadata = saved.metadata()
    assert metadata["mirthAI/Med3DVLM"] == MED3DVLM_COMMIT
    assert metadata["made_by"] == "tests/dcformer_siglip/make_dcformer_siglip.py"


def test_embeddings_stage_tokens_and_logits_are_med3dvlms(converted, reference):
    folder, model = converted
    assert isinstance(model, DCFormerSiglipModel)
    with torch.no_grad():
        output = model(reference["pixel_values"], reference["input_ids"], reference["attention_mask"])
        vision = model.vision_model(reference["pixel_values"], output_hidden_states=True)
        image_embeds = model.get_image_features(reference["pixel_values"])
        text_embeds = model.get_text_features(reference["input_ids"], reference["attention_mask"])
    torch.testing.assert_close(image_embeds, reference["image_embeds"], atol=ATOL, rtol=0)
    torch.testing.assert_close(text_embeds, reference["text_embeds"], atol=ATOL, rtol=0)
    torch.testing.assert_close(output.image_embeds, reference["image_embeds"], atol=ATOL, rtol=0)
    # DEC_CLIP.forward returns (logits_per_image + logits_per_text) / 2.
    symmetric = (output.logits_per_image + output.logits_per_text) / 2
    torch.testing.assert_close(symmetric, reference["logits"], atol=1e-4, rtol=0)
    assert len(vision.hidden_states) == 5
    for index, tokens in enumerate(vision.hidden_states):
        torch.testing.assert_close(tokens, reference[f"hidden_states.{index}"], atol=ATOL, rtol=0)
    torch.testing.assert_close(vision.last_hidden_state, reference["hidden_states.4"], atol=ATOL, rtol=0)
    assert vision.pooler_output.shape == (2, model.config.vision_config.hidden_size)


def test_folder_loads_with_auto_processor_and_round_trips(converted, reference, tmp_path):
    folder, model = converted
    processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(processor, VoxCLIPProcessor) and processor.max_length == 512
    # The config's `input_size` (Med3DVLM's (H, W, D) = (32, 96, 16)), as (D, H, W).
    assert tuple(processor.image_processor.image_size) == (16, 32, 96)
    assert "MIT" in (folder / "README.md").read_text()
    model.save_pretrained(tmp_path / "again")
    again = AutoModel.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(again.get_image_features(reference["pixel_values"]), reference["image_embeds"],
                                   atol=ATOL, rtol=0)


def test_trust_remote_code_without_voxlm_gives_the_same_embeddings(converted, reference, tmp_path):
    folder, _ = converted
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", REMOTE_USER, str(folder), str(REFERENCE), str(tmp_path / "o.st")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().startswith("transformers_modules.")
    remote = load_file(tmp_path / "o.st")
    torch.testing.assert_close(remote["image_embeds"], reference["image_embeds"], atol=ATOL, rtol=0)
    torch.testing.assert_close(remote["text_embeds"], reference["text_embeds"], atol=ATOL, rtol=0)


def test_command_line_converts_the_fixture(tmp_path, reference):
    settings = tmp_path / "overrides.json"
    settings.write_text('{"text_config": {"n_heads": 4}}')
    assert voxlm_main(["convert", "dcformer-siglip", str(SOURCE), str(tmp_path / "out"), "--config",
                       str(settings)]) in (0, None)
    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        text_embeds = model.get_text_features(reference["input_ids"], reference["attention_mask"])
    torch.testing.assert_close(text_embeds, reference["text_embeds"], atol=ATOL, rtol=0)


def broken_copy(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(SOURCE, folder)
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors")
    return folder


def test_a_missing_tensor_is_named(tmp_path):
    folder = broken_copy(tmp_path, lambda w: w.pop("vision_encoder.encoder.s2.0.dwconv.c3.1.running_var"))
    with pytest.raises(ValueError, match=r"missing 1 tensors: vision_model\.stages\.1\.0\.dwconv\.norm_d\.running"):
        convert_dcformer_siglip(folder, tmp_path / "out", OVERRIDES)


def test_a_wrong_shape_is_named(tmp_path):
    folder = broken_copy(tmp_path, lambda w: w.update({"mm_vision_proj.bias": torch.zeros(7)}))
    with pytest.raises(ValueError, match=r"visual_projection\.bias: \(7,\), expected \(20,\)"):
        convert_dcformer_siglip(folder, tmp_path / "out", OVERRIDES)


def test_an_unknown_override_and_a_missing_head_count_are_named(tmp_path):
    with pytest.raises(ValueError, match="Unknown DCFormer-SigLIP conversion overrides \\['channels'\\]"):
        convert_dcformer_siglip(SOURCE, tmp_path / "out", {"channels": [1]})
    with pytest.raises(ValueError, match="n_heads"):
        convert_dcformer_siglip(SOURCE, tmp_path / "out2")
