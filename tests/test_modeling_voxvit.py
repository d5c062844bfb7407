"""VoxViT: shapes, config validation, attention implementations (eager == SDPA, the one asked for is the one used),
MAE masking with `keep_ids`, the parameters kept from weight decay, and numerical equivalence with MONAI's ViT."""

import pytest
import torch
from monai.networks.nets import ViT
from tiny_models import tiny_vision_config

from voxlm.modeling import VoxViTConfig, VoxViTModel, modeling_voxvit
from voxlm.modeling.convert_m3d import convert_monai_vit_state_dict


def test_config_round_trip(tmp_path):
    config = tiny_vision_config()
    assert VoxViTConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    assert VoxViTConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    assert config.grid_size == (4, 4, 4) and config.num_patches == 64 and config.patch_dim == 32


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(image_size=(8, 16, 15)), "image_size"),
        (dict(patch_size=(2, 4)), "patch_size"),
        (dict(num_attention_heads=5), "hidden_size"),
        (dict(attention_dropout=1.5), "attention_dropout"),
        (dict(pooling="attention"), "pooling"),
    ],
)
def test_config_that_cannot_work_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_vision_config(**overrides)


def test_forward_shapes_hidden_states_and_attentions():
    model = VoxViTModel(tiny_vision_config()).eval()
    output = model(torch.rand(2, 1, 8, 16, 16), output_hidden_states=True, output_attentions=True)
    assert output.last_hidden_state.shape == (2, 65, 32)
    assert torch.equal(output.pooler_output, output.last_hidden_state[:, 0])
    assert len(output.hidden_states) == 3 and len(output.attentions) == 2
    assert output.attentions[0].shape == (2, 4, 65, 65)
    torch.testing.assert_close(output.attentions[0].sum(-1), torch.ones(2, 4, 65))


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_pooled_output_reduces_the_patch_tokens(pooling):
    model = VoxViTModel(tiny_vision_config(pooling=pooling)).eval()
    output = model(torch.rand(2, 1, 8, 16, 16))
    patch_tokens = output.last_hidden_state[:, 1:]  # (B, N, E): the CLS token takes no part
    expected = patch_tokens.mean(dim=1) if pooling == "mean" else patch_tokens.amax(dim=1)
    torch.testing.assert_close(output.pooler_output, expected, rtol=0, atol=0)


def test_max_pooling_of_a_study_averages_the_real_scans_maxima():
    model = VoxViTModel(tiny_vision_config(pooling="max", max_scans=3)).eval()
    study, scan_mask = torch.rand(1, 3, 1, 8, 16, 16), torch.tensor([[True, True, False]])
    output = model(study, scan_mask=scan_mask)
    scan_maxima = output.last_hidden_state[:, :2, 1:].amax(dim=2)  # (B, 2, E): the padded third scan is left out
    torch.testing.assert_close(output.pooler_output, scan_maxima.mean(dim=1))


def test_sdpa_equals_eager_attention():
    torch.manual_seed(0)
    model = VoxViTModel(tiny_vision_config()).eval()
    volume = torch.rand(2, 1, 8, 16, 16)
    sdpa = model(volume).last_hidden_state
    eager = model(volume, output_attentions=True).last_hidden_state
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


STUDY_LEVELS = dict(num_hidden_layers=3, attention_levels=["slice", "scan", "study"], max_scans=3)


