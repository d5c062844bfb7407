"""Streaming input: Hub-format rows -> decoded, preprocessed samples inside DataLoader workers.

Rows stream lazily with `datasets` (`streaming=True`), are split across processes with `split_dataset_by_node` and
across DataLoader workers by `datasets` itself (one worker per shard subset), shuffled in a buffer, then decoded and
preprocessed by the model's own `VoxVolumeProcessor` in the worker (and with a `VoxLMProcessor`, tokenized there
too). A row that cannot be decoded, preprocessed or tokenized is skipped, counted by kind and logged with its id:
training never dies on one bad sample.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager
from itertools import islice

import datasets.config
import pyarrow as pa
import torch
from datasets import load_dataset
from datasets.distributed import split_dataset_by_node

from voxlm.processing import VoxLMProcessor, VoxVolumeProcessor

from .hub_format import decode_array

logger = logging.getLogger(__name__)

# `datasets` sleeps `SLEEP_TIME_ON_THREADS_SHUTDOWN` (5 s) whenever an iterator over Parquet shards closes, to dodge an
# Arrow crash when the interpreter exits right after a scan (apache/arrow#39862). Training closes its stream once per
# epoch in the middle of a run, where 5 s per epoch doubled the quickstart's pre-training time; the Arrow report found
# 0.1 s enough even at exit.
STREAM_CLOSE_SLEEP_S = 0.1


@contextmanager
def short_stream_close_sleep():
    """Shorten `datasets`' sleep on closing a stream to `STREAM_CLOSE_SLEEP_S` inside the block, then restore it."""
    previous = datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = min(previous, STREAM_CLOSE_SLEEP_S)
    try:
        yield
    finally:
        datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = previous


TEXT_FIELDS = ("id", "patient_id", "question", "answer", "question_type", "question_category", "report", "choices",
               "box", "mask_label")


def stream_rows(path: str, config: str, split: str, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0,
                seed: int = 0, limit: int | None = None):
    """A streaming `datasets.IterableDataset` of one config and split, this process's share of its shards.

    Args:
        path (`str`): a dataset folder or Hub repo id in voxlm's format.
        config (`str`): `cap`, `vqa`, `pos`, `seg` or `refseg`.
        split (`str`): `train`, `validation` or `test`.
        rank (`int`), world_size (`int`): this process among the training processes.
        shuffle_buffer (`int`, defaults to 0): rows in the shuffle buffer; 0 keeps the stored order.
        seed (`int`): the shuffle seed (the epoch can be added to it).
        limit (`int`, *optional*): keep only the first `limit` rows of the split (the same rows every epoch, before the
            split across processes), e.g. for a data-scaling study.
    """
    rows = load_dataset(str(path), config, split=split, streaming=True)
    if limit is not None:
        rows = rows.take(limit)
    if world_size > 1:
        rows = split_dataset_by_node(rows, rank=rank, world_size=world_size)
    if shuffle_buffer > 0:
        rows = rows.shuffle(seed=seed, buffer_size=shuffle_buffer)
    return rows


class BadRowError(ValueError):
    """A row that cannot become a training sample; `kind` says at which step (`BAD_ROW_KINDS`)."""

    def __init__(self, kind: str, row_id, problem):
        super().__init__(f"row {row_id}: {kind}: {problem}")
        self.kind = kind


# Where a row can fail: its bytes (`decode`), the volume processor (`preprocess`), the prompt (`tokenize`), the batch
# (`collate`: a missing question or answer, a volume of another shape). `truncated` rows are kept, their answer cut.
BAD_ROW_KINDS = ("decode", "preprocess", "tokenize", "collate")


def preprocess_row(row: dict, processor: VoxVolumeProcessor) -> dict:
    """One row -> a sample: `pixel_values (1, D, H, W)`, `seg_masks (1, D, H, W)` when the row has a mask, texts.

    Raises:
        `BadRowError`: the image or mask bytes cannot be decoded, or the volume processor refuses the volume.
    """
    row_id = row.get("id", "?")
    try:
        volume = decode_array(row["image"])
        mask = decode_array(row["mask"]) if row.get("mask") is not None else None
    except (ValueError, KeyError, TypeError, MemoryError) as error:
        raise BadRowError("decode", row_id, error) from error
    try:
        pixel_values, metadata = processor.preprocess_volume(volume, modality=row.get("modality"))
        seg_masks = None if mask is None else processor.preprocess_mask(mask, metadata)
    except (ValueError, OSError, EOFError, TypeError, MemoryError) as error:
        raise BadRowError("preprocess", row_id, error) from error
    sample = {key: row.get(key) for key in TEXT_FIELDS}
    sample["pixel_values"] = pixel_values
    if seg_masks is not None:
        sample["seg_masks"] = seg_masks
    return sample


