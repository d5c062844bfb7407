"""A VoxLM on any vision tower: `vision_config` names the tower by `model_type`, the `mixer` projector (Med3DVLM's
dual-stream MLP-Mixer) reads two DCFormer stages, and such a model trains through `voxlm train align` and `finetune`
on the phantoms, saves, and reloads through the Auto classes and `trust_remote_code`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoProcessor

import voxlm  # noqa: F401
from voxlm.modeling import VoxLMConfig, VoxLMForConditionalGeneration
from voxlm.modeling.configuration_dcformer_siglip import DCFormerSiglipVisionConfig
from voxlm.modeling.modeling_dcformer_siglip import DCFormerSiglipVisionModel
from voxlm.modeling.modeling_voxlm import MixerProjector
from voxlm.training.assemble import build_voxlm

from tiny_models import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    SEG_TOKEN_ID,
    mllm_settings,
    remote_voxlm_outputs,
    run_mllm_stages,
    tiny_segvol_config,
    tiny_text_config,
    tiny_vision_config,
    tiny_voxlm_config,
)

# A 2-stage DCFormer over (8, 32, 32): stem (2, 8, 8) x 8, stage 1 (1, 4, 4) x 8 = 16 tokens, stage 2 (1, 2, 2) x 16.
TINY_DCFORMER = dict(model_type="dcformer_siglip_vision", image_size=[8, 32, 32], stem_channels=8,
                     stem_kernel_sizes=[3, 3], stage_channels=[8, 16], stage_depths=[1, 1], stage_kernel_sizes=[3, 3])
TINY_MIXER = dict(projector_type="mixer", mixer_num_tokens=[[6, 4], [4, 4]])
MODEL = ["pretrained.llm=tiny-llama", f"model.vision_config={json.dumps(TINY_DCFORMER)}", "model.projector_type=mixer",
         "model.mixer_num_tokens=[[6, 4], [4, 4]]"]


def tiny_mixer_config(**overrides) -> VoxLMConfig:
    return VoxLMConfig(**{**dict(vision_config=TINY_DCFORMER, text_config=tiny_text_config("qwen2"),
                                 image_token_id=IMAGE_TOKEN_ID, pad_token_id=PAD_TOKEN_ID, **TINY_MIXER), **overrides})


def test_dcformer_stage_shapes_are_the_hidden_states_it_gives():
    fields = {key: value for key, value in TINY_DCFORMER.items() if key != "model_type"}
    config = DCFormerSiglipVisionConfig(**{**fields, "image_size": [9, 30, 33]})  # odd sizes: the stages round up
    tower = DCFormerSiglipVisionModel(config).eval()
    with torch.no_grad():
        states = tower(torch.rand(1, 1, 9, 30, 33), output_hidden_states=True).hidden_states
    assert [tuple(state.shape[1:]) for state in states] == config.hidden_state_shapes
    assert DCFormerSiglipVisionConfig().hidden_state_shapes[-2:] == [(256, 384), (32, 768)]  # Med3DVLM's mixer input


def test_vision_config_names_any_tower_and_round_trips(tmp_path):
    config = tiny_mixer_config()
    assert isinstance(config.vision_config, DCFormerSiglipVisionConfig)
    assert config.num_image_tokens == 8 and config.mixer_stream_shapes == [(16, 8), (4, 16)]
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert {**reloaded.to_dict(), "_name_or_path": ""} == config.to_dict()
    assert isinstance(reloaded.vision_config, DCFormerSiglipVisionConfig)


def test_a_saved_voxvit_config_without_a_tower_type_loads_as_before():
    config = tiny_voxlm_config(seg=False).to_dict()
    config["vision_config"].pop("model_type")  # what a dict written by hand (or an older writer) holds
    assert VoxLMConfig.from_dict(config).vision_config.model_type == "voxvit"


@pytest.mark.parametrize("overrides, field", [
    (dict(projector_type="spp"), "projector_type"),
    (dict(pooled_image_token=True), "pooled_image_token"),
    (dict(seg_config=dict(hidden_size=32, num_attention_heads=4), seg_token_id=5), "head_type='voxseg'"),
    (dict(vision_feature_layers=[-2, -1, 0]), "mixer_num_tokens"),
    (dict(vision_feature_layers=[-2, 3]), "vision_feature_layers"),
    (dict(mixer_num_tokens=[[6, 4], [4]]), "mixer_num_tokens"),
    (dict(text_config=tiny_text_config("qwen2", hidden_size=33, num_attention_heads=3)), "hidden_size"),
])
def test_config_refuses_what_the_tower_cannot_feed(overrides, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[")):
        tiny_mixer_config(**overrides)


def test_mixer_needs_a_tower_that_gives_stage_shapes():
    with pytest.raises(ValueError, match="gives none"):
        tiny_voxlm_config(seg=False, **TINY_MIXER)


def test_mixer_model_forward_gradients_and_exact_reload(tmp_path):
    torch.manual_seed(0)
    model = VoxLMForConditionalGeneration(tiny_mixer_config())
    assert isinstance(model.vision_tower, DCFormerSiglipVisionModel)
    assert isinstance(model.multi_modal_projector, MixerProjector)
    input_ids = torch.tensor([[1, *[IMAGE_TOKEN_ID] * 8, 10, 11, 12]] * 2)
    pixel_values = torch.rand(2, 1, 8, 32, 32)
    output = model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids)
    assert output.logits.shape == (2, 12, 99) and output.image_hidden_states.shape == (2, 8, 32)
    output.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.multi_modal_projector.parameters())
    with pytest.raises(ValueError, match="8 features"):
        model(input_ids=input_ids[:, 2:], pixel_values=pixel_values)  # one placeholder short
    model.eval().save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids, pixel_values=pixel_values).logits,
                           model(input_ids=input_ids, pixel_values=pixel_values).logits)


def test_segvol_head_reads_the_volume_under_any_tower():
    """voxlm's own head decodes VoxViT patch tokens (refused above); SegVol runs its own ViT over the volume."""
    segvol = tiny_segvol_config(image_encoder_config=tiny_vision_config(num_hidden_layers=1, image_size=(8, 32, 32),
                                                                         patch_size=(2, 8, 8)).to_dict())
    torch.manual_seed(0)
    model = VoxLMForConditionalGeneration(tiny_mixer_config(seg_config=segvol, seg_token_id=SEG_TOKEN_ID))
    input_ids = torch.tensor([[1, *[IMAGE_TOKEN_ID] * 8, 10, SEG_TOKEN_ID, 12]] * 2)
    output = model(input_ids=input_ids, pixel_values=torch.rand(2, 1, 8, 32, 32), labels=input_ids,
                   seg_masks=(torch.rand(2, 1, 8, 32, 32) > 0.5).float())
    assert output.seg_logits.shape == (2, 1, 8, 32, 32) and torch.isfinite(output.seg_dice_loss)
    output.loss.backward()
    assert model.seg_head.prompt_projector[0].weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixer")
    aligned, tuned = run_mllm_stages(root, MODEL, num_cases=6, tasks="{vqa: 1.0}")
    return root, aligned, tuned


