"""Which parameters the MLLM stages train: alignment (projector + new token rows) and LoRA fine-tuning."""

import pytest
import torch
from tiny_models import BOS_TOKEN_ID, IMAGE_TOKEN_ID, SEG_TOKEN_ID, VOCAB_SIZE, tiny_vision_config, tiny_voxlm_config

from voxlm.modeling import VoxCLIPModel, VoxLMForConditionalGeneration
from voxlm.training.loop import parameter_groups
from voxlm.training.trainable import (
    LoraSettings,
    apply_lora,
    freeze_for_align,
    freeze_text_layers,
    llm_linear_names,
)


def batch():
    torch.manual_seed(1)
    text = torch.randint(10, VOCAB_SIZE, (1, 5))
    text[0, 2] = SEG_TOKEN_ID
    ids = torch.cat([torch.tensor([[BOS_TOKEN_ID]]), torch.full((1, 8), IMAGE_TOKEN_ID), text], dim=1)
    return dict(input_ids=ids, pixel_values=torch.rand(1, 1, 8, 16, 16), labels=ids.clone())


def test_align_trains_only_the_projector_and_new_token_rows():
    torch.manual_seed(0)
    model = VoxLMForConditionalGeneration(tiny_voxlm_config())
    freeze_for_align(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.bias",
        "multi_modal_projector.linear_2.weight", "multi_modal_projector.linear_2.bias",
        "language_model.model.embed_tokens.weight",
    }
    model(**batch()).loss.backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad[SEG_TOKEN_ID].abs().sum() > 0
    old_rows = torch.ones(VOCAB_SIZE, dtype=torch.bool)
    old_rows[[IMAGE_TOKEN_ID, SEG_TOKEN_ID, 6, 7]] = False
    assert grad[old_rows].abs().sum() == 0


@pytest.mark.parametrize("kind, expected", [("llama", "q_proj"), ("phi3", "qkv_proj")])
def test_lora_targets_the_llm_linears_of_each_family(kind, expected):
    model = VoxLMForConditionalGeneration(tiny_voxlm_config(kind))
    assert expected in llm_linear_names(model) and "lm_head" not in llm_linear_names(model)


def test_lora_trains_adapters_projector_seg_head_and_new_tokens_and_saves_them(tmp_path):
    torch.manual_seed(0)
    model = apply_lora(VoxLMForConditionalGeneration(tiny_voxlm_config()), LoraSettings(r=4, alpha=8))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in name and "language_model" in name for name in trainable)
    assert any("multi_modal_projector.modules_to_save" in name for name in trainable)
    assert any("seg_head.modules_to_save" in name for name in trainable)
    assert any("trainable_tokens" in name for name in trainable)
    assert not any(name.startswith("base_model.model.vision_tower") for name in trainable)
    model(**batch()).loss.backward()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    merged = model.merge_and_unload()
    assert type(merged) is VoxLMForConditionalGeneration


def test_module_learning_rates_give_the_trained_encoder_its_own_groups():
    model = apply_lora(VoxLMForConditionalGeneration(tiny_voxlm_config()), LoraSettings(r=4, alpha=8, train_vision=True))
    groups = parameter_groups(model, 0.01, {"vision_tower": 1e-5})
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    encoder = {id(p) for name, p in trainable.items() if ".vision_tower." in name}
    grouped = [id(p) for group in groups for p in group["params"]]
    assert encoder and sorted(grouped) == sorted(id(p) for p in trainable.values())  # each once
    own = [group for group in groups if "lr" in group]
    assert [(group["lr"], group["weight_decay"]) for group in own] == [(1e-5, 0.01), (1e-5, 0.0)]
    assert {id(p) for group in own for p in group["params"]} == encoder
    assert len(groups) == 4 and len(parameter_groups(model, 0.01)) == 2


def test_module_learning_rates_refuse_a_module_with_nothing_to_train():
    model = apply_lora(VoxLMForConditionalGeneration(tiny_voxlm_config()), LoraSettings(r=4, alpha=8))
    with pytest.raises(ValueError, match=r"no trainable parameter: \['vision_tower'\]"):
        parameter_groups(model, 0.01, {"vision_tower": 1e-5})  # the encoder is frozen without train_vision
    with pytest.raises(ValueError, match=r"no trainable parameter: \['multi_modal'\]"):
        parameter_groups(model, 0.01, {"multi_modal": 1e-5})  # a whole module name, not a prefix


@pytest.mark.parametrize("trainable_layers", [0, 2])
def test_locking_the_text_encoder_trains_only_its_top_layers_and_the_rest_of_voxclip(minilm_dir, trainable_layers):
    model = VoxCLIPModel.from_vision_text_pretrained(None, str(minilm_dir), vision_config=tiny_vision_config(),
                                                     projection_dim=16)
    freeze_text_layers(model, trainable_layers)
    num_layers = len(model.text_model.encoder.layer)
    trained_text = {name.split(".")[2] for name, p in model.text_model.named_parameters() if p.requires_grad}
    assert trained_text == {str(index) for index in range(num_layers - trainable_layers, num_layers)}
    others = [p for name, p in model.named_parameters() if not name.startswith("text_model.")]
    assert all(p.requires_grad for p in others)  # vision tower, both projections, logit scale
    with pytest.raises(ValueError, match="between 0 and the text encoder's 6 layers"):
        freeze_text_layers(model, num_layers + 1)
