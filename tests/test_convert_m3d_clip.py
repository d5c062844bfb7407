"""M3D-CLIP -> VoxCLIP: a tiny M3D-CLIP release that M3D's own code made (`tests/m3d_lamed/make_m3d_clip.py`, which
also wrote M3D's outputs for it) converts into a VoxCLIP folder whose embeddings, logits and loss are M3D's."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor

from voxlm.modeling import VoxCLIPModel
from voxlm.conversion import convert_m3d_clip
from voxlm.modeling.convert_m3d_clip import M3D_COMMIT, bert_config_from_weights, convert_m3d_clip_state_dict
from voxlm.processing import VoxCLIPProcessor

FIXTURES = Path(__file__).parent / "m3d_lamed"
SOURCE = FIXTURES / "m3d_clip"
REFERENCE = FIXTURES / "m3d_clip_reference.safetensors"
OVERRIDES = {"text_config": {"num_attention_heads": 4}}  # the tiny BERT is 32 wide: no 64-wide BERT heads
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(REFERENCE)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`(folder, model, processor)`: the fixture release converted, then loaded with the Auto classes (importing
    any `voxlm` module registers them)."""
    folder = convert_m3d_clip(SOURCE, tmp_path_factory.mktemp("voxclip") / "m3d-clip", OVERRIDES)
    return folder, AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def copied_source(tmp_path: Path) -> Path:
    folder = tmp_path / "m3d_clip"
    shutil.copytree(SOURCE, folder)
    return folder


def test_reference_was_made_by_the_m3d_commit_the_converter_names():
    with safe_open(REFERENCE, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["BAAI-DCAI/M3D"] == M3D_COMMIT
    assert metadata["made_by"] == "tests/m3d_lamed/make_m3d_clip.py"


def test_folder_loads_with_the_auto_classes_and_its_card_names_the_source(converted):
    folder, model, processor = converted
    assert isinstance(model, VoxCLIPModel) and isinstance(processor, VoxCLIPProcessor)
    config = model.config
    assert config.projection_bias and config.projection_dim == 32 and config.text_pooling == "cls"
    assert config.vision_config.pooling == "cls" and config.vision_config.image_size == [8, 16, 16]
    assert config.text_config.model_type == "bert" and config.text_config.num_attention_heads == 4
    assert processor.max_length == 512 and processor.image_processor.image_size == [8, 16, 16]
    card = (folder / "README.md").read_text()
    assert "license: other" in card and str(SOURCE) in card and "base_model" not in card  # a local source


def test_embeddings_are_m3d_clips_encode_cls_rows(converted, reference):
    _, model, _ = converted
    with torch.no_grad():
        image_embeds = F.normalize(model.get_image_features(reference["pixel_values"]), dim=-1)  # (B, P)
        text_embeds = F.normalize(model.get_text_features(reference["input_ids"], reference["attention_mask"]), dim=-1)
    torch.testing.assert_close(image_embeds, reference["image_embeds"], atol=ATOL, rtol=0)
    torch.testing.assert_close(text_embeds, reference["text_embeds"], atol=ATOL, rtol=0)


def test_every_token_is_m3d_clips_encode_output(converted, reference):
    _, model, _ = converted
    with torch.no_grad():
        image_tokens = model.vision_model(reference["pixel_values"]).last_hidden_state  # (B, 1 + N, E)
        text_tokens = model.encode_text(reference["input_ids"], reference["attention_mask"])  # (B, 512, E)
        image_features = F.normalize(model.visual_projection(image_tokens), dim=-1)
        text_features = F.normalize(model.text_projection(text_tokens), dim=-1)
    torch.testing.assert_close(image_features, reference["image_features"], atol=ATOL, rtol=0)
    torch.testing.assert_close(text_features, reference["text_features"], atol=ATOL, rtol=0)


def test_processor_tokens_give_m3ds_text_embeddings(converted, reference):
    _, model, processor = converted
    with safe_open(REFERENCE, "pt") as handle:
        reports = json.loads(handle.metadata()["reports"])
    inputs = processor(text=reports)  # padded to the longest report, where M3D pads to 512
    length = inputs["input_ids"].shape[1]
    assert torch.equal(inputs["input_ids"], reference["input_ids"][:, :length])
    assert reference["attention_mask"][:, length:].sum() == 0
    with torch.no_grad():
        text_embeds = F.normalize(model.get_text_features(**inputs), dim=-1)
    torch.testing.assert_close(text_embeds, reference["text_embeds"], atol=ATOL, rtol=0)


def test_logit_scale_logits_and_loss_are_m3d_clips(converted, reference):
    _, model, _ = converted
    m3d_scale = load_file(SOURCE / "model.safetensors")["logit_scale"]
    torch.testing.assert_close(model.logit_scale.exp(), m3d_scale, atol=1e-6, rtol=0)
    with torch.no_grad():
        output = model(input_ids=reference["input_ids"], attention_mask=reference["attention_mask"],
                       pixel_values=reference["pixel_values"], return_loss=True)
    # M3DCLIP.forward returns the mean of its image->text and text->image logits.
    torch.testing.assert_close((output.logits_per_image + output.logits_per_text) / 2, reference["logits"],
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(output.contrastive_loss, reference["loss"], atol=ATOL, rtol=0)


def test_only_tensors_without_a_counterpart_are_skipped_and_reported(tmp_path, caplog):
    converted_weights, skipped = convert_m3d_clip_state_dict(load_file(SOURCE / "model.safetensors"))
    assert sorted(skipped) == [
        "language_encoder.pooler.dense.bias", "language_encoder.pooler.dense.weight",  # M3D embeds BERT's CLS state
        *(f"vision_encoder.blocks.{i}.norm_cross_attn.{p}" for i in (0, 1) for p in ("bias", "weight")),  # MONAI's
    ]
    with caplog.at_level(logging.INFO, logger="voxlm.conversion.m3d"):
        convert_m3d_clip(SOURCE, tmp_path / "out", OVERRIDES)
    assert "language_encoder.pooler.dense.weight" in caplog.text


def test_pickle_free_bin_weights_convert_like_safetensors(tmp_path, converted):
    source = copied_source(tmp_path)
    torch.save(load_file(source / "model.safetensors"), source / "model_params.bin")  # train_CLIP.py's torch.save
    (source / "model.safetensors").unlink()
    model = VoxCLIPModel.from_pretrained(convert_m3d_clip(source, tmp_path / "out", OVERRIDES))
    for key, value in converted[1].state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_incomplete_checkpoint_names_the_missing_tensors(tmp_path):
    source = copied_source(tmp_path)
    weights = load_file(source / "model.safetensors")
    del weights["vision_encoder.blocks.1.attn.qkv.weight"], weights["mm_language_proj.bias"]
    save_file(weights, source / "model.safetensors")
    with pytest.raises(ValueError, match="missing 2 tensors") as error:
        convert_m3d_clip(source, tmp_path / "out", OVERRIDES)
    assert "vision_encoder.blocks.1.attn.qkv.weight" in str(error.value)
    assert "mm_language_proj.bias" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_shape_than_its_config_names_the_tensors(tmp_path):
    source = copied_source(tmp_path)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "mlp_dim": 48}))
    with pytest.raises(ValueError, match=r"vision_encoder\.blocks\.0\.mlp\.linear1\.weight: \(64, 32\), expected "
                                         r"\(48, 32\)"):
        convert_m3d_clip(source, tmp_path / "out", OVERRIDES)


