"""The Hub dataset format: Parquet shards, one row per sample, five configs (and `study`, one row per study), and a
dataset card that names them.

`datasets.load_dataset(folder_or_repo_id, "vqa", split="train", streaming=True)` reads it the same way from a local
folder and from a Hub repo. Volumes and masks are stored as `.npy` bytes (read back without unpickling) or `.nii.gz`.

Layout::

    README.md                          dataset card, YAML `configs` with data_files per split
    data/<config>/<split>-00000-of-00004.parquet
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .output_folders import replace_or_refuse

CONFIGS = {
    "cap": ("report",),
    "vqa": ("closed", "open"),
    "pos": ("rec", "reg"),
    "seg": ("seg",),
    "refseg": ("refseg",),
}
SPLITS = ("train", "validation", "test")
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("patient_id", pa.string()),
    ("study_id", pa.string()),
    ("image", pa.binary()),
    ("modality", pa.string()),
    ("spacing", pa.list_(pa.float32())),
    ("report", pa.string()),
    ("question", pa.string()),
    ("answer", pa.string()),
    ("question_type", pa.string()),
    # What a question asks about, for per-category scores: M3D-VQA's plane, phase, organ, abnormality, location.
    ("question_category", pa.string()),
    ("choices", pa.list_(pa.string())),
    ("mask", pa.binary()),
    ("mask_label", pa.string()),
    ("box", pa.list_(pa.float32())),
    ("split", pa.string()),
])

# The `study` config: one row per study, its series a list (`voxlm.data.phantom_studies` makes such rows).
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


class StudyError(ValueError):
    """A study row or a study sampling setting cannot be used; the message names the study and the field."""


def encode_array(array: np.ndarray) -> bytes:
    """An array as `.npy` bytes."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    """`.npy` or `.nii.gz` / `.nii` bytes -> array (canonical `(D, H, W)` for `.npy`; NIfTI keeps its own axes).

    Raises:
        `ValueError`: the bytes are neither (truncated, corrupt, pickled or raw data).
    """
    try:
        if data[:6] == b"\x93NUMPY":
            return np.load(io.BytesIO(data), allow_pickle=False)
        import nibabel as nib

        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        return np.asarray(nib.Nifti1Image.from_bytes(raw).dataobj)
    except Exception as error:  # numpy, gzip and nibabel each raise their own types for bad bytes
        raise ValueError(f"not a readable .npy or NIfTI array ({type(error).__name__}: {error})") from error


def split_of(patient_id: str, test_fraction: float, validation_fraction: float = 0.0) -> str:
    """A patient's split from a hash of its id: stable across runs and machines, never two splits for one patient."""
    draw = int(hashlib.sha256(patient_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if draw < test_fraction:
        return "test"
    if draw < test_fraction + validation_fraction:
        return "validation"
    return "train"


def config_of(question_type: str) -> str:
    """The config a question type belongs to."""
    for config, types in CONFIGS.items():
        if question_type in types:
            return config
    raise ValueError(f"Unknown question_type {question_type!r}; known: {sorted(t for ts in CONFIGS.values() for t in ts)}")


def write_shards(rows: list[dict], folder: Path, split: str, rows_per_shard: int, schema: pa.Schema = SCHEMA
                 ) -> list[str]:
    """Write rows of `schema` as Parquet shards `<split>-0000i-of-0000n.parquet` (zstd) and return their names."""
    folder.mkdir(parents=True, exist_ok=True)
    count = max(1, math.ceil(len(rows) / rows_per_shard))
    names = []
    for index in range(count):
        chunk = rows[index * rows_per_shard : (index + 1) * rows_per_shard]
        name = f"{split}-{index:05d}-of-{count:05d}.parquet"
        table = pa.Table.from_pylist([{key: row.get(key) for key in schema.names} for row in chunk], schema=schema)
        pq.write_table(table, folder / name, compression="zstd")
        names.append(name)
    return names


def dataset_card(configs: dict[str, list[str]], description: str) -> str:
    """A dataset card whose YAML `configs` let `load_dataset(path, config)` find each config's split files."""
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines.append(f"- config_name: {config}")
        lines.append("  data_files:")
        for split in splits:
            lines.append(f"  - split: {split}")
            lines.append(f"    path: data/{config}/{split}-*.parquet")
    lines += ["license: cc-by-4.0", "task_categories:", "- visual-question-answering", "- image-segmentation",
              "tags:", "- medical", "- 3d", "- ct", "- voxlm", "---", "", description, ""]
    return "\n".join(lines)


def write_dataset(rows: list[dict], out_dir: str | Path, description: str, rows_per_shard: int = 200,
                  overwrite: bool = False) -> Path:
    """Write rows (each with `question_type` and `split`) into the Hub format under `out_dir`.

    Args:
        rows (`list[dict]`): rows of the schema.
        out_dir (`str` or `Path`): the dataset folder (created).
        description (`str`): the card's body.
        rows_per_shard (`int`, defaults to 200): rows per Parquet file; more shards let more workers stream at once.
        overwrite (`bool`, defaults to `False`): replace a dataset `out_dir` already holds (its `data/` shards and
            card); without it such a folder is refused, since its stale shards would be streamed with the new ones.
    """
    out_dir = Path(out_dir)
    replace_or_refuse(out_dir, ["data", "README.md"], overwrite, "pass --overwrite to replace that dataset")
    grouped: dict[str, dict[str, list[dict]]] = {}
    for row in rows:
        if row["split"] not in SPLITS:
            raise ValueError(f"Row {row['id']}: unknown split {row['split']!r}; use one of {SPLITS}")
        grouped.setdefault(config_of(row["question_type"]), {}).setdefault(row["split"], []).append(row)
    configs = {}
    for config, by_split in grouped.items():
        for split, split_rows in by_split.items():
            write_shards(split_rows, out_dir / "data" / config, split, rows_per_shard)
        configs[config] = [split for split in SPLITS if split in by_split]
    (out_dir / "README.md").write_text(dataset_card(configs, description))
    return out_dir


def push_dataset(folder: str | Path, repo_id: str, private: bool = True) -> str:
    """Upload a dataset folder to the Hub with `huggingface_hub` (needs a token with write access)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset")
    return f"https://huggingface.co/datasets/{repo_id}"


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
    splits = []
    for split in SPLITS:
        split_rows = [row for row in rows if row["split"] == split]
        if split_rows:
            write_shards(split_rows, out_dir / "data" / "study", split, rows_per_shard, STUDY_SCHEMA)
            splits.append(split)
    (out_dir / "README.md").write_text(dataset_card({"study": splits}, description))
    return out_dir
