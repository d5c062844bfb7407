"""VoxViT study mode (HLIP hierarchical attention): config, one-scan equivalence, locality of each level, masking."""

import numpy as np
import pytest
import torch
from tiny_models import tiny_vision_config

from voxlm.modeling import VoxViTConfig, VoxViTModel
from voxlm.modeling.modeling_voxvit import sincos_position_embeddings

PRESETS = ["scan_study", "slice_scan", "slice_scan_study"]


def study_config(**overrides) -> VoxViTConfig:
    """Tiny study-mode config: grid (4, 4, 4) = 64 patches per scan, width 32, three blocks, up to 4 scans."""
    settings = dict(num_hidden_layers=3, attention_levels="slice_scan_study", max_scans=4)
    settings.update(overrides)
    return tiny_vision_config(**settings)


def seeded_model(config: VoxViTConfig, seed: int = 0) -> VoxViTModel:
    torch.manual_seed(seed)
    return VoxViTModel(config).eval()


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("scan_study", ("scan", "scan", "study", "scan", "scan", "study")),
        ("slice_scan", ("slice", "slice", "scan", "slice", "slice", "scan")),
        ("slice_scan_study", ("slice", "scan", "study", "slice", "scan", "study")),
        (None, ("scan",) * 6),
    ],
)
def test_presets_expand_to_hlip_schedules(preset, expected):
    assert tiny_vision_config(num_hidden_layers=6, attention_levels=preset).block_attention_levels == expected


def test_study_config_round_trip(tmp_path):
    config = study_config(attention_levels=["slice", "study", "scan"], position_embedding_type="sincos")
    assert VoxViTConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    reloaded = VoxViTConfig.from_pretrained(tmp_path)
    assert reloaded.block_attention_levels == ("slice", "study", "scan") and reloaded.max_scans == 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(attention_levels=["scan", "volume", "study"]), r"`attention_levels` holds unknown levels \['volume'\]"),
        (dict(attention_levels=["scan", "study"]), r"`attention_levels` lists 2 levels but `num_hidden_layers` is 3"),
        (dict(attention_levels="scan_slice"), r"`attention_levels` preset 'scan_slice' is unknown"),
        (dict(position_embedding_type="rope"), r"`position_embedding_type` must be one of"),
        (dict(max_scans=0), r"`max_scans` must be an int >= 1"),
    ],
)
def test_bad_study_config_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        study_config(**overrides)


