"""Careless runs and hostile checkpoints: a pickle planted in a checkpoint never runs, a broken newest checkpoint falls
back to the previous one, no run or dataset overwrites another, an output never replaces its input, a corrupt model
file and settings that cannot work end with a message, and fine-tuning survives one bad row in twenty of every kind
and reports them."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from test_mllm_training import TINY_MODEL, settings

from voxlm.cli import main
from voxlm.training import finetune, pretrain_projector
from voxlm.training.checkpoints import CheckpointError
from voxlm.training.settings import RunSettings, check_run_settings
from voxlm.data import encode_array, write_dataset, write_phantom_dataset
from voxlm.data.phantom_dataset import case_rows
from voxlm.data.phantoms import generate_case


class Payload:
    """Unpickling this writes `marker`: what a hostile checkpoint file would run instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "executed")


@pytest.fixture(scope="module")
def align_run(tmp_path_factory):
    """A 2-step align run with a checkpoint after each step: `(data, run folder, its settings)`."""
    root = tmp_path_factory.mktemp("careless")
    write_phantom_dataset(root / "data", num_cases=4, shape=(16, 32, 32), rows_per_shard=16, test_fraction=0.0)
    common = [f"data.path={root / 'data'}", "data.tasks={vqa: 1.0}", "run.batch_size=2", "run.tracker=null",
              "run.checkpoint_every=1", *TINY_MODEL]
    pretrain_projector.train(settings([*common, "run.max_steps=2", f"run.output_dir={root / 'run'}"]))
    return root, root / "run", common


def copy_run(align_run, tmp_path) -> Path:
    _, run, _ = align_run
    shutil.copytree(run / "checkpoints", tmp_path / "run" / "checkpoints")
    return tmp_path / "run"


def history_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "align_history.jsonl").read_text().splitlines()]


def test_checkpoints_hold_no_pickle_and_mark_their_step(align_run):
    _, run, _ = align_run
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["checkpoint_0", "checkpoint_1"]
    for folder in checkpoints:
        assert not list(folder.glob("*.pkl")), sorted(p.name for p in folder.iterdir())
        assert (folder / "model.safetensors").is_file() and (folder / "rng_state_0.json").is_file()
    assert json.loads((checkpoints[-1] / "voxlm_state.json").read_text()) == {"step": 2}


def test_a_planted_pickle_never_runs_and_resume_falls_back_to_the_previous_checkpoint(align_run, tmp_path, caplog):
    _, _, common = align_run
    run = copy_run(align_run, tmp_path)
    marker = tmp_path / "payload-ran"
    newest = run / "checkpoints" / "checkpoint_1"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
        (newest / name).write_bytes(pickle.dumps(Payload(marker)))
    torch.save(Payload(marker), newest / "optimizer.bin")
    pretrain_projector.train(settings([*common, "run.max_steps=3", f"run.output_dir={run}", "run.resume=true"]))
    assert not marker.exists()
    assert "Cannot resume from" in caplog.text and "pickles, which voxlm never writes" in caplog.text
    assert history_steps(run) == [2, 3]  # resumed from checkpoint_0, at step 1
    assert (run / "checkpoints" / "checkpoint_3" / "voxlm_state.json").is_file()  # numbered after every folder


def test_a_tensor_file_holding_code_is_refused_by_the_weights_only_loader(align_run, tmp_path):
    _, _, common = align_run
    run = copy_run(align_run, tmp_path)
    marker = tmp_path / "payload-ran"
    for folder in (run / "checkpoints").iterdir():
        torch.save(Payload(marker), folder / "optimizer.bin")
    (run / "checkpoints" / "checkpoint_0" / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="no checkpoint can be resumed from: checkpoint_1: a tensor file holds "
                                              "other Python objects.*; checkpoint_0: SafetensorError"):
        pretrain_projector.train(settings([*common, "run.max_steps=3", f"run.output_dir={run}", "run.resume=true"]))
    assert not marker.exists()


