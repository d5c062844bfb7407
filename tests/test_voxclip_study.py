"""VoxCLIP on whole studies (HLIP): study features (one-scan equivalence, padded scans), the loss on studies, the
collator's study mode, and `pretrain-clip` with `data.config=study` saving a model that loads."""

import json
import math

import pytest
import torch
from tiny_models import tiny_vision_config

import voxlm  # noqa: F401  (registers the Auto classes)
from voxlm.modeling import VoxCLIPConfig, VoxCLIPModel

TINY_TEXT = dict(model_type="bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                 vocab_size=99, max_position_embeddings=64)
STUDY_VISION = dict(max_scans=3, attention_levels=["scan", "study"])


def study_clip(pooling: str = "max", **weights) -> VoxCLIPModel:
    """A tiny study-mode VoxCLIP: two blocks (scan, then study attention), up to 3 scans."""
    torch.manual_seed(0)
    config = VoxCLIPConfig(vision_config=tiny_vision_config(pooling=pooling, **STUDY_VISION), text_config=TINY_TEXT,
                           projection_dim=8, **weights)
    return VoxCLIPModel(config).eval()


@pytest.mark.parametrize("pooling", ["cls", "max"])
def test_one_scan_study_gives_the_volume_features(pooling):
    model = study_clip(pooling)
    volumes = torch.rand(2, 1, 8, 16, 16)
    with torch.no_grad():
        study = model.get_image_features(volumes[:, None], scan_mask=torch.ones(2, 1, dtype=torch.bool))
        single = model.get_image_features(volumes)
    assert study.shape == (2, 8)
    torch.testing.assert_close(study, single, atol=1e-5, rtol=0)


def test_padded_scans_do_not_change_the_study_features():
    model = study_clip()
    studies = torch.rand(2, 3, 1, 8, 16, 16)
    scan_mask = torch.tensor([[True, True, False], [True, True, True]])
    noisy = studies.clone()
    noisy[0, 2] = torch.rand(1, 8, 16, 16)  # other content in the padded scan
    with torch.no_grad():
        padded = model.get_image_features(studies, scan_mask)
        shorter = model.get_image_features(studies[:1, :2])
        unmasked = model.get_image_features(studies)  # the padding read as a real scan
        torch.testing.assert_close(model.get_image_features(noisy, scan_mask), padded, atol=1e-6, rtol=0)
    assert padded.shape == (2, 8)
    torch.testing.assert_close(padded[:1], shorter, atol=1e-5, rtol=0)
    assert not torch.allclose(unmasked[0], padded[0], atol=1e-4)
    torch.testing.assert_close(unmasked[1], padded[1], atol=1e-6, rtol=0)  # the full study is untouched


def test_forward_on_studies_trains_the_text_side_terms_without_reading_padding():
    model = study_clip(mlm_loss_weight=1.0, report_gen_loss_weight=1.0).train()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 99, (2, 6), generator=generator)
    mlm_labels = torch.full_like(input_ids, -100)
    mlm_labels[:, 2] = input_ids[:, 2]
    studies = torch.rand(2, 3, 1, 8, 16, 16, generator=generator).requires_grad_(True)
    scan_mask = torch.tensor([[True, False, False], [True, True, True]])
    output = model(input_ids=input_ids, pixel_values=studies, scan_mask=scan_mask, mlm_input_ids=input_ids,
                   mlm_labels=mlm_labels, return_loss=True)
    assert output.image_embeds.shape == (2, 8) and output.logits_per_image.shape == (2, 2)
    for name in ("contrastive_loss", "mlm_loss", "report_gen_loss"):
        assert math.isfinite(getattr(output, name).item()), name
    output.loss.backward()
    assert studies.grad[0, 1:].abs().max() == 0  # nothing reads the padded scans ...
    assert studies.grad[0, 0].abs().max() > 0  # ... and every real scan is read
    assert all(studies.grad[1, index].abs().max() > 0 for index in range(3))
    assert model.vision_model.scan_embeddings.grad.abs().max() > 0


def test_masked_volume_terms_refuse_studies():
    config = VoxCLIPConfig(vision_config=tiny_vision_config(max_scans=2), text_config=TINY_TEXT, projection_dim=8,
                           mim_loss_weight=1.0, volume_decoder_hidden_size=16, volume_decoder_heads=2,
                           volume_decoder_intermediate_size=32)
    model = VoxCLIPModel(config)
    with pytest.raises(ValueError, match="reconstruct single volumes"):
        model(input_ids=torch.randint(5, 99, (2, 6)), pixel_values=torch.rand(2, 2, 1, 8, 16, 16), return_loss=True)


# --- data and the pretrain-clip stage ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study_rows():
    from voxlm.data.phantom_studies import generate_study

    return [generate_study(seed, shape=(8, 32, 32)) for seed in range(8)]


