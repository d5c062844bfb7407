"""Saved voxlm folders used by a Hub user without voxlm: `trust_remote_code=True` loads the model, the processor and
the pipeline from the code the folder carries (in a process where `import voxlm` fails, `remote_code_user.py`), and
they compute what voxlm computes, on nilearn's MNI152 (an MRI in NIfTI) and pydicom's CT5N series (a CT in DICOM)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from study_files import CT5N
from tiny_models import DEMO_SEG_ANSWER, DEMO_SEG_QUESTION
from transformers import AutoModel, AutoProcessor, pipeline

import voxlm  # noqa: F401  (registers the Auto classes)
from voxlm import inference
from voxlm.processing import VolumeError, VoxLMPipeline, read_volume

USER_SCRIPT = Path(__file__).with_name("remote_code_user.py")
REPORT = "No acute intracranial hemorrhage. The ventricles are normal in size."


def run_without_voxlm(kind: str, folder: Path, text: str, volumes: list, workdir: Path) -> tuple[dict, dict]:
    """What `remote_code_user.py` computed: `(tensors, texts)`."""
    output = workdir / f"{kind}.safetensors"
    # A fresh module cache: the folder's code is copied from the folder, never found from an earlier run.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(workdir / "modules"), "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, str(USER_SCRIPT), kind, str(folder), str(output), text, *map(str, volumes)],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    with safe_open(output, "pt") as saved:
        return {name: saved.get_tensor(name) for name in saved.keys()}, json.loads(saved.metadata()["texts"])


def assert_remote_classes(texts: dict, names: list[str]) -> None:
    # Every class came from the folder's code, which transformers imports as `transformers_modules.<folder>...`.
    assert texts["classes"] and all(name.startswith("transformers_modules.") for name in texts["classes"]), texts
    assert [name.rsplit(".", 1)[1] for name in texts["classes"]] == names


def test_voxlm_folder_without_voxlm_gives_voxlm_inputs_tokens_and_masks(demo_model_dirs, mni_path, tmp_path):
    folder = demo_model_dirs[0]
    volumes = [mni_path, CT5N]
    remote, texts = run_without_voxlm("voxlm", folder, DEMO_SEG_QUESTION, volumes, tmp_path)
    assert_remote_classes(texts, ["VoxLMProcessor", "VoxVolumeProcessor", "VoxLMForConditionalGeneration",
                                  "VoxLMPipeline"])
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    answerer = pipeline("image-text-to-text", model=folder, pipeline_class=VoxLMPipeline)
    for index, volume in enumerate(volumes):
        inputs = processor(images=volume, text=DEMO_SEG_QUESTION)
        torch.testing.assert_close(remote[f"pixel_values.{index}"], inputs["pixel_values"], rtol=0, atol=0)
        assert torch.equal(remote[f"input_ids.{index}"], inputs["input_ids"])
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert torch.equal(remote[f"generated.{index}"], generated)
        answer = answerer(images=volume, text=DEMO_SEG_QUESTION, max_new_tokens=8, return_masks=True)
        assert texts[str(index)] == answer["generated_text"] == DEMO_SEG_ANSWER
        assert answer["mask"].any() and torch.equal(remote[f"pipeline_mask.{index}"], torch.from_numpy(answer["mask"]))
    # MNI152 is an MRI: both processors normalised it by percentiles, as modality="MR" does.
    mr = processor(images=mni_path, text=DEMO_SEG_QUESTION, modality="MR")["pixel_values"]
    torch.testing.assert_close(remote["pixel_values.0"], mr, rtol=0, atol=0)


def test_voxclip_folder_without_voxlm_gives_voxlm_embeddings(demo_model_dirs, mni_path, tmp_path):
    folder = demo_model_dirs[1]
    volumes = [mni_path, CT5N]
    remote, texts = run_without_voxlm("voxclip", folder, REPORT, volumes, tmp_path)
    assert_remote_classes(texts, ["VoxCLIPProcessor", "VoxVolumeProcessor", "VoxCLIPModel"])
    model, processor = inference.load_voxclip(str(folder), device="cpu")
    with torch.no_grad():
        for index, volume in enumerate(volumes):
            pixel_values = processor(images=volume)["pixel_values"]
            torch.testing.assert_close(remote[f"pixel_values.{index}"], pixel_values, rtol=0, atol=0)
            torch.testing.assert_close(remote[f"image_embeds.{index}"], model.get_image_features(pixel_values))
        tokens = processor(text=[REPORT])
        torch.testing.assert_close(remote["text_embeds"], model.get_text_features(tokens["input_ids"],
                                                                                  tokens["attention_mask"]))
    assert not torch.allclose(remote["image_embeds.0"], remote["image_embeds.1"])


def test_voxclip_processor_truncates_reports_to_its_saved_length(demo_model_dirs, tmp_path):
    processor = AutoProcessor.from_pretrained(demo_model_dirs[1])
    processor.max_length = 6
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "VoxCLIPProcessor" and reloaded.max_length == 6
    tokens = reloaded(text=[REPORT, "Normal."])
    assert tokens["input_ids"].shape == (2, 6) and "token_type_ids" not in tokens
    assert tokens["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0]  # [CLS] normal . [SEP], padded
    with pytest.raises(ValueError, match="`images` .*`text`"):
        reloaded()
    with pytest.raises(TypeError, match="padding"):
        reloaded(text="a", padding="max_length")


def test_a_missing_optional_reader_is_named_with_its_install_command(monkeypatch, tmp_path):
    import numpy as np
    import SimpleITK as sitk

    from voxlm.processing import readers

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.int16)), str(tmp_path / "volume.nrrd"))
    monkeypatch.setattr(readers, "pydicom", None)
    with pytest.raises(VolumeError, match=r"CT5N: reading DICOM needs the `pydicom` package \(pip install pydicom\)"):
        read_volume(CT5N)
    monkeypatch.setattr(readers, "sitk", None)
    with pytest.raises(VolumeError, match="needs the `SimpleITK` package"):
        read_volume(tmp_path / "volume.nrrd")