def test_an_interrupted_save_is_skipped(align_run, tmp_path):
    _, _, common = align_run
    run = copy_run(align_run, tmp_path)
    (run / "checkpoints" / "checkpoint_1" / "voxlm_state.json").unlink()
    (run / "checkpoints" / "checkpoint_1" / "model.safetensors").write_bytes(b"half written")
    pretrain_projector.train(settings([*common, "run.max_steps=2", f"run.output_dir={run}", "run.resume=true"]))
    assert history_steps(run) == [2]


def test_a_second_run_into_the_same_folder_needs_resume_or_overwrite(align_run):
    _, run, common = align_run
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="already holds checkpoints, align_history.jsonl, .*--resume.*--overwrite"):
        pretrain_projector.train(settings([*common, "run.max_steps=1", f"run.output_dir={run}"]))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    with pytest.raises(ValueError, match="exclude each other"):
        pretrain_projector.train(settings([*common, f"run.output_dir={run}", "run.resume=true",
                                           "run.overwrite=true"]))


def test_overwrite_replaces_the_run(align_run, tmp_path):
    _, _, common = align_run
    run = copy_run(align_run, tmp_path)
    (run / "align_history.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    pretrain_projector.train(settings([*common, "run.max_steps=1", "run.checkpoint_every=0", f"run.output_dir={run}",
                                       "run.overwrite=true"]))
    assert history_steps(run) == [1]
    assert not (run / "checkpoints").exists()


def test_settings_that_cannot_train_are_refused(align_run, tmp_path):
    _, _, common = align_run
    with pytest.raises(ValueError, match="run.max_steps must be at least 1, got -1"):
        pretrain_projector.train(settings([*common, "run.max_steps=-1", f"run.output_dir={tmp_path}"]))
    for name in ("batch_size", "gradient_accumulation_steps"):
        with pytest.raises(ValueError, match=f"run.{name} must be at least 1, got 0"):
            check_run_settings(RunSettings(**{name: 0}))
    with pytest.raises(ValueError, match=r"run.max_bad_fraction must be in \[0, 1\], got 1.5"):
        check_run_settings(RunSettings(max_bad_fraction=1.5))


def test_a_dataset_is_never_mixed_with_the_one_its_folder_held(tmp_path):
    from datasets import load_dataset

    write_phantom_dataset(tmp_path, num_cases=6, shape=(8, 16, 16), rows_per_shard=4, test_fraction=0.0)
    card = (tmp_path / "README.md").read_text()
    with pytest.raises(ValueError, match="already holds data, README.md; pass --overwrite"):
        write_phantom_dataset(tmp_path, num_cases=1, shape=(8, 16, 16), test_fraction=0.0)
    assert (tmp_path / "README.md").read_text() == card
    write_phantom_dataset(tmp_path, num_cases=1, shape=(8, 16, 16), test_fraction=0.0, overwrite=True)
    rows = load_dataset(str(tmp_path), "vqa", split="train")
    assert set(rows["patient_id"]) == {generate_case(0, shape=(8, 16, 16)).case_id}


def test_voxlm_data_phantoms_refuses_a_folder_that_holds_a_dataset(tmp_path):
    assert main(["data", "phantoms", "--n", "1", "--size", "8", "16", "16", "--out", str(tmp_path)]) == 0
    with pytest.raises(ValueError, match="pass --overwrite"):
        main(["data", "phantoms", "--n", "1", "--size", "8", "16", "16", "--out", str(tmp_path)])
    assert main(["data", "phantoms", "--n", "1", "--size", "8", "16", "16", "--out", str(tmp_path), "--overwrite"]) == 0


