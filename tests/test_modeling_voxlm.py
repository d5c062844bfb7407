"""VoxLM: loss and gradients, id-based image tokens, generation (cache, left padding), segmentation, save/load,
remote code without voxlm, config validation, and M3D's linear projector converted (the whole LaMed: test_m3d_lamed.py)."""

import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import (
    BOS_TOKEN_ID,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    SEG_TOKEN_ID,
    VOCAB_SIZE,
    tiny_text_config,
    tiny_vision_config,
    tiny_voxlm_config,
)
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    PretrainedConfig,
)

from voxlm.modeling import VoxLMConfig, VoxLMForConditionalGeneration
from voxlm.modeling.convert_m3d import convert_m3d_lamed_state_dict
from voxlm.modeling.losses import label_positions


def make_model(kind="llama", seed=0, **overrides) -> VoxLMForConditionalGeneration:
    torch.manual_seed(seed)
    return VoxLMForConditionalGeneration(tiny_voxlm_config(kind, **overrides))


def make_prompt(model, text_ids, batch_size=1) -> torch.LongTensor:
    """BOS, the image placeholders, then text: the layout VoxLMProcessor builds."""
    images = torch.full((batch_size, model.config.num_image_tokens), IMAGE_TOKEN_ID)
    bos = torch.full((batch_size, 1), BOS_TOKEN_ID)
    return torch.cat([bos, images, torch.as_tensor(text_ids).expand(batch_size, -1)], dim=1)


@pytest.mark.parametrize("kind", ["llama", "phi3", "qwen2"])
def test_loss_is_finite_and_gradients_reach_every_part(kind):
    model = make_model(kind)
    input_ids = make_prompt(model, torch.randint(10, VOCAB_SIZE, (2, 6)), batch_size=2)
    output = model(input_ids=input_ids, pixel_values=torch.rand(2, 1, 8, 16, 16), labels=input_ids.clone())
    assert torch.isfinite(output.loss) and output.logits.shape == (2, input_ids.shape[1], VOCAB_SIZE)
    output.loss.backward()
    for part in ("vision_tower", "multi_modal_projector", "language_model"):
        grads = [p.grad for name, p in model.named_parameters() if name.startswith(part) and p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), part


def test_labels_on_image_positions_are_ignored():
    model = make_model()
    input_ids = make_prompt(model, torch.randint(10, VOCAB_SIZE, (1, 6)))
    pixel_values = torch.rand(1, 1, 8, 16, 16)
    labels = input_ids.clone()
    masked = labels.masked_fill(input_ids == IMAGE_TOKEN_ID, -100)
    loss = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss
    torch.testing.assert_close(loss, model(input_ids=input_ids, pixel_values=pixel_values, labels=masked).loss)


def test_logits_only_at_label_positions_give_the_same_loss_and_gradients():
    """Training computes logits only where an answer token is predicted (`label_positions`); the loss and every
    gradient must equal those of the full-sequence logits."""
    model = make_model()
    input_ids = make_prompt(model, torch.randint(10, VOCAB_SIZE, (2, 8)), batch_size=2)
    labels = torch.full_like(input_ids, -100)
    labels[0, -3:], labels[1, -5:-2] = input_ids[0, -3:], input_ids[1, -5:-2]  # answers at different positions
    pixel_values = torch.rand(2, 1, 8, 16, 16)
    positions = label_positions(labels)
    assert positions.tolist() == list(range(input_ids.shape[1] - 6, input_ids.shape[1] - 1))

    def loss_and_grads(**kwargs):
        model.zero_grad()
        output = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels, **kwargs)
        output.loss.backward()
        return output, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    full, full_grads = loss_and_grads()
    kept, kept_grads = loss_and_grads(logits_to_keep=positions)
    assert kept.logits.shape == (2, len(positions), VOCAB_SIZE)
    torch.testing.assert_close(kept.loss, full.loss)
    assert kept_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(kept_grads[name], full_grads[name], msg=name)


def test_image_features_go_where_the_image_tokens_are_wherever_they_are():
    """Matching by id: moving the placeholders moves the image, unlike M3D's splice after BOS."""
    model = make_model().eval()
    pixel_values = torch.rand(1, 1, 8, 16, 16)
    text = torch.randint(10, VOCAB_SIZE, (1, 4))
    n = model.config.num_image_tokens
    late = torch.cat([torch.tensor([[BOS_TOKEN_ID]]), text, torch.full((1, n), IMAGE_TOKEN_ID)], dim=1)
    embeds, _, image_features = model.embed_inputs(late, pixel_values)
    torch.testing.assert_close(embeds[:, 5:], image_features)
    torch.testing.assert_close(embeds[:, :5], model.get_input_embeddings()(late[:, :5]))


