"""HLIP -> HLIPModel: a tiny HLIP release that HLIP's own code made inside open_clip (`tests/hlip/make_hlip.py`, which
also wrote HLIP's embeddings for a 2-scan study, a 1-scan volume and two reports) converts into a folder whose
embeddings are HLIP's, with voxlm and through the folder's own code."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_remote_code import assert_remote_classes, run_without_voxlm
from transformers import AutoModel, AutoProcessor

from voxlm.conversion import convert_hlip
from voxlm.modeling import HLIPModel, HLIPVisionModel
from voxlm.modeling.convert_hlip import HLIP_COMMIT
from voxlm.processing import VoxCLIPProcessor

FIXTURES = Path(__file__).parent / "hlip"
SOURCE = FIXTURES / "hlip_tiny"
REFERENCE = FIXTURES / "reference.safetensors"
OVERRIDES = json.loads((FIXTURES / "tiny_overrides.json").read_text())  # HLIP's model arguments of the tiny size
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(REFERENCE)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`(folder, model, processor)`: the fixture release converted, then loaded with the Auto classes."""
    folder = convert_hlip(SOURCE, tmp_path_factory.mktemp("hlip") / "hlip-tiny", OVERRIDES)
    return folder, AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def copied_source(tmp_path: Path) -> Path:
    folder = tmp_path / "hlip_tiny"
    shutil.copytree(SOURCE, folder)
    return folder


def test_reference_was_made_by_the_hlip_commit_the_converter_names():
    with safe_open(REFERENCE, "pt") as saved:
        assert saved.metadata()["hlip_commit"] == HLIP_COMMIT


def test_folder_loads_with_the_auto_classes_and_its_card_names_the_source(converted):
    folder, model, processor = converted
    assert isinstance(model, HLIPModel) and isinstance(model.vision_model, HLIPVisionModel)
    assert isinstance(processor, VoxCLIPProcessor) and processor.max_length == 16  # the release's context_length
    assert model.config.vision_config.attention_levels == ["slice", "study", "slice", "scan", "study", "scan",
                                                           "slice"]
    card = (folder / "README.md").read_text()
    assert "MIT" in card and HLIP_COMMIT[:8] in card


@pytest.mark.parametrize("name", ["study", "volume"])
def test_image_embeddings_are_hlips_encode_image(converted, reference, name):
    _, model, _ = converted
    pixel_values = reference[name]  # (1, S, 1, D, H, W)
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(pixel_values), reference[f"{name}_embeds"], rtol=0,
                                   atol=ATOL)
        if name == "volume":  # (B, 1, D, H, W) is a one-scan study
            torch.testing.assert_close(model.get_image_features(pixel_values[:, 0]), reference["volume_embeds"],
                                       rtol=0, atol=ATOL)


def test_text_embeddings_are_hlips_encode_text_and_the_processor_gives_its_tokens(converted, reference):
    _, model, processor = converted
    tokens = processor(text=["There is a small nodule in the right upper lobe.",
                             "No acute findings; the lungs are clear."])
    # HLIP pads to `context_length`, VoxCLIPProcessor to the longest report; BERT's mask makes the padding inert.
    length = tokens["input_ids"].shape[1]
    assert torch.equal(tokens["input_ids"], reference["input_ids"][:, :length])
    assert not reference["input_ids"][:, length:].any()
    with torch.no_grad():
        torch.testing.assert_close(model.get_text_features(tokens["input_ids"], tokens["attention_mask"]),
                                   reference["text_embeds"], rtol=0, atol=ATOL)
        torch.testing.assert_close(model.get_text_features(reference["input_ids"]), reference["text_embeds"],
                                   rtol=0, atol=ATOL)


def test_forward_gives_open_clips_logits(converted, reference):
    _, model, _ = converted
    assert model.logit_scale.item() == pytest.approx(reference["logit_scale"].item())
    with torch.no_grad():
        output = model(pixel_values=reference["study"], input_ids=reference["input_ids"])
    images = reference["study_embeds"] / reference["study_embeds"].norm(dim=-1, keepdim=True)
    texts = reference["text_embeds"] / reference["text_embeds"].norm(dim=-1, keepdim=True)
    expected = reference["logit_scale"].exp() * images @ texts.T  # open_clip's logits_per_image
    torch.testing.assert_close(output.logits_per_image, expected, rtol=0, atol=1e-4)
    assert output.logits_per_text.shape == (2, 1)


def test_save_and_load_round_trip_is_exact(converted, reference, tmp_path):
    _, model, _ = converted
    model.save_pretrained(tmp_path / "again")
    again = AutoModel.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(again.get_image_features(reference["study"]), model.get_image_features(reference["study"]))
        assert torch.equal(again.get_text_features(reference["input_ids"]),
                           model.get_text_features(reference["input_ids"]))


def test_folder_without_voxlm_gives_voxlm_embeddings(converted, tmp_path):
    folder, model, processor = converted
    volume = tmp_path / "volume.npy"
    np.save(volume, np.random.default_rng(0).normal(size=(12, 40, 40)).astype(np.float32) * 300.0)
    report = "Small nodule in the right upper lobe."
    remote, texts = run_without_voxlm("voxclip", folder, report, [volume], tmp_path)
    assert_remote_classes(texts, ["VoxCLIPProcessor", "VoxVolumeProcessor", "HLIPModel"])
    pixel_values = processor(images=str(volume))["pixel_values"]
    tokens = processor(text=[report])
    with torch.no_grad():
        torch.testing.assert_close(remote["pixel_values.0"], pixel_values, rtol=0, atol=0)
        torch.testing.assert_close(remote["image_embeds.0"], model.get_image_features(pixel_values))
        torch.testing.assert_close(remote["text_embeds"], model.get_text_features(tokens["input_ids"],
                                                                                  tokens["attention_mask"]))


def test_command_line_converts_with_hlip_model_arguments(tmp_path, reference):
    from voxlm.cli import main

    settings = tmp_path / "overrides.json"
    settings.write_text(json.dumps(OVERRIDES))
    main(["convert", "hlip", str(SOURCE), str(tmp_path / "out"), "--config", str(settings)])
    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(reference["study"]), reference["study_embeds"], rtol=0,
                                   atol=ATOL)


def test_incomplete_checkpoint_names_the_missing_tensors(tmp_path):
    folder = copied_source(tmp_path)
    weights = load_file(folder / "open_clip_model.safetensors")
    del weights["visual.trunk.blocks.3.attn.proj.weight"]
    save_file(weights, folder / "open_clip_model.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 tensors: visual\.trunk\.blocks\.3\.attn\.proj\.weight"):
        convert_hlip(folder, tmp_path / "out", OVERRIDES)


def test_checkpoint_of_another_shape_than_its_config_names_the_tensors(tmp_path):
    with pytest.raises(ValueError, match=r"visual\.trunk\.spatial_posemb: \(1, 2, 2, 2, 48\), expected "
                                         r"\(1, 4, 2, 2, 48\)"):
        convert_hlip(SOURCE, tmp_path / "out", {**OVERRIDES, "img_size": [8, 16, 16]})


def test_unknown_override_is_refused():
    with pytest.raises(ValueError, match="Unknown HLIP conversion overrides \\['width'\\]"):
        convert_hlip(SOURCE, "unused", {"width": 64})


def test_unknown_timm_model_needs_its_model_arguments(tmp_path):
    folder = copied_source(tmp_path)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["timm_model_name"] = "vit_large_somewhere"
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Unknown HLIP timm model 'vit_large_somewhere'"):
        convert_hlip(folder, tmp_path / "out", {"depth": 7})


def test_study_with_padded_scans_is_refused(converted, reference):
    _, model, _ = converted
    with pytest.raises(ValueError, match="no padding mask"):
        model.get_image_features(reference["study"], scan_mask=torch.tensor([[True, False]]))


@pytest.mark.parametrize("field, value", [("attention_levels", ["slice"] * 6 + ["row"]), ("hidden_size", 50),
                                          ("max_num_scans", -1), ("patch_size", [2, 8])])
def test_vision_config_names_the_bad_field(field, value):
    from voxlm.modeling import HLIPVisionConfig

    settings = dict(image_size=[4, 16, 16], patch_size=[2, 8, 8], hidden_size=48, num_attention_heads=2,
                    num_hidden_layers=7, attention_levels=["slice"] * 7)
    with pytest.raises(ValueError, match=f"`{field}`"):
        HLIPVisionConfig(**{**settings, field: value})
