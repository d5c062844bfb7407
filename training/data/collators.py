"""Collators: preprocessed samples (from `PreprocessedStream`) -> model batches, built by the model's own processors."""

from __future__ import annotations

import torch
from transformers import DataCollatorForLanguageModeling

from voxlm.processing import VoxLMProcessor


class ContrastiveCollator:
    """Volume-report pairs and image-only volumes for VoxCLIP: `pixel_values (B, 1, D, H, W)`, tokenized reports
    (`input_ids`, `attention_mask (B, L)`; an empty report for image-only rows) and `has_report (B,)`, `False` for
    rows whose report is empty or `None` (only the masked-image objective uses them). With `mlm_probability > 0` it
    adds `mlm_input_ids` and `mlm_labels (B, L)`: BERT's masking of the reports (transformers'
    `DataCollatorForLanguageModeling`: that share of the non-special tokens chosen, 80% of them replaced by `[MASK]`,
    10% by a random token, 10% kept; labels `-100` elsewhere). With `num_patches` it adds `patch_noise (B, N)`, the
    uniform noise from which VoxCLIP picks the masked patches of its reconstruction terms.

    Both draws use the collator's own generators, so a resumed run that re-collates the batches it skips draws the
    same masks as an uninterrupted one.

    With `studies` (a [`StudyCollator`]) the samples are study rows instead: it samples each study's series and
    report-sentence order (HLIP) and gives `pixel_values (B, S, C, D, H, W)` and `scan_mask (B, S)`; the reports it
    sampled are tokenized as above.

    Args:
        tokenizer: the text encoder's tokenizer.
        max_length (`int`, defaults to 128): reports are truncated to this many tokens.
        mlm_probability (`float`, defaults to 0.0): share of report tokens masked for MLM; 0 adds no MLM inputs.
        num_patches (`int`, *optional*): the encoder's patch count (`vision_config.num_patches`) when a masked-volume
            term is on; `None` adds no patch noise.
        seed (`int`, defaults to 0): seeds both generators.
        studies (`StudyCollator`, *optional*): collate study rows (`voxlm.training.data.studies`) rather than
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
        self.masker = None
        if mlm_probability > 0:
            self.masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, seed=seed)
        self.num_patches = num_patches
        self.patch_generator = torch.Generator().manual_seed(seed)
        self.studies = studies

    def __call__(self, samples: list[dict]) -> dict:
        if self.studies is None:
            images = {"pixel_values": torch.stack([sample["pixel_values"] for sample in samples])}  # (B, C, D, H, W)
            reports = [sample.get("report") or "" for sample in samples]
        else:
            images = self.studies(samples)  # pixel_values (B, S, C, D, H, W), scan_mask (B, S), sampled reports
            reports = [report or "" for report in images.pop("reports")]
        text = self.tokenizer(reports, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
                              return_special_tokens_mask=self.masker is not None)
        batch = {
            **images,
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "has_report": torch.tensor([bool(report) for report in reports]),
        }
        if self.masker is not None:
            masked = self.masker([{"input_ids": ids, "special_tokens_mask": special}
                                  for ids, special in zip(text["input_ids"], text["special_tokens_mask"])])
            batch["mlm_input_ids"], batch["mlm_labels"] = masked["input_ids"], masked["labels"]
        if self.num_patches is not None:
            batch["patch_noise"] = torch.rand(len(samples), self.num_patches, generator=self.patch_generator)
        return batch


class InstructionCollator:
    """Question-answer samples for VoxLM: prompts and labels from `VoxLMProcessor` (labels only on the answer),
    the preprocessed volumes, and `seg_masks` / `has_mask` for samples that carry a mask.

    Args:
        processor (`VoxLMProcessor`): the model's processor.
        with_answers (`bool`, defaults to `True`): `False` builds generation prompts (left padded, no labels).
    """

    def __init__(self, processor: VoxLMProcessor, with_answers: bool = True):
        self.processor = processor
        self.with_answers = with_answers

    def __call__(self, samples: list[dict]) -> dict:
        answers = [sample["answer"] for sample in samples] if self.with_answers else None
        batch = dict(self.processor(text=[sample["question"] for sample in samples], answers=answers))
        batch["pixel_values"] = torch.stack([sample["pixel_values"] for sample in samples])
        if any("seg_mask" in sample for sample in samples):
            empty = torch.zeros_like(samples[0]["pixel_values"])
            batch["seg_masks"] = torch.stack([sample.get("seg_mask", empty) for sample in samples])
            batch["has_mask"] = torch.tensor(["seg_mask" in sample for sample in samples])
        return batch