def test_mismatched_image_token_count_raises_with_both_numbers():
    model = make_model()
    input_ids = make_prompt(model, torch.randint(10, VOCAB_SIZE, (1, 4)))[:, 2:]  # one placeholder too few
    with pytest.raises(ValueError, match=r"gives 8 features.*\[7\]"):
        model(input_ids=input_ids, pixel_values=torch.rand(1, 1, 8, 16, 16))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_generation_same_with_and_without_cache(kind):
    model = make_model(kind).eval()
    input_ids = make_prompt(model, torch.randint(10, VOCAB_SIZE, (2, 5)), batch_size=2)
    pixel_values = torch.rand(2, 1, 8, 16, 16)
    settings = dict(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=8, do_sample=False)
    cached = model.generate(**settings, use_cache=True)
    uncached = model.generate(**settings, use_cache=False)
    assert cached.shape[1] > input_ids.shape[1]
    assert torch.equal(cached, uncached)


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = make_model().eval()
    prompts = [make_prompt(model, torch.randint(10, VOCAB_SIZE, (1, length)))[0] for length in (3, 7)]
    pixel_values = torch.rand(2, 1, 8, 16, 16)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((2, width), PAD_TOKEN_ID)
    attention_mask = torch.zeros(2, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = prompt
        attention_mask[row, width - len(prompt) :] = 1
    settings = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    batched = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **settings)
    for row, prompt in enumerate(prompts):
        alone = model.generate(input_ids=prompt[None], pixel_values=pixel_values[row : row + 1], **settings)
        assert torch.equal(batched[row, width:], alone[0, len(prompt) :]), row


def test_segmentation_losses_and_masks_at_input_resolution():
    model = make_model()
    text = torch.randint(10, VOCAB_SIZE, (2, 5))
    text[0, 2] = SEG_TOKEN_ID
    text[1, 1] = text[1, 3] = SEG_TOKEN_ID
    input_ids = make_prompt(model, text, batch_size=2)
    seg_masks = (torch.rand(2, 1, 8, 16, 16) > 0.7).float()
    output = model(
        input_ids=input_ids,
        pixel_values=torch.rand(2, 1, 8, 16, 16),
        labels=input_ids.clone(),
        seg_masks=seg_masks,
        has_mask=torch.tensor([True, False]),
    )
    assert output.seg_logits.shape == (1, 1, 8, 16, 16) and output.seg_sample_indices.tolist() == [0]
    expected = output.lm_loss + output.seg_dice_loss + output.seg_bce_loss
    torch.testing.assert_close(output.loss, expected)
    output.loss.backward()
    assert model.seg_head.hypernetwork[0].weight.grad.abs().sum() > 0