def test_collator_batches_sampled_studies_with_their_shuffled_reports(study_rows, minilm_dir):
    from transformers import AutoTokenizer

    from voxlm.processing import VoxVolumeProcessor
    from voxlm.data import ContrastiveCollator
    from voxlm.data.study_sampling import StudyCollator, StudySampling

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    studies = StudyCollator(VoxVolumeProcessor(image_size=(8, 16, 16)), StudySampling(max_series=3), seed=0)
    batch = ContrastiveCollator(tokenizer, seed=0, studies=studies)(study_rows[:4])
    num_scans = batch["scan_mask"].sum(dim=1)
    assert batch["pixel_values"].shape == (4, int(num_scans.max()), 1, 8, 16, 16)
    assert num_scans.min() >= 1 and num_scans.max() <= 3 and batch["has_report"].all()
    assert batch["pixel_values"][~batch["scan_mask"]].abs().sum() == 0  # padding is zeros
    for ids, row in zip(batch["input_ids"], study_rows[:4]):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert sorted(text.split()) == sorted(tokenizer.decode(tokenizer(row["report"])["input_ids"],
                                                               skip_special_tokens=True).split())
    with pytest.raises(ValueError, match="num_patches"):
        ContrastiveCollator(tokenizer, num_patches=64, studies=studies)


# Study-capable but with scan attention only (the masked-volume terms' condition on the encoder), and a tiny decoder.
SCAN_ONLY_VISION = ("{image_size: [8,16,16], patch_size: [2,4,4], hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
                    "num_attention_heads: 4, max_scans: 4}")
TINY_DECODER = {"model.volume_decoder_hidden_size": "16", "model.volume_decoder_heads": "2",
                "model.volume_decoder_intermediate_size": "32"}


def study_overrides(data_dir, text_dir, output_dir) -> dict:
    return {
        "model.vision_config": "{image_size: [8,16,16], patch_size: [2,4,4], hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
                               "num_attention_heads: 4, pooling: max, max_scans: 4, attention_levels: [scan, study]}",
        "model.projection_dim": "16",
        "pretrained.text": str(text_dir),
        "pretrained.text_dropout": "0.0",
        "data.path": str(data_dir), "data.config": "study", "data.max_series": "4", "data.shuffle_buffer": "0",
        "run.max_steps": "3", "run.batch_size": "4", "run.tracker": "null", "run.learning_rate": "1e-3",
        "run.output_dir": str(output_dir),
    }


def test_pretrain_clip_on_studies_saves_a_study_model_that_loads(study_rows, tmp_path, tiny_text_encoder_dir):
    from accelerate.utils import set_seed
    from transformers import AutoModel

    from voxlm.training import train_clip
    from voxlm.data.hub_format import write_study_dataset
    from voxlm.training.settings import load_settings

    rows = [{**row, "split": "train"} for row in study_rows]
    write_study_dataset(rows, tmp_path / "studies", "tiny phantom studies", rows_per_shard=4)
    settings = load_settings(train_clip.ClipSettings, None,
                             study_overrides(tmp_path / "studies", tiny_text_encoder_dir, tmp_path / "run"))
    final = train_clip.train(settings)
    records = [json.loads(line) for line in (tmp_path / "run" / "pretrain-clip_history.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2, 3]
    assert all(math.isfinite(record["contrastive_loss"]) for record in records)
    loaded = AutoModel.from_pretrained(final).eval()
    assert loaded.config.vision_config.max_scans == 4
    # The scan-order embeddings train only on studies of more than one scan: the run fed it studies.
    set_seed(settings.run.seed)
    untrained, _, _ = train_clip.build_clip(settings.pretrained, settings.model)
    assert not torch.allclose(loaded.vision_model.scan_embeddings, untrained.vision_model.scan_embeddings)
    with torch.no_grad():
        features = loaded.get_image_features(torch.rand(2, 4, 1, 8, 16, 16),
                                             torch.tensor([[True] * 4, [True, True, False, False]]))
    assert features.shape == (2, 16) and torch.isfinite(features).all()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data.config": "studies"}, "data.config must be"),
        ({"data.max_series": "5"}, r"data.max_series \(5\) must lie in \[1, model.vision_config.max_scans = 4\]"),
        ({"model.mim_loss_weight": "1.0", "model.vision_config": SCAN_ONLY_VISION, **TINY_DECODER},
         "mim_loss_weight reconstruct single volumes"),
        ({"data.image_only_path": "elsewhere"}, "data.image_only_path"),
    ],
)
def test_study_settings_that_cannot_work_name_the_field(overrides, message, tmp_path, tiny_text_encoder_dir):
    from voxlm.training import train_clip
    from voxlm.training.settings import load_settings

    values = {**study_overrides(tmp_path, tiny_text_encoder_dir, tmp_path / "run"), **overrides}
    settings = load_settings(train_clip.ClipSettings, None, values)
    model, _, _ = train_clip.build_clip(settings.pretrained, settings.model)
    with pytest.raises(ValueError, match=message):
        train_clip.check_study_settings(settings, model)


@pytest.mark.parametrize("random_series", [True, False])
def test_pretrain_clip_samples_series_as_the_data_settings_say(study_rows, minilm_dir, random_series):
    from transformers import AutoTokenizer

    from voxlm.processing import VoxVolumeProcessor
    from voxlm.training.train_clip import ClipDataSettings, clip_collator

    data = ClipDataSettings(config="study", max_series=3, random_series=random_series)
    collator = clip_collator(data, VoxVolumeProcessor(image_size=(8, 16, 16)), AutoTokenizer.from_pretrained(minilm_dir),
                             mlm_probability=0.0, num_patches=None, seed=0)
    num_scans = collator(study_rows)["scan_mask"].sum(dim=1).tolist()  # the phantom studies hold 4 series each
    if random_series:
        assert len(set(num_scans)) > 1 and max(num_scans) <= 3  # HLIP: a random number of series per study
    else:
        assert num_scans == [3] * len(study_rows)  # the first 3 series of every study
