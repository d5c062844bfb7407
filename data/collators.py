"""Collators: preprocessed samples (from `PreprocessedStream`) -> model batches, built by the model's own processors."""

from __future__ import annotations

import json
import logging
import zlib
from collections import Counter

import torch
from transformers import DataCollatorForLanguageModeling

from voxlm.processing import VoxLMProcessor

logger = logging.getLogger(__name__)


def batch_seed(seed: int, rows: list[dict]) -> int:
    """A seed for a batch's random draws from `seed` and its rows' ids: the same rows draw the same masks however
    many batches came before them (a resumed run collates only the batches after its checkpoint)."""
    return zlib.crc32(json.dumps([seed, [str(row.get("id")) for row in rows]]).encode())


def bad_rows_of(samples: list[dict]) -> Counter:
    """The bad rows `PreprocessedStream` skipped before these samples, by kind."""
    return sum((Counter(sample.get("bad_rows_before") or {}) for sample in samples), Counter())


class ContrastiveCollator:
    """Volume-report pairs and image-only volumes for VoxCLIP: `pixel_values (B, 1, D, H, W)`, tokenized reports
    (`input_ids`, `attention_mask (B, L)`; an empty report for image-only rows) and `has_report (B,)`, `False` for
    rows whose report is empty or `None` (only the masked-image objective uses them). With `mlm_probability > 0` it
    adds `mlm_input_ids` and `mlm_labels (B, L)`: BERT's masking of the reports (transformers'
    `DataCollatorForLanguageModeling`: that share of the non-special tokens chosen, 80% of them replaced by `[MASK]`,
    10% by a random token, 10% kept; labels `-100` elsewhere). With `num_patches` it adds `patch_noise (B, N)`, the
    uniform noise from which VoxCLIP picks the masked patches of its reconstruction terms.

    Both draws are seeded by `seed` and the ids of the batch's rows (`batch_seed`), not by a stream of earlier draws,
    so a resumed run that skips the batches before its checkpoint (never collating them) draws the same masks as an
    uninterrupted one.

    With `studies` (a [`StudyCollator`]) the samples are study rows instead: it samples each study's series and
    report-sentence order (HLIP) and gives `pixel_values (B, S, C, D, H, W)` and `scan_mask (B, S)`; the reports it
    sampled are tokenized as above.

    Args:
        tokenizer: the text encoder's tokenizer.
        max_length (`int`, defaults to 128): reports are truncated to this many tokens.
        mlm_probability (`float`, defaults to 0.0): share of report tokens masked for MLM; 0 adds no MLM inputs.
        num_patches (`int`, *optional*): the encoder's patch count (`vision_config.num_patches`) when a masked-volume
            term is on; `None` adds no patch noise.
        seed (`int`, defaults to 0): seeds both draws (with the rows' ids).
        studies (`StudyCollator`, *optional*): collate study rows (`voxlm.data.study_sampling`) rather than
            preprocessed volumes; the masked-volume terms reconstruct single volumes, so it excludes `num_patches`.
    """

    def __init__(self, tokenizer, max_length: int = 128, mlm_probability: float = 0.0, num_patches: int | None = None,
                 seed: int = 0, studies=None):
        if not 0.0 <= mlm_probability < 1.0:
            raise ValueError(f"`mlm_probability` must be in [0, 1), got {mlm_probability}")
        if studies is not None and num_patches is not None:
            raise ValueError("`num_patches` (masked-volume terms) works on single volumes, not on `studies`")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.mlm_probability = mlm_probability
        self.num_patches = num_patches
        self.seed = seed
        self.studies = studies

    def __call__(self, samples: list[dict]) -> dict:
        if self.studies is None:
            images = {"pixel_values": torch.stack([sample["pixel_values"] for sample in samples])}  # (B, C, D, H, W)
            reports = [sample.get("report") or "" for sample in samples]
        else:
            images = self.studies(samples)  # pixel_values (B, S, C, D, H, W), scan_mask (B, S), sampled reports
            reports = [report or "" for report in images.pop("reports")]
        text = self.tokenizer(reports, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
                              return_special_tokens_mask=self.mlm_probability > 0)
        seed = batch_seed(self.seed, samples)
        batch = {
            **images,
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "has_report": torch.tensor([bool(report) for report in reports]),
            "bad_rows": dict(bad_rows_of(samples)),
        }
        if self.mlm_probability > 0:
            masker = DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=self.mlm_probability, seed=seed)
            masked = masker([{"input_ids": ids, "special_tokens_mask": special}
                             for ids, special in zip(text["input_ids"], text["special_tokens_mask"])])
            batch["mlm_input_ids"], batch["mlm_labels"] = masked["input_ids"], masked["labels"]
        if self.num_patches is not None:
            generator = torch.Generator().manual_seed(seed)
            batch["patch_noise"] = torch.rand(len(samples), self.num_patches, generator=generator)
        return batch


class InstructionCollator:
    """Tokenized question-answer samples (from `PreprocessedStream` with the model's `VoxLMProcessor`) -> VoxLM
    batches: `input_ids`, `attention_mask`, `labels (B, L)` padded on the right, `pixel_values (B, 1, D, H, W)`, and
    `seg_masks (B, 1, D, H, W)` / `has_mask (B,)` when some sample carries a mask.

    It reads only the keys the model's `forward` takes (and `truncated`, `bad_rows_before`, `id` when they are there),
    so the HF `Trainer` with its default `remove_unused_columns=True` can hand it its samples. A sample whose volume
    has another shape than the batch's first is left out and logged, never the batch.

    Args:
        processor (`VoxLMProcessor`): the model's processor (its `pad`).
        report_bad_rows (`bool`, defaults to `False`): add `bad_rows`, the rows left out here, cut (`truncated`) or
            skipped by the stream before these samples, by kind, which voxlm's training loop counts; a batch of nothing
            but bad rows then holds only `bad_rows`. Off, the batch holds model inputs only, as the `Trainer` needs.
    """

    def __init__(self, processor: VoxLMProcessor, report_bad_rows: bool = False):
        self.processor = processor
        self.report_bad_rows = report_bad_rows

    def __call__(self, samples: list[dict]) -> dict:
        bad_rows = bad_rows_of(samples)
        kept = []
        for sample in samples:
            if kept and sample["pixel_values"].shape != kept[0]["pixel_values"].shape:
                bad_rows["collate"] += 1
                logger.warning("Skipping row %s: collate: volume of shape %s, the batch's is %s", sample.get("id", "?"),
                               tuple(sample["pixel_values"].shape), tuple(kept[0]["pixel_values"].shape))
                continue
            if sample.get("truncated"):
                bad_rows["truncated"] += 1
            kept.append(sample)
        batch = {"bad_rows": dict(bad_rows)} if self.report_bad_rows else {}
        if not kept:
            return batch
        batch.update(self.processor.pad([(sample["input_ids"], sample["labels"]) for sample in kept], "right"))
        batch["pixel_values"] = torch.stack([sample["pixel_values"] for sample in kept])
        if any("seg_masks" in sample for sample in kept):
            empty = torch.zeros_like(kept[0]["pixel_values"])
            batch["seg_masks"] = torch.stack([sample.get("seg_masks", empty) for sample in kept])
            batch["has_mask"] = torch.tensor(["seg_masks" in sample for sample in kept])
        return batch