def test_align_trains_the_mixer_only_and_finetune_saves_a_model_that_answers(stages):
    _, aligned, tuned = stages
    align = mllm_settings(MODEL)
    before, _ = build_voxlm(align.pretrained, align.model, seed=0)
    after = AutoModel.from_pretrained(aligned)
    assert isinstance(after.vision_tower, DCFormerSiglipVisionModel)
    assert isinstance(after.multi_modal_projector, MixerProjector)
    # The tower's BatchNorm statistics are state too: a frozen tower must not update them either.
    changed = {name for name, p in after.state_dict().items() if not torch.equal(p, before.state_dict()[name])}
    assert any(name.startswith("multi_modal_projector") for name in changed)
    allowed = ("multi_modal_projector", "language_model.model.embed_tokens", "language_model.lm_head")
    assert all(name.startswith(allowed) for name in changed), changed
    model = AutoModel.from_pretrained(tuned / "model").eval()
    processor = AutoProcessor.from_pretrained(tuned / "model")
    inputs = processor(images=[torch.rand(16, 32, 32) * 80], text=["Is there a bleed?"])
    assert inputs["pixel_values"].shape[-3:] == (8, 32, 32)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 8
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_finetuned_mixer_model_loads_without_voxlm_through_remote_code(stages, tmp_path):
    _, _, tuned = stages
    folder = tuned / "model"
    volume = tmp_path / "volume.npy"
    np.save(volume, (torch.rand(16, 32, 32) * 1100 - 1000).numpy())  # Hounsfield units
    remote = remote_voxlm_outputs(folder, "Is there a bleed?", volume, tmp_path)
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model.generate(input_ids=remote["input_ids.0"], pixel_values=remote["pixel_values.0"],
                                  max_new_tokens=8, do_sample=False)
    assert torch.equal(remote["generated.0"], expected)


def test_a_converted_dcformer_siglip_image_tower_starts_a_mixer_voxlm(tmp_path):
    """`pretrained.vision=` a converted DCFormer-SigLIP folder: its image tower, weights included, under the mixer."""
    from voxlm.conversion import convert_dcformer_siglip
    from voxlm.training.assemble import PretrainedParts

    source = Path(__file__).parent / "dcformer_siglip" / "dcformer_siglip"
    folder = convert_dcformer_siglip(source, tmp_path / "dcformer-siglip", {"text_config": {"n_heads": 4}})
    model, processor = build_voxlm(PretrainedParts(llm="tiny-llama", vision=str(folder)),
                                   {"projector_type": "mixer", "mixer_num_tokens": [[4, 3], [2, 3]]})
    tower = AutoModel.from_pretrained(folder).vision_model
    assert all(torch.equal(value, tower.state_dict()[key]) for key, value in model.vision_tower.state_dict().items())
    inputs = processor(images=[torch.rand(16, 32, 96) * 1100 - 1000], text=["Is there a bleed?"])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 6
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape
