"""VoxViT: shapes, config validation, SDPA == eager attention, and numerical equivalence with MONAI's ViT."""

import pytest
import torch
from monai.networks.nets import ViT
from tiny_models import tiny_vision_config

from voxlm.modeling import VoxViTConfig, VoxViTModel
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
