"""Whole studies: phantom head-CT studies of several series, their Hub rows, and HLIP-style sampling for training.

A radiologist reads a study, not one scan: several series of one head that differ in window, contrast phase and
resolution. Each phantom study here is built from one phantom head (`voxlm.training.data.phantoms`) as

    series 0  AXIAL NON-CONTRAST BRAIN    thin slices, brain window       (0, 80) HU
    series 1  AXIAL NON-CONTRAST BONE     thin slices, bone window        (-450, 1050) HU: blood barely differs
    series 2  AXIAL POST-CONTRAST         contrast phase, subdural window brain and vessels enhance
    series 3  AXIAL NON-CONTRAST THICK    4x thicker, 2x coarser slices, brain window (partial-volume blur)

and, for a fraction of the studies with a finding, the finding is drawn into one randomly chosen series only (the
others show the same head without it), the case a single-series model misses when it is handed another series.

Row schema (one row per study, config `study`): `id`, `patient_id`, `study_id`, `series` (a list of
`{image: .npy bytes (HU, int16, canonical (D, H, W)), modality, description, window, spacing}`), `report`, `label`
(the finding type or `"normal"`), `finding_series` (indices of the series that show the finding) and `split`.

At training time [`sample_study`] keeps a random subset of at most `max_series` series in random order and shuffles
the report's sentences, as HLIP does (seed 001), and [`StudyCollator`] pads studies to `(B, S, C, D, H, W)` with a
`scan_mask (B, S)` for `VoxViTModel`'s study mode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from voxlm.processing import pad_studies

from .hub_format import SPLITS, dataset_card, decode_array, encode_array, split_of
from .phantoms import HU_BRAIN, HU_SKULL, generate_case

SERIES_SCHEMA = pa.struct([
    ("image", pa.binary()),
    ("modality", pa.string()),
    ("description", pa.string()),
    ("window", pa.string()),
    ("spacing", pa.list_(pa.float32())),
])
STUDY_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("patient_id", pa.string()),
    ("study_id", pa.string()),
    ("series", pa.list_(SERIES_SCHEMA)),
    ("report", pa.string()),
    ("label", pa.string()),
    ("finding_series", pa.list_(pa.int32())),
    ("split", pa.string()),
])
# (description, window preset of VoxVolumeProcessor's CT_WINDOWS) of the four series, in study order.
SERIES_KINDS = (
    ("AXIAL NON-CONTRAST BRAIN", "brain"),
    ("AXIAL NON-CONTRAST BONE", "bone"),
    ("AXIAL POST-CONTRAST", "subdural"),
    ("AXIAL NON-CONTRAST THICK", "brain"),
)
# Post-contrast enhancement in HU: parenchyma a little (intact blood-brain barrier), dural venous sinuses a lot.
CONTRAST_BRAIN_HU, CONTRAST_SINUS_HU = 6.0, 120.0
THICK_SLICE_FACTOR = (4, 2, 2)  # (D, H, W) block averaged into one voxel of the thick series
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class StudyError(ValueError):
    """A study row or a study sampling setting cannot be used; the message names the study and the field."""


def post_contrast(volume: np.ndarray) -> np.ndarray:
    """The contrast phase of a head in HU: brain enhances slightly, the superior sagittal sinus strongly.

    Args:
        volume (`np.ndarray` of shape `(D, H, W)`): non-contrast HU.
    """
    enhanced = volume.astype(np.float32)
    brain = (volume > HU_BRAIN - 20) & (volume < HU_SKULL / 2)
    enhanced[brain] += CONTRAST_BRAIN_HU
    # The sinus runs along the midline just under the vertex: the brain voxels of the top quarter, centre column.
    depth, _, width = volume.shape
    sinus = np.zeros_like(brain)
    sinus[depth * 3 // 4 :, :, width // 2 - max(1, width // 48) : width // 2 + max(1, width // 48)] = True
    enhanced[sinus & brain] += CONTRAST_SINUS_HU
    return enhanced


def thick_slices(volume: np.ndarray) -> np.ndarray:
    """A lower-resolution series: average `THICK_SLICE_FACTOR` blocks (partial-volume blur), `(D, H, W)` -> coarser."""
    f_d, f_h, f_w = THICK_SLICE_FACTOR
    depth, height, width = (size // factor * factor for size, factor in zip(volume.shape, THICK_SLICE_FACTOR))
    blocks = volume[:depth, :height, :width].astype(np.float32)
    # (D, H, W) -> (D / f_d, f_d, H / f_h, f_h, W / f_w, f_w) -> mean over the block axes
    return blocks.reshape(depth // f_d, f_d, height // f_h, f_h, width // f_w, f_w).mean(axis=(1, 3, 5))


def series_entry(volume: np.ndarray, kind: int, spacing) -> dict:
    """One `series` item of a study row: HU volume as `.npy` int16 bytes plus its description and window."""
    description, window = SERIES_KINDS[kind]
    return dict(
        image=encode_array(np.round(volume).astype(np.int16)),
        modality="CT",
        description=description,
        window=window,
        spacing=[float(s) for s in spacing],
    )


def generate_study(
    seed: int, shape=(32, 96, 96), normal_fraction: float = 1 / 3, single_series_fraction: float = 0.5
) -> dict:
    """One phantom study row (schema in the module docstring), deterministic per seed.

    Args:
        seed (`int`): the study's seed; the head is `phantoms.generate_case(seed)`.
        shape (`tuple[int, int, int]`, defaults to `(32, 96, 96)`): `(D, H, W)` of the thin series.
        normal_fraction (`float`, defaults to 1/3): probability that the study has no finding.
        single_series_fraction (`float`, defaults to 0.5): probability that a finding is drawn into one random series
            only (for a bleed, one whose window shows it: not the bone series); otherwise every series holds it
            (though the bone window hides a bleed's contrast).
    """
    if not 0.0 <= single_series_fraction <= 1.0:
        raise StudyError(f"single_series_fraction must lie in [0, 1], got {single_series_fraction}")
    case = generate_case(seed, shape=shape, normal_fraction=normal_fraction)
    # `normal_fraction=1` draws the same head (same seed, same geometry draws) without its finding and midline shift.
    normal = generate_case(seed, shape=shape, normal_fraction=1.0).volume
    rng = np.random.default_rng([seed, 1])
    num_series = len(SERIES_KINDS)
    if case.finding is None:
        finding_series = []
    elif rng.random() < single_series_fraction:
        # A bleed is 30-40 HU above brain, under 3% of the bone window: only series that can show it are chosen.
        visible = [0, 2, 3] if case.finding.is_hemorrhage else list(range(num_series))
        finding_series = [visible[int(rng.integers(len(visible)))]]
    else:
        finding_series = list(range(num_series))
    heads = [case.volume if index in finding_series else normal for index in range(num_series)]
    thick_spacing = [s * f for s, f in zip(case.spacing, THICK_SLICE_FACTOR)]
    series = [
        series_entry(heads[0], 0, case.spacing),
        series_entry(heads[1], 1, case.spacing),
        series_entry(post_contrast(heads[2]), 2, case.spacing),
        series_entry(thick_slices(heads[3]), 3, thick_spacing),
    ]
    patient_id = f"phantom-patient-{seed:06d}"
    return dict(
        id=f"phantom-study-{seed:06d}",
        patient_id=patient_id,
        study_id=f"phantom-study-{seed:06d}",
        series=series,
        report=case.report,
        label=case.finding.kind if case.finding else "normal",
        finding_series=finding_series,
        split=split_of(patient_id, test_fraction=0.2),
    )


def write_study_dataset(rows: list[dict], out_dir: str | Path, description: str, rows_per_shard: int = 50) -> Path:
    """Write study rows as the `study` config of a Hub dataset folder (Parquet shards per split + card).

    Args:
        rows (`list[dict]`): rows of `STUDY_SCHEMA`, each with a `split`.
        out_dir (`str` or `Path`): the dataset folder (created).
        description (`str`): the dataset card's body.
        rows_per_shard (`int`, defaults to 50): studies per Parquet file (a study holds several volumes).
    """
    unknown = {row["split"] for row in rows} - set(SPLITS)
    if unknown:
        raise StudyError(f"study rows with unknown splits {sorted(unknown)}; use one of {SPLITS}")
    out_dir = Path(out_dir)
    folder = out_dir / "data" / "study"
    folder.mkdir(parents=True, exist_ok=True)
    splits = []
    for split in SPLITS:
        split_rows = [row for row in rows if row["split"] == split]
        if not split_rows:
            continue
        splits.append(split)
        count = -(-len(split_rows) // rows_per_shard)
        for index in range(count):
            chunk = split_rows[index * rows_per_shard : (index + 1) * rows_per_shard]
            table = pa.Table.from_pylist([{key: row[key] for key in STUDY_SCHEMA.names} for row in chunk], STUDY_SCHEMA)
            pq.write_table(table, folder / f"{split}-{index:05d}-of-{count:05d}.parquet", compression="zstd")
    (out_dir / "README.md").write_text(dataset_card({"study": splits}, description))
    return out_dir


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
        seed (`int`, *optional*): seeds the sampling stream (reproducible epochs); `None` draws fresh entropy.
    """

    def __init__(self, processor, sampling: StudySampling | None = None, seed: int | None = None):
        self.processor = processor
        self.sampling = sampling or StudySampling()
        self.rng = np.random.default_rng(seed)

    def __call__(self, rows: list[dict]) -> dict:
        samples = [sample_study(row, self.sampling, self.rng) for row in rows]
        studies = [series_pixel_values(sample["series"], self.processor) for sample in samples]
        pixel_values, scan_mask = pad_studies(studies)  # (B, S, C, D, H, W), (B, S)
        return dict(pixel_values=pixel_values, scan_mask=scan_mask, reports=[sample["report"] for sample in samples])


__all__ = [
    "STUDY_SCHEMA",
    "SERIES_KINDS",
    "StudyCollator",
    "StudyError",
    "StudySampling",
    "generate_study",
    "sample_study",
    "series_pixel_values",
    "shuffle_sentences",
    "write_study_dataset",
]
