"""Held-out samples of an evaluation task: the rows of a dataset config in voxlm's format that a task scores,
preprocessed by the model's own processor (`voxlm evaluate` and the quickstart draw the same samples)."""

from __future__ import annotations

from itertools import islice

from .streaming import PreprocessedStream, stream_rows

TASKS = {
    # task: (dataset config, question type filter)
    "vqa-closed": ("vqa", "closed"),
    "vqa-open": ("vqa", "open"),
    "report": ("cap", "report"),
    "rec": ("pos", "rec"),
    "reg": ("pos", "reg"),
    "seg": ("seg", "seg"),
    "refseg": ("refseg", "refseg"),
    "retrieval": ("cap", "report"),
}


def held_out_samples(data: str, task: str, volume_processor, limit: int | None, split: str = "test",
                     shuffle_buffer: int = 0) -> list[dict]:
    """The first `limit` (`None`: all) preprocessed samples of a task's rows in `split`: in stored order, or with
    `shuffle_buffer` drawn through a fixed shuffle (seed 0) so that they spread over the split's patients (stored
    order puts a patient's questions side by side; the buffer holds that many rows, image bytes included, in
    memory)."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {sorted(TASKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 sample, got {limit}")
    config, question_type = TASKS[task]
    rows = stream_rows(data, config, split, shuffle_buffer=shuffle_buffer, seed=0)
    rows = rows.filter(lambda row: row["question_type"] == question_type)
    return list(islice(PreprocessedStream(rows, volume_processor), limit))
