"""Merlin -> MerlinModel: a tiny Merlin release that Merlin's own code made (`tests/merlin/make_merlin.py`, which also
wrote Merlin's outputs for it) converts into a folder whose image, phenotype and text embeddings are Merlin's."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

from voxlm.conversion import convert_merlin
from voxlm.modeling import MerlinModel, MerlinVisionModel
from voxlm.modeling.convert_m3d import load_state_dict_file
from voxlm.modeling.convert_merlin import MERLIN_CHECKPOINT, MERLIN_COMMIT, convert_merlin_state_dict
from voxlm.processing import VoxCLIPProcessor

FIXTURES = Path(__file__).parent / "merlin"
SOURCE = FIXTURES / "release"
TEXT_ENCODER = FIXTURES / "Clinical-Longformer"
REFERENCE = FIXTURES / "reference.safetensors"
OVERRIDES = {"text_encoder": str(TEXT_ENCODER)}
USER_SCRIPT = Path(__file__).parent / "remote_code_user.py"
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(REFERENCE)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`(folder, model, processor)`: the fixture release converted, then loaded with the Auto classes."""
    folder = convert_merlin(SOURCE, tmp_path_factory.mktemp("merlin") / "merlin", OVERRIDES)
    return folder, AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def copied_source(tmp_path: Path) -> Path:
    folder = tmp_path / "release"
    shutil.copytree(SOURCE, folder)
    return folder


