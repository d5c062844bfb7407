"""Collators: preprocessed samples (from `PreprocessedStream`) -> model batches, built by the model's own processors."""

from __future__ import annotations

import torch

from voxlm.processing import VoxLMProcessor


class ContrastiveCollator:
    """Volume-report pairs for VoxCLIP: `pixel_values (B, 1, D, H, W)`, tokenized reports, and `has_text (B,)`
    (False for image-only rows, which only the vision-only objectives use).

    Args:
        tokenizer: the text encoder's tokenizer.
        max_length (`int`, defaults to 128): reports are truncated to this many tokens.
    """

    def __init__(self, tokenizer, max_length: int = 128):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, samples: list[dict]) -> dict:
        reports = [sample.get("report") or "" for sample in samples]
        text = self.tokenizer(reports, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {
            "pixel_values": torch.stack([sample["pixel_values"] for sample in samples]),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "has_text": torch.tensor([bool(sample.get("report")) for sample in samples]),
        }


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