@pytest.mark.parametrize("position_embedding_type", ["learned", "sincos"])
def test_one_scan_study_equals_the_single_scan_model_with_the_same_weights(position_embedding_type):
    study_model = seeded_model(study_config(attention_levels="scan_study", position_embedding_type=position_embedding_type))
    single_model = VoxViTModel(tiny_vision_config(num_hidden_layers=3, position_embedding_type=position_embedding_type))
    shared = {name: value for name, value in study_model.state_dict().items() if name != "scan_embeddings"}
    single_model.load_state_dict(shared, strict=True)
    single_model.eval()
    volume = torch.rand(2, 1, 8, 16, 16)
    with torch.no_grad():
        study = study_model(volume[:, None])
        single = single_model(volume)
    assert study.last_hidden_state.shape == (2, 1, 65, 32) and study.pooler_output.shape == (2, 32)
    torch.testing.assert_close(study.last_hidden_state[:, 0], single.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(study.pooler_output, single.pooler_output, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_one_scan_study_equals_a_plain_volume_for_every_schedule(preset):
    model = seeded_model(study_config(attention_levels=preset))
    volume = torch.rand(2, 1, 8, 16, 16)
    with torch.no_grad():
        study = model(volume[:, None])
        single = model(volume)
    assert single.last_hidden_state.shape == (2, 65, 32) and single.scan_mask is None
    torch.testing.assert_close(study.last_hidden_state[:, 0], single.last_hidden_state, atol=1e-6, rtol=0)


def test_scan_attention_encodes_each_scan_like_the_single_scan_model():
    model = seeded_model(study_config(attention_levels=None))
    with torch.no_grad():
        model.scan_embeddings.zero_()
        study = torch.rand(2, 3, 1, 8, 16, 16)
        output = model(study).last_hidden_state  # (B, S, 1 + N, E)
        per_scan = torch.stack([model(study[:, index]).last_hidden_state for index in range(3)], dim=1)
    torch.testing.assert_close(output, per_scan, atol=1e-5, rtol=0)


def test_slice_attention_stays_within_one_axial_slab():
    model = seeded_model(study_config(attention_levels=["slice"] * 3))
    volume = torch.rand(1, 1, 8, 16, 16)
    changed = volume.clone()
    changed[:, :, :2] = torch.rand(1, 1, 2, 16, 16)  # depth 0..1 = patch slab 0 (patch depth 2)
    with torch.no_grad():
        before = model(volume).last_hidden_state[0, 1:].reshape(4, 16, 32)  # (N, E) -> (D', H' W', E)
        after = model(changed).last_hidden_state[0, 1:].reshape(4, 16, 32)
    assert not torch.allclose(before[0], after[0], atol=1e-4)
    torch.testing.assert_close(before[1:], after[1:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("levels, scan_zero_changes", [(["scan", "slice", "scan"], False), (["scan", "study", "scan"], True)])
def test_only_study_attention_mixes_scans(levels, scan_zero_changes):
    model = seeded_model(study_config(attention_levels=levels))
    study = torch.rand(1, 2, 1, 8, 16, 16)
    changed = study.clone()
    changed[:, 1] = torch.rand(1, 8, 16, 16)
    with torch.no_grad():
        before = model(study).last_hidden_state[:, 0]
        after = model(changed).last_hidden_state[:, 0]
    assert (not torch.allclose(before, after, atol=1e-5)) == scan_zero_changes


def test_padded_scans_change_nothing_and_equal_the_shorter_study():
    model = seeded_model(study_config())
    study = torch.rand(2, 3, 1, 8, 16, 16)
    scan_mask = torch.tensor([[True, True, False], [True, True, False]])
    noise = study.clone()
    noise[:, 2] = torch.rand(2, 1, 8, 16, 16)
    with torch.no_grad():
        padded = model(study, scan_mask=scan_mask)
        other_padding = model(noise, scan_mask=scan_mask)
        shorter = model(study[:, :2])
    assert padded.scan_mask.tolist() == scan_mask.tolist()
    torch.testing.assert_close(padded.last_hidden_state[:, :2], shorter.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.pooler_output, shorter.pooler_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(other_padding.pooler_output, padded.pooler_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(shorter.pooler_output, shorter.last_hidden_state[:, :, 0].mean(dim=1))


def test_scan_order_embedding_breaks_permutation_symmetry_only_when_nonzero():
    model = seeded_model(study_config())
    study = torch.rand(1, 3, 1, 8, 16, 16)
    order = torch.tensor([2, 0, 1])
    with torch.no_grad():
        ordered = model(study[:, order]).last_hidden_state
        assert not torch.allclose(ordered, model(study).last_hidden_state[:, order], atol=1e-4)
        model.scan_embeddings.zero_()
        torch.testing.assert_close(
            model(study[:, order]).last_hidden_state, model(study).last_hidden_state[:, order], atol=1e-5, rtol=0
        )


def test_sincos_position_embeddings_are_fixed_distinct_and_saved(tmp_path):
    table = sincos_position_embeddings((4, 4, 4), 32)  # 5 sine + 5 cosine channels per axis, 2 zero channels
    assert table.shape == (1, 64, 32)
    assert torch.equal(table[0, 0, :30], torch.tensor(([0.0] * 5 + [1.0] * 5) * 3))
    assert torch.equal(table[..., 30:], torch.zeros(1, 64, 2))
    assert torch.cdist(table[0], table[0]).add(torch.eye(64)).min() > 0.1  # every position is told apart
    model = seeded_model(study_config(position_embedding_type="sincos"))
    assert "patch_embedding.position_embeddings" not in dict(model.named_parameters())
    torch.testing.assert_close(model.patch_embedding.position_embeddings, table)
    model.save_pretrained(tmp_path)
    reloaded = VoxViTModel.from_pretrained(tmp_path).eval()
    study = torch.rand(1, 2, 1, 8, 16, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(study).last_hidden_state, model(study).last_hidden_state)


def test_every_trainable_parameter_gets_a_gradient_in_study_mode():
    model = seeded_model(study_config(position_embedding_type="sincos")).train()
    output = model(torch.rand(2, 4, 1, 8, 16, 16), scan_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    (output.pooler_output.square().mean() + output.last_hidden_state.square().mean()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_study_hidden_states_and_attentions_have_group_shapes():
    model = seeded_model(study_config())
    with torch.no_grad():
        output = model(torch.rand(2, 3, 1, 8, 16, 16), output_hidden_states=True, output_attentions=True)
    assert [tuple(state.shape) for state in output.hidden_states] == [(2, 3, 65, 32)] * 4
    slice_weights, scan_weights, study_weights = output.attentions
    assert slice_weights.shape == (2 * 3 * 4, 4, 17, 17)
    assert scan_weights.shape == (2 * 3, 4, 65, 65)
    assert study_weights.shape == (2, 4, 195, 195)
    torch.testing.assert_close(study_weights.sum(-1), torch.ones(2, 4, 195))


@pytest.mark.parametrize(
    "shape, scan_mask, message",
    [
        ((1, 5, 1, 8, 16, 16), None, r"holds 5 scans but `max_scans` of this VoxViT config is 4"),
        ((1, 2, 1, 8, 16, 12), None, r"\(B, S, 1, 8, 16, 16\).*got \(1, 2, 1, 8, 16, 12\)"),
        ((2, 2, 1, 8, 16, 16), [[1, 1]], r"scan_mask must have shape \(B, S\) = \(2, 2\), got \(1, 2\)"),
        ((2, 2, 1, 8, 16, 16), [[1, 0], [0, 0]], r"every scan of a study as padding"),
    ],
)
def test_bad_study_input_is_a_clear_error(shape, scan_mask, message):
    model = VoxViTModel(study_config())
    with pytest.raises(ValueError, match=message):
        model(torch.rand(*shape), scan_mask=None if scan_mask is None else torch.tensor(scan_mask))


def test_single_scan_config_rejects_studies_of_several_scans():
    model = VoxViTModel(tiny_vision_config())
    assert model.scan_embeddings is None and "scan_embeddings" not in model.state_dict()
    with pytest.raises(ValueError, match="`max_scans`"):
        model(torch.rand(1, 2, 1, 8, 16, 16))


# Study-level data: phantom studies, their Hub rows, HLIP sampling and the collator feeding study mode.
SMALL_STUDY_SHAPE = (16, 48, 48)


def test_phantom_study_has_four_series_and_keeps_single_series_findings_in_one_series():
    from voxlm.data.hub_format import decode_array
    from voxlm.data.phantoms import generate_case
    from voxlm.data.phantom_studies import SERIES_KINDS, generate_study

    row = generate_study(8, shape=SMALL_STUDY_SHAPE, single_series_fraction=1.0)
    assert row == generate_study(8, shape=SMALL_STUDY_SHAPE, single_series_fraction=1.0)  # deterministic
    assert [item["description"] for item in row["series"]] == [kind[0] for kind in SERIES_KINDS]
    volumes = [decode_array(item["image"]) for item in row["series"]]
    assert [v.shape for v in volumes] == [SMALL_STUDY_SHAPE] * 3 + [(4, 24, 24)]
    case = generate_case(8, shape=SMALL_STUDY_SHAPE)
    assert row["label"] == case.finding.kind and row["report"] == case.report and len(row["finding_series"]) == 1
    shown = row["finding_series"][0]
    assert shown != 1  # a bleed is never hidden in the bone window only
    lesion = case.finding.mask
    for index in (0, 1):  # the two non-contrast thin series: the lesion's HU appear only where it was drawn
        has_lesion = np.allclose(volumes[index][lesion], case.volume[lesion])
        assert has_lesion == (index == shown), index


def test_post_contrast_and_thick_series_change_what_they_should():
    from voxlm.data.phantoms import generate_case
    from voxlm.data.phantom_studies import post_contrast, thick_slices

    head = generate_case(1, shape=SMALL_STUDY_SHAPE, normal_fraction=1.0).volume
    enhanced = post_contrast(head)
    brain = (head > 14) & (head < 550)
    assert np.all(enhanced[brain] >= head[brain] + 6) and np.array_equal(enhanced[~brain], head[~brain])
    thick = thick_slices(head)
    assert thick.shape == (4, 24, 24)
    np.testing.assert_allclose(thick[0, 0, 0], head[:4, :2, :2].mean(), rtol=1e-6)


def test_sampling_caps_series_and_shuffles_report_sentences():
    from voxlm.data.hub_format import StudyError
    from voxlm.data.study_sampling import StudySampling, sample_study

    row = dict(id="s", series=[dict(description=str(i)) for i in range(4)], report="One. Two! Three? Four.")
    rng = np.random.default_rng(0)
    samples = [sample_study(row, StudySampling(max_series=2), rng) for _ in range(40)]
    assert {len(s["series"]) for s in samples} == {1, 2}
    assert all([row["series"][i] for i in s["series_indices"]] == s["series"] for s in samples)
    assert len({tuple(s["series_indices"]) for s in samples}) > 6  # random subsets in random order
    assert {tuple(sorted(s["report"].split(" "))) for s in samples} == {("Four.", "One.", "Three?", "Two!")}
    assert len({s["report"] for s in samples}) > 3
    fixed = sample_study(row, StudySampling(max_series=3, random_subset=False, shuffle_sentences=False), rng)
    assert fixed["series_indices"] == [0, 1, 2] and fixed["report"] == row["report"]
    with pytest.raises(StudyError, match="max_series must be >= 1"):
        StudySampling(max_series=0)
    with pytest.raises(StudyError, match="study 'empty': `series` is empty"):
        sample_study(dict(id="empty", series=[], report="x"), StudySampling(), rng)


def test_study_rows_stream_from_parquet_and_collate_into_study_mode(tmp_path):
    from datasets import load_dataset

    from voxlm.processing import VoxVolumeProcessor
    from voxlm.data.hub_format import write_study_dataset
    from voxlm.data.phantom_studies import generate_study
    from voxlm.data.study_sampling import StudyCollator, StudySampling

    rows = [generate_study(seed, shape=SMALL_STUDY_SHAPE) for seed in range(3)]
    for row in rows:
        row["split"] = "train"
    write_study_dataset(rows, tmp_path, "Phantom studies.")
    streamed = list(load_dataset(str(tmp_path), "study", split="train", streaming=True))
    assert [row["id"] for row in streamed] == [row["id"] for row in rows]
    assert streamed[0]["series"][3]["image"] == rows[0]["series"][3]["image"]
    assert streamed[0]["finding_series"] == rows[0]["finding_series"]

    collator = StudyCollator(VoxVolumeProcessor(image_size=(8, 16, 16)), StudySampling(max_series=3), seed=0)
    batch = collator(streamed)
    counts = batch["scan_mask"].sum(dim=1)
    assert batch["pixel_values"].shape == (3, int(counts.max()), 1, 8, 16, 16)
    assert counts.max() <= 3 and counts.min() >= 1
    for index, count in enumerate(counts.tolist()):  # padding is zeros, real series are windowed into [0, 1]
        assert batch["pixel_values"][index, count:].abs().sum() == 0
        assert batch["pixel_values"][index, :count].amax(dim=(1, 2, 3, 4)).gt(0.5).all()
    model = seeded_model(study_config())
    with torch.no_grad():
        output = model(batch["pixel_values"], scan_mask=batch["scan_mask"])
    assert output.pooler_output.shape == (3, 32) and torch.isfinite(output.pooler_output).all()