@pytest.mark.parametrize("study", [False, True], ids=["volume", "study"])
def test_eager_and_sdpa_implementations_give_the_same_outputs(study):
    torch.manual_seed(0)
    model = VoxViTModel(tiny_vision_config(**STUDY_LEVELS)).eval()
    if study:  # the study level runs with a key mask: the second study's last scan is padding
        inputs = dict(pixel_values=torch.rand(2, 3, 1, 8, 16, 16), scan_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    else:
        inputs = dict(pixel_values=torch.rand(2, 1, 8, 16, 16))
    assert model.config._attn_implementation == "sdpa"
    sdpa = model(**inputs)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    eager = model(**inputs)
    torch.testing.assert_close(eager.last_hidden_state, sdpa.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager.pooler_output, sdpa.pooler_output, atol=1e-5, rtol=1e-5)


def count_eager_calls(monkeypatch) -> list:
    """Record every call of VoxViT's eager attention (it still computes): a list that grows by one per call."""
    calls, eager = [], modeling_voxvit.eager_attention_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return eager(*args, **kwargs)

    monkeypatch.setattr(modeling_voxvit, "eager_attention_forward", spy)
    return calls


@pytest.mark.parametrize("implementation, eager_calls", [("eager", 2), ("sdpa", 0)])
def test_from_pretrained_runs_the_attention_implementation_asked_for(tmp_path, monkeypatch, implementation,
                                                                     eager_calls):
    VoxViTModel(tiny_vision_config()).save_pretrained(tmp_path)
    model = VoxViTModel.from_pretrained(tmp_path, attn_implementation=implementation).eval()
    assert model.config._attn_implementation == implementation
    calls = count_eager_calls(monkeypatch)
    assert model(torch.rand(1, 1, 8, 16, 16)).attentions is None
    assert len(calls) == eager_calls  # one per block
    # Attention weights exist only in eager attention, so asking for them computes eagerly whatever the config says.
    weights = model(torch.rand(1, 1, 8, 16, 16), output_attentions=True).attentions
    assert len(calls) == eager_calls + 2 and weights[0].shape == (1, 4, 65, 65)


@pytest.mark.parametrize("implementation", ["flex_attention", "flash_attention_2", "no_such_kernel"])
def test_an_attention_implementation_voxvit_lacks_is_refused_by_transformers(tmp_path, implementation):
    VoxViTModel(tiny_vision_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not support|is not supported"):
        VoxViTModel.from_pretrained(tmp_path, attn_implementation=implementation)


def visible_pass_by_hand(model: VoxViTModel, pixel_values: torch.Tensor, keep_ids: torch.Tensor) -> torch.Tensor:
    """The masked pass as VoxCLIP used to drive it from outside the encoder: embed, keep CLS and the `keep_ids`
    patches, the blocks without grouping, the final norm. `(B, C, D, H, W)`, `(B, K)` -> `(B, 1 + K, E)`."""
    tokens = model.embed(pixel_values)  # (B, 1 + N, E)
    index = keep_ids[..., None].expand(-1, -1, tokens.shape[-1])  # (B, K, E)
    hidden_states = torch.cat([tokens[:, :1], tokens[:, 1:].gather(1, index)], dim=1)  # (B, 1 + K, E)
    for block in model.blocks:
        hidden_states, _ = block(hidden_states)
    return model.norm(hidden_states)


def test_keeping_every_patch_equals_the_unmasked_encoder():
    model = VoxViTModel(tiny_vision_config()).eval()
    pixel_values = torch.rand(2, 1, 8, 16, 16)
    keep_all = torch.arange(64).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values, keep_ids=keep_all).last_hidden_state,
                                   model(pixel_values).last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("levels", [None, ["scan", "study"]], ids=["scan", "scan-study"])
def test_kept_patches_run_through_the_encoder_alone(pooling, levels):
    torch.manual_seed(0)
    model = VoxViTModel(tiny_vision_config(pooling=pooling, attention_levels=levels)).eval()
    pixel_values, keep_ids = torch.rand(2, 1, 8, 16, 16), torch.rand(2, 64).argsort(dim=1)[:, :16]
    with torch.no_grad():
        output = model(pixel_values, keep_ids=keep_ids, output_hidden_states=True)
        expected = visible_pass_by_hand(model, pixel_values, keep_ids)  # (2, 17, 32)
    torch.testing.assert_close(output.last_hidden_state, expected, rtol=0, atol=0)
    pooled = expected[:, 0] if pooling == "cls" else expected[:, 1:].mean(dim=1)
    torch.testing.assert_close(output.pooler_output, pooled, rtol=0, atol=0)
    assert [state.shape for state in output.hidden_states] == [(2, 17, 32)] * 3


@pytest.mark.parametrize(
    "keep_ids, message",
    [
        (torch.zeros(2, 4, 1, dtype=torch.long), r"shape \(B, K\) = \(2, K\) with 1 <= K <= 64.*\(2, 4, 1\)"),
        (torch.zeros(3, 4, dtype=torch.long), r"shape \(B, K\).*got \(3, 4\)"),
        (torch.zeros(2, 0, dtype=torch.long), r"1 <= K <= 64.*got \(2, 0\)"),
        (torch.arange(65).expand(2, -1), r"1 <= K <= 64.*got \(2, 65\)"),
        (torch.rand(2, 4), "integer patch indices, got dtype torch.float32"),
        (torch.tensor([[0, 64], [1, 2]]), r"\[0, 64\).*\[0, 64\]"),
        (torch.tensor([[-1, 3], [1, 2]]), r"\[0, 64\).*\[-1, 3\]"),
        (torch.tensor([[3, 3], [1, 2]]), "repeats a patch index"),
    ],
    ids=["3d", "batch", "empty", "too-many", "float", "above", "negative", "repeated"],
)
def test_invalid_keep_ids_are_a_clear_error(keep_ids, message):
    model = VoxViTModel(tiny_vision_config())
    with pytest.raises(ValueError, match=message):
        model(torch.rand(2, 1, 8, 16, 16), keep_ids=keep_ids)


def test_keep_ids_are_refused_for_studies_and_slice_attention():
    keep_ids = torch.arange(8).expand(2, -1)
    study_model = VoxViTModel(tiny_vision_config(max_scans=2))
    with pytest.raises(ValueError, match="keep_ids masks single volumes"):
        study_model(torch.rand(2, 2, 1, 8, 16, 16), keep_ids=keep_ids)
    slice_model = VoxViTModel(tiny_vision_config(attention_levels=["slice", "scan"]))
    with pytest.raises(ValueError, match=r"scan or study attention in every block.*\['slice', 'scan'\]"):
        slice_model(torch.rand(2, 1, 8, 16, 16), keep_ids=keep_ids)


def assert_matrix_parameters(model, names: set[str]):
    """Every name `no_weight_decay()` gives is a parameter of `model` with `dim >= 2` (the optimiser's rule catches
    the 1-D ones)."""
    parameters = dict(model.named_parameters())
    assert names <= parameters.keys(), names - parameters.keys()
    assert all(parameters[name].dim() >= 2 for name in names), {name: parameters[name].shape for name in names}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, {"patch_embedding.position_embeddings", "cls_token"}),
        (dict(max_scans=3), {"patch_embedding.position_embeddings", "cls_token", "scan_embeddings"}),
        (dict(position_embedding_type="sincos"), {"cls_token"}),  # a buffer, not a parameter
    ],
    ids=["learned", "study", "sincos"],
)
def test_no_weight_decay_lists_the_position_cls_and_scan_embeddings(overrides, expected):
    model = VoxViTModel(tiny_vision_config(**overrides))
    names = model.no_weight_decay()
    assert isinstance(names, set) and names == expected
    assert_matrix_parameters(model, names)