def seg_batch(model) -> dict:
    """Two prompts whose answers hold `[SEG]`, with volumes, labels and target masks."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(10, VOCAB_SIZE, (2, 5), generator=generator)
    text[:, 2] = SEG_TOKEN_ID
    input_ids = make_prompt(model, text, batch_size=2)
    return dict(input_ids=input_ids, pixel_values=torch.rand(2, 1, 8, 16, 16, generator=generator),
                labels=input_ids.clone(), seg_masks=(torch.rand(2, 1, 8, 16, 16, generator=generator) > 0.7).float())


def test_eager_and_sdpa_attention_give_the_same_outputs():
    model = make_model().eval()
    with torch.no_grad():
        sdpa = model(**seg_batch(model))
        model.set_attn_implementation("eager")
        parts = (model, model.vision_tower, model.language_model)
        assert [part.config._attn_implementation for part in parts] == ["eager"] * 3
        eager = model(**seg_batch(model))
    for name in ("loss", "lm_loss", "seg_dice_loss", "seg_bce_loss", "logits", "seg_logits"):
        torch.testing.assert_close(getattr(eager, name), getattr(sdpa, name), atol=1e-5, rtol=1e-5, msg=name)


def test_from_pretrained_attention_implementation_reaches_every_part(tmp_path, monkeypatch):
    from voxlm.modeling import modeling_voxlm, modeling_voxvit

    make_model().save_pretrained(tmp_path)
    model = VoxLMForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    calls = {}
    for module in (modeling_voxlm, modeling_voxvit):  # the seg head's and the vision tower's eager attention
        def spy(*args, _eager=module.eager_attention_forward, _name=module.__name__, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _eager(*args, **kwargs)
        monkeypatch.setattr(module, "eager_attention_forward", spy)
    with torch.no_grad():
        model(**seg_batch(model))
    # seg head: 3 attentions in each of its 2 two-way layers, then the final one; vision tower: 2 blocks
    assert calls == {modeling_voxlm.__name__: 7, modeling_voxvit.__name__: 2}
    assert model.language_model.config._attn_implementation == "eager"
    # A dict gives the LLM its own kernel and leaves the vision tower and the seg head on theirs.
    mixed = VoxLMForConditionalGeneration.from_pretrained(tmp_path, attn_implementation={"text_config": "eager"})
    parts = (mixed, mixed.vision_tower, mixed.language_model)
    assert [part.config._attn_implementation for part in parts] == ["sdpa", "sdpa", "eager"]
    with pytest.raises(ValueError, match="does not support"):
        VoxLMForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="flex_attention")


@pytest.mark.parametrize("seg", [True, False], ids=["seg-head", "no-seg-head"])
def test_no_weight_decay_lists_the_vision_towers_and_the_seg_heads_embeddings(seg):
    model = make_model(seg=seg, vision_config=tiny_vision_config(max_scans=2), max_study_scans=2)
    names = model.no_weight_decay()
    expected = {"vision_tower.patch_embedding.position_embeddings", "vision_tower.cls_token",
                "vision_tower.scan_embeddings"}
    if seg:
        expected |= {"seg_head.image_position_embeddings", "seg_head.mask_token"}
    assert names == expected  # neither the LLM's token embeddings nor the 1-D scan separator
    parameters = dict(model.named_parameters())
    assert all(parameters[name].dim() >= 2 for name in names), {name: parameters[name].shape for name in names}


def test_several_seg_tokens_use_their_mean_hidden_state():
    model = make_model().eval()
    hidden = torch.randn(1, 6, 32)
    ids = torch.tensor([[10, SEG_TOKEN_ID, 11, SEG_TOKEN_ID, 12, 13]])
    patch_features = torch.randn(1, 64, 32)
    logits, _ = model.forward_seg(hidden, model.seg_prompt_positions(ids), patch_features)
    expected = model.seg_head(hidden[:, [1, 3]].mean(dim=1), patch_features)
    torch.testing.assert_close(logits, expected)


class ForceFirstToken(LogitsProcessor):
    def __init__(self, prompt_length: int, token_id: int):
        self.prompt_length, self.token_id = prompt_length, token_id

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.prompt_length:
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.token_id] = 0.0
            return forced
        return scores


def test_generate_returns_masks_only_for_answers_with_seg():
    model = make_model().eval()
    input_ids = make_prompt(model, torch.randint(10, VOCAB_SIZE, (1, 4)))
    pixel_values = torch.rand(1, 1, 8, 16, 16)
    forced = model.generate(
        input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=3, return_masks=True, do_sample=False,
        logits_processor=LogitsProcessorList([ForceFirstToken(input_ids.shape[1], SEG_TOKEN_ID)]),
    )
    assert forced.sequences[0, input_ids.shape[1]] == SEG_TOKEN_ID
    assert forced.masks[0].shape == (1, 8, 16, 16)
    suppressed = model.generate(
        input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=3, return_masks=True,
        do_sample=False, suppress_tokens=[SEG_TOKEN_ID],
    )
    assert suppressed.masks == [None]


def test_save_load_round_trip_through_auto_classes(tmp_path):
    import voxlm  # noqa: F401  (registers the Auto classes)

    model = make_model(tie_word_embeddings=True).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "modeling_voxlm.py").is_file()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), VoxLMConfig)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, VoxLMForConditionalGeneration)
    input_ids = make_prompt(model, torch.randint(10, VOCAB_SIZE, (1, 5)))
    pixel_values = torch.rand(1, 1, 8, 16, 16)
    with torch.no_grad():
        expected = model(input_ids=input_ids, pixel_values=pixel_values).logits
        torch.testing.assert_close(loaded(input_ids=input_ids, pixel_values=pixel_values).logits, expected, atol=1e-5, rtol=0)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys
    class BlockVoxlm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "voxlm" or name.startswith("voxlm."):
                raise ImportError("voxlm is blocked in this process")
    sys.meta_path.insert(0, BlockVoxlm())
    try:
        import voxlm
        raise SystemExit("voxlm was importable")
    except ImportError:
        pass
    import torch
    from transformers import AutoModel
    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert "voxlm" not in type(model).__module__.split(".")[0], type(model).__module__
    inputs = torch.load(folder + "/inputs.pt", weights_only=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save(logits, folder + "/remote_logits.pt")
    """
)


