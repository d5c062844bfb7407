"""HLIP-style sampling of whole studies for training (seed 001).

[`sample_study`] keeps a random subset of at most `max_series` series of a study row (the `study` config of the Hub
format, `voxlm.data.hub_format.STUDY_SCHEMA`) in random order and shuffles the report's sentences, and
[`StudyCollator`] pads studies to `(B, S, C, D, H, W)` with a `scan_mask (B, S)` for `VoxViTModel`'s study mode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from voxlm.processing import pad_studies

from .collators import batch_seed
from .hub_format import StudyError, decode_array

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class StudySampling:
    """How a study becomes one training sample (HLIP).

    Args:
        max_series (`int`, defaults to 4): most series per sample (and so `S`); keep it `<= VoxViTConfig.max_scans`.
        random_subset (`bool`, defaults to `True`): keep a random number (1 .. `max_series`) of random series in random
            order; `False` keeps the first `max_series` in stored order (evaluation).
        shuffle_sentences (`bool`, defaults to `True`): shuffle the report's sentences.
    """

    max_series: int = 4
    random_subset: bool = True
    shuffle_sentences: bool = True

    def __post_init__(self):
        if self.max_series < 1:
            raise StudyError(f"StudySampling.max_series must be >= 1, got {self.max_series}")


def shuffle_sentences(report: str, rng: np.random.Generator) -> str:
    """The report's sentences in random order (split after `.`, `!` or `?`)."""
    sentences = SENTENCE_END.split(report.strip())
    return " ".join(sentences[index] for index in rng.permutation(len(sentences)))


def sample_study(row: dict, sampling: StudySampling, rng: np.random.Generator) -> dict:
    """Pick the series and the report text of one training sample from a study row.

    Args:
        row (`dict`): a study row (`series`, `report`, `id`).
        sampling (`StudySampling`): the cap and the randomisation.
        rng (`np.random.Generator`): the sample's random stream.

    Returns:
        `dict` with `series` (the kept series items, at most `max_series`), `series_indices` (their stored
        positions) and `report`.
    """
    series = row.get("series") or []
    if not series:
        raise StudyError(f"study {row.get('id')!r}: `series` is empty")
    if sampling.random_subset:
        count = int(rng.integers(1, min(sampling.max_series, len(series)) + 1))
        indices = [int(index) for index in rng.permutation(len(series))[:count]]
    else:
        indices = list(range(min(sampling.max_series, len(series))))
    report = shuffle_sentences(row["report"], rng) if sampling.shuffle_sentences else row["report"]
    return dict(series=[series[index] for index in indices], series_indices=indices, report=report)


def series_pixel_values(series: list[dict], processor) -> torch.Tensor:
    """Preprocess each series with its own window: `S` series -> `(S, C, D, H, W)`.

    Args:
        series (`list[dict]`): series items (`image` bytes, `modality`, `window`).
        processor (`VoxVolumeProcessor`): resizes every series to its `image_size`.
    """
    volumes = []
    for index, item in enumerate(series):
        try:
            array = decode_array(item["image"]).astype(np.float32)
        except ValueError as error:
            raise StudyError(f"series {index} ({item.get('description')!r}): {error}") from error
        pixel_values, _ = processor.preprocess_volume(array, modality=item["modality"], window=item.get("window"))
        volumes.append(pixel_values)  # (C, D, H, W)
    return torch.stack(volumes)  # (S, C, D, H, W)


class StudyCollator:
    """Batch studies for `VoxViTModel` study mode: `pixel_values (B, S, C, D, H, W)` zero-padded to the longest study,
    `scan_mask (B, S)` (`True` for real series) and the sampled reports.

    Args:
        processor (`VoxVolumeProcessor`): turns each series into a tensor.
        sampling (`StudySampling`): the per-sample series cap and randomisation.
        seed (`int`, *optional*): seeds each batch's sampling with its rows' ids (`batch_seed`: reproducible epochs,
            and a resumed run samples the batches after its checkpoint as an uninterrupted one); `None` draws fresh
            entropy.
    """

    def __init__(self, processor, sampling: StudySampling | None = None, seed: int | None = None):
        self.processor = processor
        self.sampling = sampling or StudySampling()
        self.seed = seed

    def __call__(self, rows: list[dict]) -> dict:
        rng = np.random.default_rng(None if self.seed is None else batch_seed(self.seed, rows))
        samples = [sample_study(row, self.sampling, rng) for row in rows]
        studies = [series_pixel_values(sample["series"], self.processor) for sample in samples]
        pixel_values, scan_mask = pad_studies(studies)  # (B, S, C, D, H, W), (B, S)
        return dict(pixel_values=pixel_values, scan_mask=scan_mask, reports=[sample["report"] for sample in samples])


__all__ = ["StudyCollator", "StudySampling", "sample_study", "series_pixel_values", "shuffle_sentences"]
