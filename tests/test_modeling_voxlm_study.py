"""VoxLM on whole studies: per-scan pooled tokens with learned separators, spliced by id; padded scans give no tokens;
a one-scan study is the single volume; generation, masks on a chosen scan, config validation, save/load."""

import pytest
import torch
from tiny_models import (
    BOS_TOKEN_ID,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    SEG_TOKEN_ID,
    VOCAB_SIZE,
    tiny_vision_config,
    tiny_voxlm_config,
)
from transformers import LogitsProcessor, LogitsProcessorList

from voxlm.modeling import VoxLMConfig, VoxLMForConditionalGeneration

MAX_SCANS = 3
VOLUME = (1, 8, 16, 16)  # (C, D, H, W) of the tiny encoder


def study_config(**overrides) -> VoxLMConfig:
    """The tiny VoxLM over an encoder whose second block attends across the study (padded scans must be masked)."""
    vision = tiny_vision_config(max_scans=MAX_SCANS, attention_levels=["scan", "study"])
    settings = dict(vision_config=vision, max_study_scans=MAX_SCANS)
    settings.update(overrides)
    return tiny_voxlm_config(**settings)


def study_model(seed=0, **overrides) -> VoxLMForConditionalGeneration:
    torch.manual_seed(seed)
    return VoxLMForConditionalGeneration(study_config(**overrides)).eval()


def study_prompt(model, num_scans: int, text_ids) -> torch.LongTensor:
    """BOS, the placeholders of a study of `num_scans` real scans, then text: (1, L)."""
    images = torch.full((1, model.config.num_study_image_tokens(num_scans)), IMAGE_TOKEN_ID)
    return torch.cat([torch.tensor([[BOS_TOKEN_ID]]), images, torch.as_tensor(text_ids).reshape(1, -1)], dim=1)


def left_pad(prompts: list[torch.LongTensor]) -> tuple[torch.LongTensor, torch.LongTensor]:
    width = max(p.shape[1] for p in prompts)
    input_ids = torch.full((len(prompts), width), PAD_TOKEN_ID)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - prompt.shape[1] :] = prompt[0]
        attention_mask[row, width - prompt.shape[1] :] = 1
    return input_ids, attention_mask


def test_config_counts_study_tokens_and_round_trips(tmp_path):
    config = study_config()
    assert config.num_image_tokens == 8 and config.num_study_image_tokens(2) == 8 + 1 + 8
    assert config.max_image_tokens == 3 * 8 + 2
    config.save_pretrained(tmp_path)
    reloaded = VoxLMConfig.from_pretrained(tmp_path)
    assert reloaded.max_study_scans == MAX_SCANS and reloaded.to_dict() == config.to_dict()
    assert tiny_voxlm_config().max_study_scans == 1  # M3D-LaMed: one volume


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(max_study_scans=0), r"`max_study_scans` must be an int >= 1, got 0"),
        (dict(max_study_scans=4), r"`max_study_scans` \(4\) exceeds .*`vision_config.max_scans` = 3"),
        (dict(projector_type="linear"), r"puts up to 194 image tokens .* LLM's 128 positions"),
    ],
)
def test_study_config_that_cannot_work_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        study_config(**overrides)


def test_single_volume_models_keep_their_parameters():
    """No separator without studies: checkpoints saved before study support load with no missing key."""
    volume_keys = set(VoxLMForConditionalGeneration(tiny_voxlm_config()).state_dict())
    study_keys = set(study_model().state_dict())
    assert study_keys - volume_keys == {"multi_modal_projector.scan_separator", "vision_tower.scan_embeddings"}


def test_study_tokens_go_to_the_placeholders_in_scan_order_with_separators():
    model = study_model()
    pixel_values = torch.rand(1, 3, *VOLUME)
    scan_mask = torch.tensor([[True, False, True]])  # a gap in the middle: scans 0 and 2 are read
    input_ids = study_prompt(model, 2, [10, 11])
    with torch.no_grad():
        embeds, patch_features, image_features = model.embed_inputs(input_ids, pixel_values, scan_mask)
    n = model.config.num_image_tokens
    assert patch_features.shape == (1, 3, 64, 32) and image_features.shape == (1, 3, n, 32)
    torch.testing.assert_close(embeds[0, 1 : 1 + n], image_features[0, 0])
    torch.testing.assert_close(embeds[0, 1 + n], model.multi_modal_projector.scan_separator)
    torch.testing.assert_close(embeds[0, 2 + n : 2 + 2 * n], image_features[0, 2])
    torch.testing.assert_close(embeds[0, -2:], model.get_input_embeddings()(torch.tensor([10, 11])))


def test_forward_shapes_and_gradients_reach_the_separator():
    model = study_model().train()
    pixel_values = torch.rand(2, 3, *VOLUME)
    scan_mask = torch.tensor([[True, True, True], [True, True, False]])
    input_ids, attention_mask = left_pad([study_prompt(model, 3, [10, 11, 12]), study_prompt(model, 2, [13, 14])])
    output = model(input_ids=input_ids, pixel_values=pixel_values, scan_mask=scan_mask,
                   attention_mask=attention_mask, labels=input_ids.masked_fill(attention_mask == 0, -100))
    assert output.logits.shape == (2, 1 + 26 + 3, VOCAB_SIZE)
    assert output.image_hidden_states.shape == (2, 3, 8, 32)
    output.loss.backward()
    assert model.multi_modal_projector.scan_separator.grad.abs().sum() > 0
    assert model.vision_tower.scan_embeddings.grad[:2].abs().sum() > 0  # scans 1 and 2 are real in the first study