def test_trust_remote_code_loads_without_voxlm(tmp_path):
    model = make_model().eval()
    model.save_pretrained(tmp_path)
    inputs = {
        "input_ids": make_prompt(model, torch.randint(10, VOCAB_SIZE, (1, 5))),
        "pixel_values": torch.rand(1, 1, 8, 16, 16),
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_CODE_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.testing.assert_close(torch.load(tmp_path / "remote_logits.pt", weights_only=True), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(projector_type="perceiver"), "projector_type"),
        (dict(text_config=PretrainedConfig()), "hidden_size"),
        (dict(text_config={"hidden_size": 32}), "model_type"),
        (dict(vision_config=dict(image_size=(8, 16, 16), patch_size=(3, 4, 4))), "image_size"),
        (dict(pooling_size=3), "pooling_size"),
        (dict(seg_token_id=None), "seg_token_id"),
    ],
)
def test_config_that_cannot_work_fails_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_voxlm_config(**overrides)


def test_config_round_trip_and_image_token_count(tmp_path):
    config = tiny_voxlm_config("qwen2")
    assert config.num_image_tokens == 8  # (4, 4, 4) patch grid pooled by 2
    assert tiny_voxlm_config(projector_type="linear").num_image_tokens == 64
    config.save_pretrained(tmp_path)
    assert VoxLMConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    assert VoxLMConfig().num_image_tokens == 256  # M3D-LaMed: 2048 patches pooled to 256


def test_linear_projector_keeps_every_patch_token():
    model = make_model(projector_type="linear", seg=False)
    assert model.get_image_features(torch.rand(1, 1, 8, 16, 16)).shape == (1, 64, 32)
    assert model.seg_head is None


@pytest.mark.parametrize("pooling", ["cls", "max"])
def test_pooled_image_token_is_the_projected_volume_embedding_before_the_patch_tokens(pooling):
    vision = tiny_vision_config(pooling=pooling, max_scans=2)
    plain = make_model(vision_config=vision).eval()
    model = make_model(vision_config=vision, pooled_image_token=True).eval()
    assert model.config.num_image_tokens == plain.config.num_image_tokens + 1 == 9
    pixel_values = torch.rand(2, 1, 8, 16, 16)
    with torch.no_grad():
        tokens = model.get_image_features(pixel_values)  # (B, 1 + N_img, E_llm)
        embedding = model.vision_tower(pixel_values).pooler_output  # (B, E_vis): CLS or max over patch tokens
        expected = model.multi_modal_projector.project_tokens(embedding[:, None])[:, 0]
        torch.testing.assert_close(tokens[:, 0], expected)
        torch.testing.assert_close(tokens[:, 1:], plain.get_image_features(pixel_values))  # same seed, same weights
        input_ids = make_prompt(model, torch.randint(10, VOCAB_SIZE, (1, 4)), batch_size=2)
        assert torch.isfinite(model(input_ids=input_ids, pixel_values=pixel_values).logits).all()
        # A study: each scan brings its own volume token.
        study = torch.rand(1, 2, 1, 8, 16, 16)
        assert model.get_image_features(study).shape == (1, 2, 9, 32)


def test_assembling_from_pretrained_parts_starts_new_tokens_at_the_mean(tmp_path):
    torch.manual_seed(0)
    text_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_text_config("llama")))
    text_model.save_pretrained(tmp_path / "llm")
    old_mean = text_model.get_input_embeddings().weight.mean(dim=0)
    token_ids = dict(image_token_id=99, seg_token_id=100, box_start_token_id=101, box_end_token_id=102, pad_token_id=0)
    model = VoxLMForConditionalGeneration.from_vision_text_pretrained(
        None, str(tmp_path / "llm"), token_ids=token_ids, vocab_size=103, vision_config=tiny_vision_config(),
        seg_config=dict(hidden_size=32, num_attention_heads=4, intermediate_size=64),
    )
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == 103 and model.config.seg_token_id == 100
    torch.testing.assert_close(embeddings[99:], old_mean.expand(4, -1))
    torch.testing.assert_close(embeddings[:99], text_model.get_input_embeddings().weight[:99])


def test_m3d_linear_projector_converts_to_m3d_outputs():
    """M3D's own `linear` projector (`FullLinear`, run by tests/m3d_lamed/make_linear_projector.py) and its output."""
    from pathlib import Path

    from safetensors.torch import load_file

    saved = load_file(Path(__file__).parent / "m3d_lamed" / "linear_projector.safetensors")
    converted, skipped = convert_m3d_lamed_state_dict({k: v for k, v in saved.items() if k.startswith("model.")})
    assert sorted(converted) == ["multi_modal_projector.linear.bias", "multi_modal_projector.linear.weight"]
    assert not skipped
    model = VoxLMForConditionalGeneration(tiny_voxlm_config(projector_type="linear")).eval()
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not unexpected and not any(key.startswith("multi_modal_projector.linear") for key in missing)
    with torch.no_grad():
        torch.testing.assert_close(model.multi_modal_projector(saved["input"]), saved["output"], rtol=0, atol=1e-6)
