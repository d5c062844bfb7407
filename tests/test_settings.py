"""Stage settings: every shipped YAML builds the model config its `model` section names (one source of truth per
field), and a `model` section that names a field twice, or a field that is not the config's, fails at load."""

from pathlib import Path

import pytest
import yaml

from voxlm.modeling import VoxSegConfig, VoxViTConfig
from voxlm.training import train_clip
from voxlm.training.assemble import PretrainedParts, build_voxlm
from voxlm.training.mllm import MLLMSettings, load_model
from voxlm.training.settings import load_settings

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
STAGE_CONFIGS = sorted(path.name for path in CONFIGS.glob("*.yaml"))


def shipped(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def assert_config_holds(config, section: dict) -> None:
    """Every key of a YAML `model` section has that value in the built config; sub-configs compare whole."""
    sub_configs = {"vision_config": VoxViTConfig, "seg_config": VoxSegConfig}
    for key, value in section.items():
        built = getattr(config, key)
        if key in sub_configs:
            expected = sub_configs[key](**value).to_dict()
            assert {k: v for k, v in built.to_dict().items() if k != "transformers_version"} == {
                k: v for k, v in expected.items() if k != "transformers_version"}, key
        else:
            assert built == value, (key, built, value)


def test_every_shipped_stage_config_is_tested_here():
    assert STAGE_CONFIGS == ["align_phantoms.yaml", "clip_phantoms.yaml", "finetune_7b_24gb.yaml",
                             "finetune_phantoms.yaml"]


def test_clip_config_builds_the_voxclip_its_model_section_names():
    section = shipped("clip_phantoms.yaml")["model"]
    settings = load_settings(train_clip.ClipSettings, CONFIGS / "clip_phantoms.yaml")
    model, processor, _ = train_clip.build_clip(settings.pretrained, settings.model, settings.processor)
    assert_config_holds(model.config, section)
    assert processor.image_size == section["vision_config"]["image_size"] and processor.ct_window == "brain"
    # text_trainable_layers: 0 locks the packaged MiniLM; only the projection trains on the text side.
    assert not any(parameter.requires_grad for parameter in model.text_model.parameters())


def test_align_config_builds_the_voxlm_its_model_section_names(tmp_path, minilm_dir):
    from tiny_models import save_demo_voxclip

    save_demo_voxclip(tmp_path / "clip", minilm_dir)
    section = shipped("align_phantoms.yaml")["model"]
    settings = load_settings(MLLMSettings, CONFIGS / "align_phantoms.yaml",
                             {"pretrained.vision": str(tmp_path / "clip")})
    model, processor = build_voxlm(settings.pretrained, settings.model, settings.processor)
    assert_config_holds(model.config, section)
    # The encoder (and so vision_config) is the pretrained VoxCLIP's; the LLM's config is the random tiny Llama's.
    clip_vision = VoxViTConfig.from_pretrained(tmp_path / "clip")
    assert model.config.vision_config.hidden_size == clip_vision.hidden_size
    assert list(processor.image_processor.image_size) == list(clip_vision.image_size)
    assert model.config.text_config.hidden_size == 64


@pytest.mark.parametrize("name", ["finetune_phantoms.yaml", "finetune_7b_24gb.yaml"])
def test_finetune_configs_take_their_model_from_init_from(name):
    """A fine-tuning config names no model field: the model is the align stage's output, whole."""
    values = shipped(name)
    assert not {"pretrained", "model", "processor"} & set(values)
    settings = load_settings(MLLMSettings, CONFIGS / name, {"init_from": "runs/align/final"})
    assert settings.model == {} and settings.pretrained == PretrainedParts()


def test_init_from_with_a_model_section_is_refused():
    settings = load_settings(MLLMSettings, CONFIGS / "finetune_phantoms.yaml", {"model.pooling_size": "[1, 2, 2]"})
    with pytest.raises(ValueError, match="init_from=.* loads a saved VoxLM.*not both"):
        load_model(settings)


def test_image_size_at_the_top_of_the_model_section_names_its_place():
    """The old `ModelSettings(image_size=..., vision_config={"image_size": ...})` ended in a bare TypeError."""
    model = {"image_size": [16, 64, 64], "vision_config": {"image_size": [16, 64, 64]}}
    message = r"model\.image_size is not a {} field.*model\.vision_config\.image_size"
    with pytest.raises(ValueError, match=message.format("VoxLMConfig")):
        build_voxlm(PretrainedParts(llm="tiny-llama"), model)
    with pytest.raises(ValueError, match=message.format("VoxCLIPConfig")):
        train_clip.build_clip(train_clip.ClipPretrainedParts(), model)


def test_a_field_set_by_a_pretrained_part_or_the_tokenizer_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"model\.vision_config is set by pretrained\.vision='runs/clip'"):
        build_voxlm(PretrainedParts(llm="tiny-llama", vision="runs/clip"), {"vision_config": {"hidden_size": 32}})
    with pytest.raises(ValueError, match=r"model\.seg_token_id is set by the tokenizer"):
        build_voxlm(PretrainedParts(llm="tiny-llama"), {"seg_token_id": 5})
    with pytest.raises(ValueError, match=r"model\.text_config is set by pretrained\.text="):
        train_clip.build_clip(train_clip.ClipPretrainedParts(), {"text_config": {"model_type": "bert"}})
    with pytest.raises(ValueError, match=r"model\.colour is not a VoxCLIPConfig field \(fields: \["):
        train_clip.build_clip(train_clip.ClipPretrainedParts(), {"colour": "red"})
