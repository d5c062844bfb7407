"""COLIPRI -> ColipriModel: a tiny COLIPRI release that colipri 0.1.3's own code made (`tests/colipri/make_colipri.py`,
which also wrote colipri's outputs for it) converts into a folder whose image (pooled and dense) and text embeddings
are colipri's."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor

from voxlm.conversion import convert_colipri
from voxlm.modeling import ColipriModel, ColipriVisionModel
from voxlm.modeling.convert_colipri import COLIPRI_DEFAULTS, colipri_config, convert_colipri_state_dict
from voxlm.processing import VoxCLIPProcessor

FIXTURES = Path(__file__).parent / "colipri"
SOURCE = FIXTURES / "colipri"
REFERENCE = FIXTURES / "reference.safetensors"
OVERRIDES = json.loads((SOURCE / "overrides.json").read_text())  # the tiny sizes, in colipri's own field names
USER_SCRIPT = Path(__file__).parent / "remote_code_user.py"
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(REFERENCE)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`(folder, model, processor)`: the fixture release converted, then loaded with the Auto classes."""
    folder = convert_colipri(SOURCE, tmp_path_factory.mktemp("colipri") / "colipri-tiny", OVERRIDES)
    return folder, AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def copied_source(tmp_path: Path) -> Path:
    folder = tmp_path / "colipri"
    shutil.copytree(SOURCE, folder)
    return folder