def test_bert_head_count_that_no_weight_holds_must_be_given():
    with pytest.raises(ValueError, match="num_attention_heads"):
        convert_m3d_clip(SOURCE, "unused")


def test_bert_base_sizes_are_read_from_weight_shapes():
    shapes = {"embeddings.word_embeddings.weight": (30522, 768), "embeddings.position_embeddings.weight": (512, 768),
              "embeddings.token_type_embeddings.weight": (2, 768),
              **{f"encoder.layer.{i}.intermediate.dense.weight": (3072, 768) for i in range(12)}}
    weights = {f"language_encoder.{key}": torch.empty(shape, device="meta") for key, shape in shapes.items()}
    assert bert_config_from_weights(weights) == dict(
        model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "bert"}, "not 'm3d_clip'"),
    ({"pos_embed": "sincos"}, "pos_embed"),
])
def test_config_that_is_not_a_convertible_m3d_clip_is_refused(tmp_path, change, message):
    source = copied_source(tmp_path)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        convert_m3d_clip(source, tmp_path / "out", OVERRIDES)


def test_unknown_override_is_refused():
    with pytest.raises(ValueError, match="projection_dim"):
        convert_m3d_clip(SOURCE, "unused", {"projection_dim": 64})


def test_a_hub_id_is_downloaded_and_converted_from_the_command_line(monkeypatch, tmp_path):
    import huggingface_hub

    from voxlm.cli import main

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kwargs: asked.append(repo_id) or str(SOURCE))
    settings = tmp_path / "overrides.json"
    settings.write_text(json.dumps(OVERRIDES))
    main(["convert", "m3d-clip", "GoodBaiBai88/M3D-CLIP", str(tmp_path / "out"), "--config", str(settings)])
    assert asked == ["GoodBaiBai88/M3D-CLIP"]
    assert "base_model: GoodBaiBai88/M3D-CLIP" in (tmp_path / "out" / "README.md").read_text()
    assert isinstance(AutoModel.from_pretrained(tmp_path / "out"), VoxCLIPModel)
    with pytest.raises(SystemExit, match="exists and is not empty"):
        main(["convert", "m3d-clip", str(SOURCE), str(tmp_path / "out")])
