"""Phantoms whose labels agree with their images; the Hub format; streaming splits and bad-row skipping."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from datasets import load_dataset

from voxlm.processing import VoxLMProcessor, VoxVolumeProcessor, add_voxlm_tokens, parse_boxes
from voxlm.data import (
    ContrastiveCollator,
    InstructionCollator,
    PreprocessedStream,
    generate_case,
    stream_rows,
    write_phantom_dataset,
)
from voxlm.data.hub_format import SCHEMA, write_shards
from voxlm.data.streaming import STREAM_CLOSE_SLEEP_S
from voxlm.data.phantoms import HU_BLOOD, SIZES, box_of

CASES = [generate_case(seed, shape=(32, 64, 64)) for seed in range(60)]
ABNORMAL = [case for case in CASES if case.finding is not None]


def test_generation_is_deterministic_and_fast_enough_to_be_the_default():
    again = generate_case(7, shape=(32, 64, 64))
    np.testing.assert_array_equal(again.volume, CASES[7].volume)
    assert again.report == CASES[7].report and again.qa == CASES[7].qa
    assert {None} < {None if c.finding is None else c.finding.kind for c in CASES}


@pytest.mark.parametrize("case", ABNORMAL, ids=lambda case: case.case_id)
def test_lesion_in_the_image_agrees_with_its_labels(case):
    finding, volume = case.finding, case.volume
    mask = finding.mask
    assert mask.sum() >= 30, "too small to survive downsampling"
    values = volume[mask]
    if finding.is_hemorrhage:  # blood is hyperdense, visible in the brain window
        assert np.all(values == HU_BLOOD[finding.kind])
    else:  # a fracture is a gap of soft-tissue density in bone
        assert values.max() < 200
    centroid_w = np.argwhere(mask)[:, 2].mean() / volume.shape[2]
    if finding.side == "left":
        assert centroid_w < 0.5
    elif finding.side == "right":
        assert centroid_w > 0.5
    else:
        assert mask[..., : volume.shape[2] // 2].any() and mask[..., volume.shape[2] // 2 :].any()
    assert finding.box == box_of(mask)
    report = case.report.lower()
    noun = "fracture" if finding.kind == "fracture" else finding.kind
    assert noun in report and finding.size in report
    assert ("both" if finding.side == "bilateral" else finding.side) in report
    answers = {qa["question"]: qa["answer"] for qa in case.qa}
    assert answers["Is there an intracranial hemorrhage?"] == ("Yes." if finding.is_hemorrhage else "No.")
    assert answers["Is there a skull fracture?"] == ("Yes." if finding.kind == "fracture" else "No.")
    assert (finding.midline_shift_mm > 0) == (answers["Is there a midline shift?"] == "Yes.")


def test_larger_size_classes_draw_larger_lesions():
    by_kind_size = {}
    for seed in range(300):
        finding = generate_case(seed, shape=(32, 64, 64)).finding
        if finding is not None and finding.kind == "intraparenchymal":
            by_kind_size.setdefault(finding.size, []).append(finding.mask.sum())
    means = [np.mean(by_kind_size[size]) for size in SIZES]
    assert means[0] < means[1] < means[2]


def test_normal_cases_say_so():
    normal = [case for case in CASES if case.finding is None]
    for case in normal:
        answers = {qa["question"]: qa["answer"] for qa in case.qa}
        assert answers["Is there an intracranial hemorrhage?"] == "No."
        assert "no" in case.report.lower()


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(folder, num_cases=40, shape=(16, 48, 48), rows_per_shard=64)
    return folder


@pytest.mark.parametrize("config", ["cap", "vqa", "pos", "seg", "refseg"])
def test_every_config_streams_with_load_dataset(phantom_dir, config):
    rows = list(load_dataset(str(phantom_dir), config, split="train", streaming=True))
    assert rows and set(rows[0]) == set(SCHEMA.names)
    if config == "pos":
        rec = [row for row in rows if row["question_type"] == "rec"]
        assert parse_boxes(rec[0]["answer"]) == [pytest.approx(rec[0]["box"], abs=1e-3)]
    if config in ("seg", "refseg"):
        assert all(row["mask"] is not None and "[SEG]" in row["answer"] for row in rows)


def test_splits_are_by_patient(phantom_dir):
    patients = {}
    for split in ("train", "test"):
        for row in load_dataset(str(phantom_dir), "vqa", split=split, streaming=True):
            patients.setdefault(row["patient_id"], set()).add(split)
    assert len(patients) == 40 and all(len(splits) == 1 for splits in patients.values())
    assert any("test" in splits for splits in patients.values())


def test_two_processes_each_see_every_sample_exactly_once(phantom_dir):
    seen = [[row["id"] for row in stream_rows(phantom_dir, "vqa", "train", rank=rank, world_size=2)] for rank in (0, 1)]
    everything = [row["id"] for row in stream_rows(phantom_dir, "vqa", "train")]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(everything)


@pytest.mark.parametrize("limit", [None, 5])
def test_closing_a_stream_sleeps_briefly_and_restores_datasets_setting(phantom_dir, monkeypatch, limit):
    """`datasets` sleeps 5 s whenever a shuffled multi-shard stream closes; training closes one per epoch."""
    import datasets.config
    import datasets.iterable_dataset

    num_rows = len(list(stream_rows(phantom_dir, "vqa", "train")))
    sleeps = []
    monkeypatch.setattr(datasets.iterable_dataset.time, "sleep", sleeps.append)
    before = datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN
    rows = stream_rows(phantom_dir, "vqa", "train", shuffle_buffer=16)
    samples = list(PreprocessedStream(rows, VoxVolumeProcessor(image_size=(8, 16, 16)), limit=limit))
    assert len(samples) == (limit or num_rows)
    assert sleeps and max(sleeps) <= STREAM_CLOSE_SLEEP_S < before
    assert datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN == before


def test_planted_corrupt_rows_are_skipped_and_counted(phantom_dir, tmp_path, caplog):
    table = pq.read_table(next((phantom_dir / "data" / "vqa").glob("train-*.parquet")))
    rows = table.to_pylist()[:20]
    rows[3]["image"] = b"\x93NUMPY garbage"
    rows[7]["image"] = rows[7]["image"][:100]
    rows[11]["image"] = np.zeros((4, 4, 4), np.int16).tobytes()  # raw bytes, not an array file
    folder = tmp_path / "bad"
    write_shards(rows, folder / "data" / "vqa", "train", rows_per_shard=20)
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: vqa\n  data_files:\n  - split: train\n    path: data/vqa/train-*.parquet\n---\n"
    )
    stream = PreprocessedStream(stream_rows(folder, "vqa", "train"), VoxVolumeProcessor(image_size=(8, 16, 16)))
    samples = list(stream)
    assert len(samples) == 17 and stream.skipped == 3
    assert rows[3]["id"] in caplog.text and rows[11]["id"] in caplog.text


def test_a_corrupt_parquet_page_ends_the_pass_with_a_message_instead_of_the_run(phantom_dir, tmp_path, caplog):
    rows = pq.read_table(next((phantom_dir / "data" / "vqa").glob("train-*.parquet"))).to_pylist()[:12]
    folder = tmp_path / "bad"
    write_shards(rows, folder / "data" / "vqa", "train", rows_per_shard=12)
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: vqa\n  data_files:\n  - split: train\n    path: data/vqa/train-*.parquet\n---\n"
    )
    shard = next((folder / "data" / "vqa").glob("*.parquet"))
    page = pq.ParquetFile(shard).metadata.row_group(0).column(0).data_page_offset
    data = bytearray(shard.read_bytes())
    data[page : page + 30] = bytes(b ^ 0x5A for b in data[page : page + 30])  # the first page header
    shard.write_bytes(bytes(data))
    stream = PreprocessedStream(stream_rows(folder, "vqa", "train"), VoxVolumeProcessor(image_size=(8, 16, 16)))
    assert list(stream) == []
    assert "The row stream broke after 0 samples (OSError" in caplog.text


def test_dataloader_workers_and_collators(phantom_dir, smollm2_tokenizer, minilm_dir):
    from transformers import AutoTokenizer

    processor = VoxVolumeProcessor(image_size=(8, 32, 32))
    stream = PreprocessedStream(stream_rows(phantom_dir, "cap", "train", shuffle_buffer=16), processor)
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2,
                                         collate_fn=ContrastiveCollator(AutoTokenizer.from_pretrained(minilm_dir)))
    batches = list(loader)
    total = sum(len(batch["pixel_values"]) for batch in batches)
    train_patients = {row["patient_id"] for row in load_dataset(str(phantom_dir), "cap", split="train", streaming=True)}
    assert total == len(train_patients)
    assert batches[0]["pixel_values"].shape[1:] == (1, 8, 32, 32) and batches[0]["has_report"].all()

    add_voxlm_tokens(smollm2_tokenizer)
    text_processor = VoxLMProcessor(processor, smollm2_tokenizer, num_image_tokens=4)
    samples = list(PreprocessedStream(stream_rows(phantom_dir, "seg", "train"), text_processor, limit=2))
    samples += list(PreprocessedStream(stream_rows(phantom_dir, "vqa", "train"), text_processor, limit=1))
    batch = InstructionCollator(text_processor)(samples)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "seg_masks", "has_mask"}
    assert batch["has_mask"].tolist() == [True, True, False]
    assert batch["seg_masks"].shape == (3, 1, 8, 32, 32) and batch["seg_masks"][2].sum() == 0
    answer_tokens = batch["labels"][0][batch["labels"][0] != -100]
    assert smollm2_tokenizer.decode(answer_tokens).startswith(samples[0]["answer"])