def test_reference_was_made_by_colipri_0_1_3():
    with safe_open(REFERENCE, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["colipri"] == "0.1.3" and metadata["made_by"] == "tests/colipri/make_colipri.py"


def test_folder_loads_with_the_auto_classes_and_its_card_names_the_licence(converted):
    folder, model, processor = converted
    assert isinstance(model, ColipriModel) and isinstance(processor, VoxCLIPProcessor)
    vision = model.config.vision_config
    assert vision.image_size == [16, 16, 16] and vision.patch_size == [4, 4, 4] and vision.embed_dim == 48
    assert vision.intermediate_size == 128 and model.config.projection_dim == 32
    assert processor.max_length == 512 and list(processor.image_processor.image_size) == [16, 16, 16]
    assert model.logit_scale.item() == 0.0  # softmax_temperature 1
    card = (folder / "README.md").read_text()
    assert "license: mit" in card and str(SOURCE) in card


def test_embeddings_are_colipris(converted, reference):
    _, model, _ = converted
    with torch.no_grad():
        image_embeds = model.get_image_features(reference["pixel_values"])  # (B, P)
        dense = model.get_dense_image_features(reference["pixel_values"])  # (B, P, D', H', W')
        text_embeds = model.get_text_features(reference["input_ids"], reference["attention_mask"])
        tokens = model.vision_model(reference["pixel_values"]).last_hidden_state  # (B, N, E)
        output = model(pixel_values=reference["pixel_values"], input_ids=reference["input_ids"],
                       attention_mask=reference["attention_mask"])
    torch.testing.assert_close(image_embeds, reference["image_embeds"], atol=ATOL, rtol=0)
    torch.testing.assert_close(dense, reference["dense_image_embeds"], atol=ATOL, rtol=0)
    torch.testing.assert_close(text_embeds, reference["text_embeds"], atol=ATOL, rtol=0)
    # colipri's backbone returns (B, E, D', H', W'); the tokens are its raster order.
    torch.testing.assert_close(tokens.transpose(1, 2).reshape(reference["backbone_features"].shape),
                               reference["backbone_features"], atol=ATOL, rtol=0)
    torch.testing.assert_close(output.logits_per_image.softmax(-1), reference["probabilities"], atol=ATOL, rtol=0)


def test_processor_tokens_are_colipris(converted, reference):
    _, _, processor = converted
    with safe_open(REFERENCE, "pt") as handle:
        reports = json.loads(handle.metadata()["reports"])
    inputs = processor(text=reports)  # padded to the longest report, where colipri pads to 512
    length = inputs["input_ids"].shape[1]
    assert torch.equal(inputs["input_ids"], reference["input_ids"][:, :length])
    assert reference["attention_mask"][:, length:].sum() == 0


def test_save_load_round_trip_and_the_vision_model_alone(converted, tmp_path, reference):
    _, model, _ = converted
    model.save_pretrained(tmp_path / "again")
    reloaded = ColipriModel.from_pretrained(tmp_path / "again")
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    model.vision_model.save_pretrained(tmp_path / "vision")
    vision = AutoModel.from_pretrained(tmp_path / "vision").eval()
    assert isinstance(vision, ColipriVisionModel)
    with torch.no_grad():
        torch.testing.assert_close(vision(reference["pixel_values"]).pooler_output,
                                   model.vision_model(reference["pixel_values"]).pooler_output, atol=0, rtol=0)


def test_folder_without_voxlm_gives_the_same_embeddings(converted, tmp_path):
    import nibabel as nib

    folder, model, processor = converted
    volume = tmp_path / "ct.nii.gz"
    hounsfield = np.random.default_rng(0).uniform(-1000, 1000, (20, 18, 22)).astype(np.float32)
    nib.save(nib.Nifti1Image(hounsfield, np.diag([2.0, 2.0, 2.0, 1.0])), volume)
    report = "Small nodule in the right upper lobe."
    output = tmp_path / "remote.safetensors"
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": "",
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, str(USER_SCRIPT), "voxclip", str(folder), str(output), report, str(volume)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    remote = load_file(output)
    with safe_open(output, "pt") as handle:
        classes = json.loads(handle.metadata()["texts"])["classes"]
    assert [name.rsplit(".", 1)[1] for name in classes] == ["VoxCLIPProcessor", "VoxVolumeProcessor", "ColipriModel"]
    pixel_values = processor(images=str(volume))["pixel_values"]
    tokens = processor(text=[report])
    with torch.no_grad():
        torch.testing.assert_close(remote["pixel_values.0"], pixel_values, atol=0, rtol=0)
        torch.testing.assert_close(remote["image_embeds.0"], model.get_image_features(pixel_values))
        torch.testing.assert_close(remote["text_embeds"], model.get_text_features(**tokens))


def test_command_line_converts_with_a_config_file(tmp_path):
    from voxlm.cli import main

    main(["convert", "colipri", str(SOURCE), str(tmp_path / "out"), "--config", str(SOURCE / "overrides.json")])
    assert isinstance(AutoModel.from_pretrained(tmp_path / "out"), ColipriModel)


def test_only_the_mask_token_is_skipped():
    _, skipped = convert_colipri_state_dict(load_file(SOURCE / "model.safetensors"))
    assert skipped == ["image_encoder.backbone.mask_token"]


def test_incomplete_checkpoint_names_the_missing_tensors(tmp_path):
    source = copied_source(tmp_path)
    weights = load_file(source / "model.safetensors")
    del weights["image_encoder.backbone.eva.blocks.1.gamma_2"], weights["text_encoder.pooler.attn.in_proj_bias"]
    save_file(weights, source / "model.safetensors")
    with pytest.raises(ValueError, match="missing 2 tensors") as error:
        convert_colipri(source, tmp_path / "out", OVERRIDES)
    assert "image_encoder.backbone.eva.blocks.1.gamma_2" in str(error.value)
    assert "text_encoder.pooler.attn.in_proj_bias" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_shape_than_its_config_names_the_tensors(tmp_path):
    with pytest.raises(ValueError, match=r"image_encoder\.projector\.weight: \(32, 48, 1, 1, 1\), expected "
                                         r"\(64, 48, 1, 1, 1\)"):
        convert_colipri(SOURCE, tmp_path / "out", {**OVERRIDES, "projection_dim": 64,
                                                   "text_config": {"num_attention_heads": 2, "hidden_size": 64}})


@pytest.mark.parametrize("overrides, message", [
    ({"image_size": 16}, "Unknown COLIPRI conversion overrides"),
    ({"model.image_encoder.backbone.use_abs_pos_embed": True}, "use_abs_pos_embed"),
    ({}, "num_attention_heads"),  # a 32-wide BERT: no 64-wide heads, and no weight holds the count
])
def test_bad_overrides_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        convert_colipri(SOURCE, "unused", overrides)


def test_released_defaults_give_colipris_released_sizes():
    """What a CXR-BERT (BERT-base shapes) and no overrides give: Primus-M at 192^3 with 8^3 patches, 768-wide
    embeddings (colipri 0.1.3's configs/), BERT's 12 heads."""
    shapes = {"embeddings.word_embeddings.weight": (30522, 768), "embeddings.position_embeddings.weight": (512, 768),
              "embeddings.token_type_embeddings.weight": (2, 768),
              **{f"encoder.layer.{i}.intermediate.dense.weight": (3072, 768) for i in range(12)}}
    weights = {f"text_encoder.backbone.{key}": torch.empty(shape, device="meta") for key, shape in shapes.items()}
    config = colipri_config(weights)
    vision = config.vision_config
    assert (vision.image_size, vision.patch_size, vision.grid_size) == ([192] * 3, [8] * 3, [24] * 3)
    assert (vision.embed_dim, vision.num_hidden_layers, vision.num_attention_heads) == (864, 16, 12)
    assert (vision.intermediate_size, vision.hidden_size, vision.pooler_num_heads) == (2304, 768, 12)
    assert config.text_config.num_attention_heads == 12 and config.text_pooler_num_heads == 12
    assert COLIPRI_DEFAULTS["model.image_encoder.backbone.init_values"] == vision.layer_scale_init_value == 0.1


def test_a_hub_id_is_downloaded_with_only_the_weights_and_tokenizer_files(monkeypatch, tmp_path):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kwargs: asked.append((repo_id, kwargs["allow_patterns"])) or str(SOURCE))
    convert_colipri("microsoft/colipri", tmp_path / "out", OVERRIDES)
    assert asked[0][0] == "microsoft/colipri" and "model.safetensors" in asked[0][1]
    assert "base_model: microsoft/colipri" in (tmp_path / "out" / "README.md").read_text()


def test_every_parameter_gets_a_gradient(reference, tmp_path):
    model = convert_colipri(SOURCE, tmp_path / "out", OVERRIDES)
    model = ColipriModel.from_pretrained(model).train()
    output = model(pixel_values=reference["pixel_values"], input_ids=reference["input_ids"][:2, :16],
                   attention_mask=reference["attention_mask"][:2, :16])
    labels = torch.arange(2)
    loss = torch.nn.functional.cross_entropy(output.logits_per_image, labels)
    loss = loss + model.get_dense_image_features(reference["pixel_values"]).square().mean()
    loss.backward()
    # A shift of every logit by `logit_bias` leaves the softmax unchanged: its gradient is zero up to rounding.
    parameters = dict(model.named_parameters())
    assert float(parameters.pop("logit_bias").grad.abs()) < 1e-6
    without = [name for name, p in parameters.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without == [], without