def test_predict_never_writes_its_mask_over_the_input(tmp_path):
    volume = tmp_path / "ct.npy"
    volume.write_bytes(encode_array(generate_case(0, shape=(8, 16, 16)).volume))
    before = volume.read_bytes()
    for target in (volume, tmp_path / "." / "ct.npy"):
        with pytest.raises(SystemExit, match="would overwrite the input ct.npy"):
            main(["predict", str(volume), "--question", "Segment the lesion.", "--mask-out", str(target)])
    assert volume.read_bytes() == before


def test_a_corrupt_model_file_ends_predict_with_a_message(align_run, tmp_path):
    _, run, _ = align_run
    shutil.copytree(run / "final", tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    volume = tmp_path / "ct.npy"
    volume.write_bytes(encode_array(generate_case(0, shape=(8, 16, 16)).volume))
    with pytest.raises(SystemExit, match="weights in .* cannot be read: a truncated or corrupt safetensors file"):
        main(["predict", str(volume), "--question", "Is there a bleed?", "--model", str(tmp_path / "model")])


def test_evaluate_refuses_to_score_no_samples():
    from voxlm.data.held_out import held_out_samples

    with pytest.raises(ValueError, match="limit must be at least 1 sample, got 0"):
        held_out_samples("unused", "vqa-closed", None, limit=0)


def bad_row(row: dict, kind: str) -> dict:
    """`row` broken at one step of the pipeline (or, for `truncated`, with an answer far beyond the context)."""
    if kind == "decode":
        return {**row, "image": b"\x93NUMPY truncated"}
    if kind == "preprocess":
        return {**row, "image": encode_array(torch.zeros(8, 16, 16).numpy())}  # constant: nothing to see
    if kind == "tokenize":
        return {**row, "question": "Is <im_patch> bleeding?"}
    if kind == "collate":
        return {**row, "answer": None}
    return {**row, "answer": "bleeding " * 5000}


def test_finetuning_survives_one_bad_row_in_twenty_of_each_kind_and_reports_them(align_run, tmp_path):
    rows = [row for seed in range(8) for row in case_rows(generate_case(seed, shape=(16, 32, 32)), "train")
            if row["question_type"] in ("closed", "open")][:40]
    assert len(rows) == 40
    kinds = ("decode", "preprocess", "tokenize", "collate", "truncated")
    rows = [bad_row(row, kinds[index % 20]) if index % 20 < len(kinds) else row for index, row in enumerate(rows)]
    write_dataset(rows, tmp_path / "data", "bad rows", rows_per_shard=10)
    # Batches of one: a batch of only bad rows trains no step, so the 32 usable rows are exactly one epoch.
    finetune.train(settings([
        f"init_from={align_run[1] / 'final'}", f"data.path={tmp_path / 'data'}", "data.tasks={vqa: 1.0}",
        "run.batch_size=1", "run.tracker=null", "run.max_steps=32", f"run.output_dir={tmp_path / 'run'}",
        "lora.r=4", "lora.alpha=8",
    ]))
    report = json.loads((tmp_path / "run" / "finetune_bad_rows.json").read_text())
    assert report == {"seen": 40, "bad": 8, "by_kind": {kind: 2 for kind in kinds}}


def test_a_stream_of_mostly_bad_rows_stops_with_the_counts(tmp_path):
    rows = [row for seed in range(6) for row in case_rows(generate_case(seed, shape=(16, 32, 32)), "train")
            if row["question_type"] == "closed"][:40]
    rows = [bad_row(row, "decode") if index % 2 else row for index, row in enumerate(rows)]
    write_dataset(rows, tmp_path / "data", "bad rows")
    with pytest.raises(ValueError, match=r"of the \d+ rows seen could not be used \(decode \d+\), more than "
                                         r"run.max_bad_fraction=0.25"):
        pretrain_projector.train(settings([
            f"data.path={tmp_path / 'data'}", "data.tasks={vqa: 1.0}", "run.batch_size=2", "run.tracker=null",
            "run.max_steps=40", f"run.output_dir={tmp_path / 'run'}", *TINY_MODEL,
        ]))