def test_reference_was_made_by_the_merlin_commit_the_converter_names():
    with safe_open(REFERENCE, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["StanfordMIMI/Merlin"] == MERLIN_COMMIT
    assert metadata["made_by"] == "tests/merlin/make_merlin.py"


def test_folder_loads_with_the_auto_classes_and_its_card_names_the_source(converted):
    folder, model, processor = converted
    assert isinstance(model, MerlinModel) and isinstance(processor, VoxCLIPProcessor)
    vision = model.config.vision_config
    assert (vision.depths, vision.widths, vision.stem_width, vision.num_phenotypes) == ([1, 2, 1, 1], [2, 4, 8, 16],
                                                                                        4, 7)
    assert vision.hidden_size == 64 and model.config.projection_dim == 16
    assert model.config.text_config.model_type == "longformer"
    assert processor.max_length == 1024 and processor.image_processor.image_size == [224, 224, 160]
    card = (folder / "README.md").read_text()
    assert "license: other" in card and "MIT" in card and str(SOURCE) in card


def test_image_phenotype_and_text_embeddings_are_merlins(converted, reference):
    _, model, _ = converted
    with torch.no_grad():
        vision = model.vision_model(reference["image"])  # Merlin's (B, 1, R, A, S) arrays, as they are
        image_embeds = model.get_image_features(reference["image"])
        text_embeds = model.get_text_features(reference["input_ids"], reference["attention_mask"])
        output = model(pixel_values=reference["image"], input_ids=reference["input_ids"],
                       attention_mask=reference["attention_mask"])
    torch.testing.assert_close(vision.pooler_output, reference["pooled_image_features"], atol=ATOL, rtol=0)
    torch.testing.assert_close(vision.phenotype_logits, reference["phenotype_logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(image_embeds, reference["image_embeds"], atol=ATOL, rtol=0)
    torch.testing.assert_close(text_embeds, reference["text_embeds"], atol=ATOL, rtol=0)
    torch.testing.assert_close(output.image_embeds, reference["image_embeds_normalized"], atol=ATOL, rtol=0)
    torch.testing.assert_close(output.text_embeds, reference["text_embeds_normalized"], atol=ATOL, rtol=0)
    scale = model.logit_scale.exp()
    torch.testing.assert_close(output.logits_per_image, scale * output.image_embeds @ output.text_embeds.T)
    assert vision.last_hidden_state.shape == (2, 1, 64)  # a 1 x 1 x 1 feature map: one token


def test_processor_tokens_of_sanitized_reports_are_merlins(converted, reference):
    _, model, processor = converted
    with safe_open(REFERENCE, "pt") as handle:
        reports = json.loads(handle.metadata()["reports"])
    sanitized = ["the liver is normal ; no focal lesion .", "small left renal cyst , 1 . 2 cm . liver normal ."]
    assert [report.lower() for report in reports] != sanitized  # what Merlin's sanitize_report does on the way
    inputs = processor(text=sanitized)
    torch.testing.assert_close(inputs["input_ids"], reference["input_ids"], rtol=0, atol=0)
    with torch.no_grad():
        text_embeds = model.get_text_features(**inputs)
    torch.testing.assert_close(text_embeds, reference["text_embeds"], atol=ATOL, rtol=0)


def test_save_load_round_trip_and_vision_model_alone(converted, reference, tmp_path):
    _, model, _ = converted
    model.save_pretrained(tmp_path / "again")
    reloaded = AutoModel.from_pretrained(tmp_path / "again").eval()
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    model.vision_model.save_pretrained(tmp_path / "vision")
    vision = AutoModel.from_pretrained(tmp_path / "vision").eval()
    assert isinstance(vision, MerlinVisionModel)
    with torch.no_grad():
        torch.testing.assert_close(vision(reference["image"]).pooler_output, reference["pooled_image_features"],
                                   atol=ATOL, rtol=0)


def test_folder_loads_without_voxlm_through_remote_code(converted, reference, tmp_path):
    folder, model, _ = converted
    volume = tmp_path / "volume.npy"
    np.save(volume, reference["image"][0, 0].numpy())
    output = tmp_path / "remote.safetensors"
    # A fresh module cache and no voxlm on the path: remote_code_user.py also blocks `import voxlm`.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, str(USER_SCRIPT), "voxclip", str(folder), str(output),
                           "the liver is normal .", str(volume)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    with safe_open(output, "pt") as saved:
        remote = {name: saved.get_tensor(name) for name in saved.keys()}
        classes = json.loads(saved.metadata()["texts"])["classes"]
    assert all(name.startswith("transformers_modules.") for name in classes), classes
    assert classes[-1].endswith(".MerlinModel")
    with torch.no_grad():
        torch.testing.assert_close(remote["image_embeds.0"], model.get_image_features(remote["pixel_values.0"]))
        tokens = AutoProcessor.from_pretrained(folder)(text=["the liver is normal ."])
        torch.testing.assert_close(remote["text_embeds"], model.get_text_features(**tokens))


def test_only_the_unused_longformer_pooler_is_skipped_and_logit_scale_is_kept():
    source = load_state_dict_file(SOURCE / MERLIN_CHECKPOINT)
    converted_weights, skipped = convert_merlin_state_dict(source)
    assert torch.equal(converted_weights["logit_scale"], source["logit_scale"])  # Merlin's code never reads it
    assert converted_weights["logit_bias"].item() == 0.0
    assert sorted(skipped) == ["encode_text.text_encoder.pooler.dense.bias",
                               "encode_text.text_encoder.pooler.dense.weight"]


def edited_checkpoint(tmp_path: Path, edit) -> Path:
    source = copied_source(tmp_path)
    weights = torch.load(source / MERLIN_CHECKPOINT, weights_only=True)
    edit(weights)
    torch.save(weights, source / MERLIN_CHECKPOINT)
    return source


def test_incomplete_checkpoint_names_the_missing_tensors(tmp_path):
    def drop(weights):
        del weights["encode_image.i3_resnet.layer2.1.conv2.weight"], weights["encode_text.linear_layer.bias"]

    with pytest.raises(ValueError, match="missing 2 tensors") as error:
        convert_merlin(edited_checkpoint(tmp_path, drop), tmp_path / "out", OVERRIDES)
    assert "encode_image.i3_resnet.layer2.1.conv2.weight" in str(error.value)
    assert "encode_text.linear_layer.bias" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_wrongly_shaped_tensor_is_named(tmp_path):
    def reshape(weights):
        weights["encode_image.i3_resnet.layer3.0.conv2.weight"] = torch.zeros(8, 8, 3, 3, 1)

    with pytest.raises(ValueError, match=r"encode_image\.i3_resnet\.layer3\.0\.conv2\.weight: \(8, 8, 3, 3, 1\), "
                                         r"expected \(8, 8, 3, 3, 3\)"):
        convert_merlin(edited_checkpoint(tmp_path, reshape), tmp_path / "out", OVERRIDES)


def test_checkpoint_without_a_resnet_is_refused(tmp_path):
    def drop_stem(weights):
        del weights["encode_image.i3_resnet.conv1.weight"]

    with pytest.raises(ValueError, match=r"no encode_image\.i3_resnet\.conv1\.weight"):
        convert_merlin(edited_checkpoint(tmp_path, drop_stem), tmp_path / "out", OVERRIDES)


def test_unknown_override_is_refused():
    with pytest.raises(ValueError, match="projection_dim"):
        convert_merlin(SOURCE, "unused", {"projection_dim": 64})


def test_a_hub_id_is_downloaded_and_converted_from_the_command_line(monkeypatch, tmp_path):
    import huggingface_hub

    from voxlm.cli import main

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kwargs: asked.append((repo_id, kwargs.get("allow_patterns"))) or str(SOURCE))
    settings = tmp_path / "overrides.json"
    settings.write_text(json.dumps(OVERRIDES))
    main(["convert", "merlin", "stanfordmimi/Merlin", str(tmp_path / "out"), "--config", str(settings)])
    assert asked == [("stanfordmimi/Merlin", [MERLIN_CHECKPOINT])]
    assert "base_model: stanfordmimi/Merlin" in (tmp_path / "out" / "README.md").read_text()
    assert isinstance(AutoModel.from_pretrained(tmp_path / "out"), MerlinModel)


@pytest.mark.parametrize("field, value", [
    ("depths", [1, 0]), ("widths", [2, 4, 8]), ("strides", [1, 2, 2, 0]), ("num_phenotypes", 0),
    ("batch_norm_eps", 0.0),
])
def test_vision_config_names_the_bad_field(field, value):
    from voxlm.modeling import MerlinVisionConfig

    with pytest.raises(ValueError, match=f"`{field}`"):
        MerlinVisionConfig(**{"depths": [1, 1, 1, 1], "widths": [2, 4, 8, 16], field: value})


def test_vision_model_gives_every_stage_and_refuses_studies(converted, reference):
    _, model, _ = converted
    with torch.no_grad():
        output = model.vision_model(reference["image"], output_hidden_states=True)
        as_tuple = model.vision_model(reference["image"], return_dict=False)
    assert [tuple(state.shape[1:]) for state in output.hidden_states] == [
        (4, 8, 8, 8), (8, 8, 8, 8), (16, 4, 4, 4), (32, 2, 2, 2), (64, 1, 1, 1)]  # (C, S, R, A) of a 32 x 32 x 16
    torch.testing.assert_close(as_tuple[1], output.pooler_output, rtol=0, atol=0)
    with pytest.raises(ValueError, match="scan_mask"):
        model.get_image_features(reference["image"], scan_mask=torch.ones(2, 1, dtype=torch.bool))