def test_one_scan_study_equals_the_single_volume():
    model = study_model()
    volume = torch.rand(1, *VOLUME)
    input_ids = study_prompt(model, 1, [10, 11, 12])
    with torch.no_grad():
        single = model(input_ids=input_ids, pixel_values=volume).logits
        study = model(input_ids=input_ids, pixel_values=volume[:, None], scan_mask=torch.ones(1, 1)).logits
    torch.testing.assert_close(study, single, atol=0, rtol=0)


def test_padded_scans_do_not_change_the_answer_logits():
    model = study_model()
    scans = torch.rand(1, 2, *VOLUME)
    input_ids = study_prompt(model, 2, [10, 11, 12])
    with torch.no_grad():
        alone = model(input_ids=input_ids, pixel_values=scans).logits
        for padding in (torch.zeros(1, 1, *VOLUME), torch.rand(1, 1, *VOLUME)):
            padded = torch.cat([scans, padding], dim=1)
            logits = model(input_ids=input_ids, pixel_values=padded, scan_mask=torch.tensor([[1, 1, 0]])).logits
            torch.testing.assert_close(logits, alone, atol=1e-6, rtol=0)


def test_prompts_with_the_wrong_count_or_too_many_scans_raise():
    model = study_model(max_study_scans=2)
    with pytest.raises(ValueError, match=r"studies give \[17\] features \(8 per scan and a separator.*\[16\]"):
        model(input_ids=study_prompt(model, 2, [10])[:, 2:], pixel_values=torch.rand(1, 2, *VOLUME))
    with pytest.raises(ValueError, match=r"studies hold \[3\] scans, but this model reads at most 2"):
        model(input_ids=study_prompt(model, 3, [10]), pixel_values=torch.rand(1, 3, *VOLUME))


def test_batched_padded_studies_generate_what_each_generates_alone():
    model = study_model()
    studies = [torch.rand(1, 2, *VOLUME), torch.rand(1, 3, *VOLUME)]
    prompts = [study_prompt(model, 2, [10, 11]), study_prompt(model, 3, [12, 13, 14, 15])]
    pixel_values = torch.cat([torch.cat([studies[0], torch.rand(1, 1, *VOLUME)], dim=1), studies[1]])
    scan_mask = torch.tensor([[True, True, False], [True, True, True]])
    input_ids, attention_mask = left_pad(prompts)
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    batched = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                             scan_mask=scan_mask, **settings)
    uncached = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                              scan_mask=scan_mask, use_cache=False, **settings)
    assert torch.equal(batched, uncached)
    for row, (prompt, study) in enumerate(zip(prompts, studies)):
        alone = model.generate(input_ids=prompt, pixel_values=study, **settings)
        assert torch.equal(batched[row, input_ids.shape[1] :], alone[0, prompt.shape[1] :]), row


class ForceSeg(LogitsProcessor):
    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, SEG_TOKEN_ID] = 0.0
        return forced


def test_masks_are_decoded_on_the_chosen_scan():
    model = study_model()
    pixel_values = torch.rand(1, 3, *VOLUME)
    scan_mask = torch.tensor([[True, True, False]])
    input_ids = study_prompt(model, 2, [10, 11])
    settings = dict(input_ids=input_ids, pixel_values=pixel_values, scan_mask=scan_mask, max_new_tokens=1,
                    return_masks=True, do_sample=False, logits_processor=LogitsProcessorList([ForceSeg()]))
    first, second = (model.generate(**settings, seg_scan_index=index) for index in (0, 1))
    assert first.masks[0].shape == (1, 8, 16, 16) and torch.equal(first.sequences, second.sequences)
    # The same [SEG] state decoded over each scan's own patch features.
    with torch.no_grad():
        _, patch_features, _ = model.embed_inputs(first.sequences, pixel_values, scan_mask)
        hidden = model(input_ids=first.sequences, pixel_values=pixel_values, scan_mask=scan_mask,
                       output_hidden_states=True).hidden_states[-1][:, -1]
        for index, output in ((0, first), (1, second)):
            torch.testing.assert_close(output.masks[0][None], model.seg_head(hidden, patch_features[:, index]))
    assert not torch.allclose(first.masks[0], second.masks[0])
    with pytest.raises(ValueError, match=r"seg_scan_index \[2\] points at a padded scan"):
        model.generate(**settings, seg_scan_index=2)


def test_segmentation_loss_on_a_study_uses_the_chosen_scan():
    model = study_model().train()
    input_ids = study_prompt(model, 2, [10, SEG_TOKEN_ID, 11])
    pixel_values = torch.rand(1, 2, *VOLUME)
    seg_masks = (torch.rand(1, 1, 8, 16, 16) > 0.7).float()
    losses = [model(input_ids=input_ids, pixel_values=pixel_values, labels=input_ids, seg_masks=seg_masks,
                    seg_scan_index=index).seg_dice_loss for index in (0, 1)]
    assert all(torch.isfinite(loss) for loss in losses) and not torch.equal(losses[0], losses[1])


def test_save_load_round_trip_keeps_study_answers(tmp_path):
    import voxlm  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModel

    model = study_model(seed=3)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert loaded.config.max_study_scans == MAX_SCANS
    torch.testing.assert_close(loaded.multi_modal_projector.scan_separator, model.multi_modal_projector.scan_separator,
                               atol=0, rtol=0)
    inputs = dict(input_ids=study_prompt(model, 2, [10, 11]), pixel_values=torch.rand(1, 3, *VOLUME),
                  scan_mask=torch.tensor([[True, True, False]]))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