def test_wrong_volume_shape_is_a_clear_error():
    model = VoxViTModel(tiny_vision_config())
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 16, 16\).*got \(2, 1, 8, 16, 17\)"):
        model(torch.rand(2, 1, 8, 16, 17))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = VoxViTModel(tiny_vision_config()).train()
    volume = torch.rand(2, 1, 8, 16, 16)
    model(volume).last_hidden_state.square().mean().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model(volume).last_hidden_state.square().mean().backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def monai_vit(config: VoxViTConfig, proj_type: str) -> ViT:
    """MONAI's ViT built with M3D-CLIP's settings (LaMed/src/model/multimodal_encoder/vit.py)."""
    return ViT(
        in_channels=config.num_channels,
        img_size=tuple(config.image_size),
        patch_size=tuple(config.patch_size),
        hidden_size=config.hidden_size,
        mlp_dim=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        proj_type=proj_type,
        classification=True,
        dropout_rate=0.0,
        spatial_dims=3,
    ).eval()


def monai_tokens(vit: ViT, volume: torch.Tensor) -> torch.Tensor:
    """The normalised token sequence of MONAI's ViT (its forward returns the classification head's output)."""
    captured = {}
    handle = vit.norm.register_forward_hook(lambda module, inputs, output: captured.setdefault("tokens", output))
    vit(volume)
    handle.remove()
    return captured["tokens"]


def assert_equivalent_to_monai(config: VoxViTConfig, proj_type: str, batch_size: int = 2):
    torch.manual_seed(0)
    reference = monai_vit(config, proj_type)
    model = VoxViTModel(config).eval()
    model.load_state_dict(convert_monai_vit_state_dict(reference.state_dict()), strict=True)
    volume = torch.rand(batch_size, config.num_channels, *config.image_size)
    with torch.no_grad():
        difference = (model(volume).last_hidden_state - monai_tokens(reference, volume)).abs().max().item()
    assert difference < 1e-5, difference


@pytest.mark.parametrize("proj_type", ["perceptron", "conv"])
def test_converted_monai_weights_give_monai_outputs(proj_type):
    assert_equivalent_to_monai(tiny_vision_config(num_channels=2), proj_type)


def test_paper_size_encoder_runs_one_cpu_forward():
    config = VoxViTConfig()
    assert config.num_patches == 2048 and config.grid_size == (8, 16, 16)
    model = VoxViTModel(config).eval()
    assert sum(p.numel() for p in model.parameters()) > 85_000_000
    with torch.no_grad():
        output = model(torch.rand(1, 1, 32, 256, 256))
    assert output.last_hidden_state.shape == (1, 2049, 768)
    assert torch.isfinite(output.last_hidden_state).all()


@pytest.mark.slow
def test_paper_size_equivalence_with_monai():
    assert_equivalent_to_monai(VoxViTConfig(), "perceptron", batch_size=1)
