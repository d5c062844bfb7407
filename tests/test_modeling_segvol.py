"""The SegVol seg head and the `[SEG]` prompt position: training and generation decode the same mask from the same
hidden state, save/load, and config validation. Equality with M3D's own SegVol is in tests/test_m3d_lamed.py."""

import pytest
import torch
from tiny_models import BOS_TOKEN_ID, IMAGE_TOKEN_ID, SEG_TOKEN_ID, ForceAnswer, tiny_segvol_config, tiny_voxlm_config
from transformers import LogitsProcessorList

from voxlm.modeling import VoxLMConfig, VoxLMForConditionalGeneration
from voxlm.modeling.modeling_segvol import SegVolHead

VOLUME = (1, 8, 16, 16)


def segvol_model(prompt_token="previous", seed=0) -> VoxLMForConditionalGeneration:
    torch.manual_seed(seed)
    return VoxLMForConditionalGeneration(
        tiny_voxlm_config(seg_config=tiny_segvol_config(prompt_token=prompt_token))
    ).eval()


def prompt(model, text_ids) -> torch.LongTensor:
    images = torch.full((1, model.config.num_image_tokens), IMAGE_TOKEN_ID)
    return torch.cat([torch.tensor([[BOS_TOKEN_ID]]), images, torch.tensor([text_ids])], dim=1)


def test_segvol_head_trains_with_the_lm_and_every_part_gets_a_gradient():
    model = segvol_model().train()
    input_ids = prompt(model, [10, 11, SEG_TOKEN_ID, 12])
    labels = input_ids.clone()
    output = model(input_ids=input_ids, pixel_values=torch.rand(1, *VOLUME), labels=labels,
                   seg_masks=(torch.rand(1, *VOLUME) > 0.5).float())
    assert isinstance(model.seg_head, SegVolHead) and output.seg_logits.shape == (1, *VOLUME)
    assert torch.isfinite(output.seg_dice_loss) and torch.isfinite(output.seg_bce_loss)
    output.loss.backward()
    no_grad = [name for name, p in model.seg_head.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not no_grad


@pytest.mark.parametrize("prompt_token", ["previous", "seg"])
@pytest.mark.parametrize("answer", [[10, SEG_TOKEN_ID, 11, 12], [10, 11, SEG_TOKEN_ID]], ids=["inside", "last"])
def test_generate_decodes_the_mask_that_a_forward_over_the_answer_decodes(prompt_token, answer):
    model = segvol_model(prompt_token)
    input_ids = prompt(model, [13, 14])
    pixel_values = torch.rand(1, *VOLUME)
    generated = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=len(answer),
                               do_sample=False, return_masks=True,
                               logits_processor=LogitsProcessorList([ForceAnswer(input_ids.shape[1], answer)]))
    assert generated.sequences[0, input_ids.shape[1]:].tolist() == answer
    with torch.no_grad():
        reference = model(input_ids=generated.sequences, pixel_values=pixel_values,
                          seg_masks=torch.zeros(1, *VOLUME)).seg_logits
    torch.testing.assert_close(generated.masks[0][None], reference, atol=1e-5, rtol=1e-4)


def test_prompt_token_selects_the_seg_state_or_the_one_before_it():
    ids = torch.tensor([[1, 10, SEG_TOKEN_ID, 11, SEG_TOKEN_ID]])
    assert segvol_model("seg").seg_prompt_positions(ids).tolist() == [[False, False, True, False, True]]
    assert segvol_model("previous").seg_prompt_positions(ids).tolist() == [[False, True, False, True, False]]


def test_previous_token_prompt_ignores_seg_as_the_first_new_token_as_m3d_does():
    model = segvol_model("previous")
    input_ids = prompt(model, [13])
    generated = model.generate(input_ids=input_ids, pixel_values=torch.rand(1, *VOLUME), max_new_tokens=2,
                               do_sample=False, return_masks=True,
                               logits_processor=LogitsProcessorList([ForceAnswer(input_ids.shape[1],
                                                                                 [SEG_TOKEN_ID, 10])]))
    assert generated.masks == [None]


def test_segvol_save_load_round_trip_is_exact(tmp_path):
    import voxlm  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModel

    model = segvol_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_segvol.py").is_file()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert loaded.config.seg_config.head_type == "segvol" and loaded.config.seg_config.prompt_token == "previous"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("change, message", [
    (dict(image_encoder_config=None), "needs an `image_encoder_config`"),
    (dict(hidden_size=64), r"image_encoder_config.hidden_size` \(32\) must equal `hidden_size` \(64\)"),
    (dict(prompt_token="next"), "unknown `prompt_token` 'next'"),
    (dict(head_type="sam"), "unknown `head_type` 'sam'"),
    (dict(attention_downsample_rate=3), "`attention_downsample_rate` \\(3\\)"),
])
def test_unworkable_segvol_configs_are_refused_naming_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        tiny_voxlm_config(seg_config=tiny_segvol_config(**change))


def test_segvol_must_read_the_volume_the_llm_encoder_reads():
    encoder = tiny_segvol_config()["image_encoder_config"] | {"image_size": [16, 16, 16]}
    with pytest.raises(ValueError, match=r"image_size` \(16, 16, 16\) must equal `vision_config.image_size`"):
        VoxLMConfig(**{**tiny_voxlm_config().to_dict(), "seg_config": tiny_segvol_config(image_encoder_config=encoder)})