def tokenize_sample(sample: dict, processor: VoxLMProcessor, max_length: int | None = None) -> dict:
    """A preprocessed question-answer sample's `input_ids` and `labels` (lists; labels only on the answer), as
    `VoxLMProcessor.tokenize_one` builds them, and `truncated` when the answer was cut to `max_length`.

    Raises:
        `BadRowError`: `collate` when the question or the answer is missing, `tokenize` when they cannot form a prompt
        (not text, a question quoting `<im_patch>`, a prompt longer than `max_length`).
    """
    row_id = sample.get("id", "?")
    if sample.get("question") is None or sample.get("answer") is None:
        raise BadRowError("collate", row_id, "the question or the answer is missing")
    try:
        input_ids, labels, truncated = processor.tokenize_one(sample["question"], sample["answer"],
                                                              max_length=max_length)
    except ValueError as error:
        raise BadRowError("tokenize", row_id, error) from error
    if truncated:
        logger.warning("Row %s: the answer is cut to max_length=%d tokens", row_id, max_length)
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


class PreprocessedStream(torch.utils.data.IterableDataset):
    """Rows of a streaming dataset, decoded and preprocessed where they are iterated (in each DataLoader worker), or
    passed on whole when there is no processor (study rows, which their collator decodes series by series).

    A row that cannot be decoded or preprocessed is skipped and logged; the next sample that is yielded carries the
    skips since the previous one as `bad_rows_before` (`{kind: count}`), so that the collators and the training loop
    count them across DataLoader workers.

    With a `VoxLMProcessor` the samples are also tokenized (`tokenize_sample`) and hold what the model reads under the
    names its `forward` takes (`pixel_values`, `input_ids`, `labels`, `seg_masks`): the HF `Trainer`, which with its
    default `remove_unused_columns=True` drops every other key of a sample before the collator sees it, trains on them
    with [`InstructionCollator`] as it is.

    Args:
        rows (`datasets.IterableDataset`): from `stream_rows`.
        processor (`VoxVolumeProcessor` or `VoxLMProcessor`, *optional*): the model's volume processor, or its
            processor (volumes and texts); `None` yields the rows as they are.
        limit (`int`, *optional*): stop after this many good samples (per worker).
        skip_rows (`list[int]`, *optional*): the rows of each DataLoader worker's stream (one entry per worker, or
            one for the main process) to skip without decoding them: those a resumed run trained on before its
            checkpoint (`voxlm.training.loop.DataPosition`).
        max_length (`int`, *optional*): with a `VoxLMProcessor`, most tokens per sample (`tokenize_sample`).

    Attributes:
        skipped (`int`): rows skipped in this process (counted per worker when workers are used).
    """

    def __init__(self, rows, processor: VoxVolumeProcessor | VoxLMProcessor | None, limit: int | None = None,
                 skip_rows: list[int] | None = None, max_length: int | None = None):
        super().__init__()
        self.rows = rows
        self.text_processor = processor if hasattr(processor, "tokenize_one") else None
        self.processor = processor if self.text_processor is None else processor.image_processor
        self.limit = limit
        self.skip_rows = skip_rows
        self.max_length = max_length
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the buffer differently each epoch."""
        self.rows.set_epoch(epoch)

    def __iter__(self):
        with short_stream_close_sleep():
            rows = iter(self.rows)
            try:
                if self.skip_rows:
                    worker = torch.utils.data.get_worker_info()
                    rows = islice(rows, self.skip_rows[worker.id if worker else 0], None)
                yield from self.preprocessed(rows)
            finally:
                # Close the row stream here, inside the block, rather than whenever it is garbage collected.
                if hasattr(rows, "close"):
                    rows.close()

    def preprocessed(self, rows):
        produced = 0
        bad_rows = Counter()
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except (OSError, pa.ArrowException) as error:
                # A shard that cannot be read (a corrupt Parquet page) ends `datasets`' iterator: the run goes on with
                # what this pass yielded, and says what was lost.
                logger.error("The row stream broke after %d samples (%s: %s); the rest of this pass over the data is "
                             "skipped: check the dataset's shards", produced, type(error).__name__, error)
                return
            if self.processor is None:
                yield row
                continue
            try:
                sample = preprocess_row(row, self.processor)
                if self.text_processor is not None:
                    sample.update(tokenize_sample(sample, self.text_processor, self.max_length))
            except BadRowError as error:
                # A bad sample costs one sample, never the run.
                self.skipped += 1
                bad_rows[error.kind] += 1
                logger.warning("Skipping %s", error)
                continue
            sample["bad_rows_before"], bad_rows = dict(bad_rows), Counter()
            yield sample
            produced += 1
            if self.limit is not None and produced >= self.limit:
                return
