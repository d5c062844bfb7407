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


def weight_decay_by_name(model, groups) -> dict[str, float]:
    decay_of = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    return {name: decay_of[id(p)] for name, p in model.named_parameters() if p.requires_grad}


def assert_matrices_decay_but_the_declared(model, groups, exempt: set[str]) -> None:
    """Every trained matrix decays, no vector does, and the matrices in `exempt` do not."""
    shapes = {name: p.dim() for name, p in model.named_parameters()}
    decays = weight_decay_by_name(model, groups)
    assert decays
    for name, decay in decays.items():
        expected = 0.01 if shapes[name] >= 2 and name not in exempt else 0.0
        assert decay == expected, (name, decay)


def test_weight_decay_reaches_every_matrix_of_voxlm_but_the_ones_it_declares():
    model = VoxLMForConditionalGeneration(tiny_voxlm_config())
    exempt = model.no_weight_decay()
    assert exempt == {"vision_tower.cls_token", "vision_tower.patch_embedding.position_embeddings",
                      "seg_head.mask_token", "seg_head.image_position_embeddings"}
    groups = parameter_groups(model, 0.01)
    assert_matrices_decay_but_the_declared(model, groups, exempt)
    decays = weight_decay_by_name(model, groups)
    # Matrices the old name rule ("embed", "token", "norm") left undecayed: the seg head's attention, the patch
    # embedding, the token embeddings.
    for name in ("seg_head.layers.0.token_to_image.in_proj_weight", "seg_head.final_token_to_image.out_proj.weight",
                 "vision_tower.patch_embedding.patch_embeddings.weight", "language_model.model.embed_tokens.weight"):
        assert decays[name] == 0.01, name


def test_weight_decay_under_lora_keeps_the_exceptions_of_the_copies_peft_trains():
    model = apply_lora(VoxLMForConditionalGeneration(tiny_voxlm_config()), LoraSettings(r=4, alpha=8, train_vision=True))
    decays = weight_decay_by_name(model, parameter_groups(model, 0.01))
    prefix = "base_model.model."
    exempt = {name for name in decays if name.startswith(prefix) and any(
        name == f"{prefix}{module}.modules_to_save.default.{rest}"
        for module, rest in (declared.split(".", 1) for declared in model.get_base_model().no_weight_decay()))}
    assert len(exempt) == 4
    shapes = {name: p.dim() for name, p in model.named_parameters()}
    for name, decay in decays.items():
        assert decay == (0.01 if shapes[name] >= 2 and name not in exempt else 0.0), name
    assert any("lora_A" in name and decay == 0.01 for name, decay in decays.items())


def test_align_gives_the_row_masked_embeddings_no_weight_decay():
    model = VoxLMForConditionalGeneration(tiny_voxlm_config())
    row_masked = freeze_for_align(model)
    assert row_masked == [model.get_input_embeddings().weight]
    decays = weight_decay_by_name(model, parameter_groups(model, 0.01, no_decay=row_masked))
    assert decays == {"language_model.model.embed_tokens.weight": 0.0, "multi_modal_projector.linear_1.weight": 0.01,
                      "multi_modal_projector.linear_1.bias": 0.0, "multi_modal_projector.linear_2.weight": 0.01,
                      "multi_modal_projector.linear_2.bias": 0.0}


def test_weight_decay_reaches_every_matrix_of_voxclip_but_the_ones_it_declares():
    from voxlm.modeling import VoxCLIPConfig

    text_config = dict(model_type="bert", vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64)
    config = VoxCLIPConfig(vision_config=tiny_vision_config(), text_config=text_config, projection_dim=16,
                           mvr_loss_weight=1.0, report_gen_loss_weight=1.0, volume_decoder_hidden_size=16,
                           volume_decoder_heads=2, volume_decoder_intermediate_size=32)
    model = VoxCLIPModel(config)
    exempt = model.no_weight_decay()
    assert exempt == {"vision_model.cls_token", "vision_model.patch_embedding.position_embeddings",
                      "volume_decoder.mask_token", "report_decoder.position_embeddings.weight"}
    assert_matrices_decay_but_the_declared(model, parameter_groups(model, 0.01), exempt)
