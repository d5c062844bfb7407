"""The Python inference API on one volume or study, which the Space (`spaces/app.py`), the commands
`voxlm predict|retrieve|classify` (`voxlm.commands`) and users call.

    predict(volume, question)   -> answer text, parsed boxes, and a mask on the input's own grid when it says [SEG];
                                   a study (several files, or a DICOM folder / .zip of several series) is answered as a
                                   whole, and its mask and boxes are on one series of it (`mask_series`, default 0)
    retrieve(volume, reports)   -> the closest reports by VoxCLIP similarity
    classify(volume, labels)    -> zero-shot class probabilities (VoxCLIP, prompt ensembles)

Every volume goes through the model's saved processor (STYLE.md rule 9): nothing here windows or resizes voxels.
Models are a local folder or a Hub id; the defaults are the folders `voxlm quickstart` leaves, overridable with the
`VOXLM_MODEL` and `VOXLM_CLIP_MODEL` environment variables.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from transformers import StoppingCriteria, StoppingCriteriaList

from voxlm.processing import ReadLimits, Study, Volume, VolumeMetadata, read_study, read_volume

MODEL_ENV = "VOXLM_MODEL"
CLIP_MODEL_ENV = "VOXLM_CLIP_MODEL"
DEFAULT_MODEL = "voxlm-quickstart/finetune/final/model"
DEFAULT_CLIP_MODEL = "voxlm-quickstart/clip/final"
HOW_TO_GET_A_MODEL = (
    "Train one on this machine with `voxlm quickstart` (11 to 13 minutes on a laptop CPU; it leaves "
    f"{DEFAULT_MODEL} and {DEFAULT_CLIP_MODEL}), or point {MODEL_ENV} / {CLIP_MODEL_ENV} (or --model) at a saved "
    "folder or a Hub repo id."
)


class ModelNotFoundError(RuntimeError):
    """No model could be loaded from the given folder or Hub id; the message says how to get one."""


@dataclass
class Prediction:
    """One answer about one volume.

    Args:
        text (`str`): the answer, special tokens removed (`[SEG]` kept).
        boxes (`list[list[float]]`): boxes the answer holds, `(z1, y1, x1, z2, y2, x2)` in [0, 1] of the model input.
        boxes_canonical (`list[np.ndarray]`): each box's corners `(2, 3)` in canonical `(d, h, w)` voxel coordinates.
        boxes_world (`list[np.ndarray]`): each box's corners `(2, 3)` in RAS world mm, through the input's affine.
        has_seg (`bool`): whether the answer holds `[SEG]`.
        mask (`np.ndarray`, *optional*): uint8 mask on the input's own array grid (the file's shape), with `[SEG]`.
        canonical_mask (`np.ndarray` of shape `(D, H, W)`, *optional*): the same mask on the canonical grid.
        volume (`Volume`): the input in the canonical layout (voxels included), for viewers; for a study, the series
            that the mask and boxes are on.
        metadata (`VolumeMetadata`): the preprocessing geometry (crop, affine, orientation) of that volume, and the
            modality it was normalised as and why (`metadata.modality`, `metadata.modality_reason`).
        series (`list[str]`): for a study, the descriptions of its series in the order the model read them; else empty.
        mask_series (`int`, *optional*): for a study, the index in `series` of the series the mask and boxes are on.
        skipped_series (`list[str]`): for a study, DICOM series found but not readable as volumes, with the reason.
        series_modalities (`list[dict]`): for a study, per series in `series`, the modality it was normalised as and
            why: `{"modality": "CT", "reason": "the file's DICOM Modality tag"}`.
    """

    text: str
    boxes: list[list[float]]
    boxes_canonical: list[np.ndarray]
    boxes_world: list[np.ndarray]
    has_seg: bool
    mask: np.ndarray | None
    canonical_mask: np.ndarray | None
    volume: Volume = field(repr=False)
    metadata: VolumeMetadata = field(repr=False)
    series: list[str] = field(default_factory=list)
    mask_series: int | None = None
    skipped_series: list[str] = field(default_factory=list)
    series_modalities: list[dict] = field(default_factory=list)

    @property
    def modality(self) -> str:
        """The modality the volume (a study's `mask_series`) was normalised as; why: `metadata.modality_reason`."""
        return self.metadata.modality

    def save_mask(self, path: str | Path) -> Path:
        """Write the mask as NIfTI on the input's grid, with the input's affine."""
        if self.mask is None:
            raise ValueError("This answer holds no [SEG], so there is no mask to save")
        path = Path(path)
        nib.save(nib.Nifti1Image(self.mask, self.metadata.volume.affine), path)
        return path

    def to_dict(self) -> dict:
        """JSON-ready summary (without voxels); studies add `series`, `series_modalities`, `mask_series` and
        `skipped_series`."""
        summary = {
            "answer": self.text,
            "modality": self.metadata.modality,
            "modality_reason": self.metadata.modality_reason,
            "boxes": [[round(v, 3) for v in box] for box in self.boxes],
            "boxes_ras_mm": [np.round(corners, 2).tolist() for corners in self.boxes_world],
            "has_seg": self.has_seg,
            "mask_voxels": None if self.mask is None else int(self.mask.sum()),
        }
        if self.series:
            summary.update(series=self.series, series_modalities=self.series_modalities, mask_series=self.mask_series,
                           skipped_series=self.skipped_series)
        return summary


class _StepReporter(StoppingCriteria):
    """Calls `callback(new_tokens, max_new_tokens)` after each generated token; never stops generation."""

    def __init__(self, callback: Callable[[int, int], None], prompt_length: int, max_new_tokens: int):
        self.callback, self.prompt_length, self.max_new_tokens = callback, prompt_length, max_new_tokens

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.callback(input_ids.shape[1] - self.prompt_length, self.max_new_tokens)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def resolve_model_name(name: str | None, env: str, default: str) -> str:
    """The explicit name, else the environment variable, else the quickstart's output folder."""
    return name or os.environ.get(env) or default


def _from_pretrained(loader, name: str, kind: str):
    from safetensors import SafetensorError

    try:
        return loader(name)
    except SafetensorError as error:
        raise ValueError(f"The {kind} weights in {name!r} cannot be read: a truncated or corrupt safetensors file "
                         f"({error})") from error
    except (OSError, ValueError) as error:  # missing folder, unknown or offline Hub id, malformed repo id
        raise ModelNotFoundError(
            f"No {kind} could be loaded from {name!r} ({str(error).splitlines()[0]}). {HOW_TO_GET_A_MODEL}"
        ) from error


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_voxlm(name: str | None = None, device: str | torch.device | None = None):
    """`(model, processor)` of a saved VoxLM (folder or Hub id; `None`: `$VOXLM_MODEL`, else the quickstart's)."""
    from transformers import AutoModel, AutoProcessor

    import voxlm  # noqa: F401  (registers the Auto classes)

    name = resolve_model_name(name, MODEL_ENV, DEFAULT_MODEL)
    model = _from_pretrained(AutoModel.from_pretrained, name, "VoxLM")
    processor = _from_pretrained(AutoProcessor.from_pretrained, name, "VoxLM processor")
    return model.to(device or default_device()).eval(), processor


def load_voxclip(name: str | None = None, device: str | torch.device | None = None):
    """`(model, processor)` of a saved dual encoder (a VoxCLIP, or a converted COLIPRI, HLIP, DCFormer-SigLIP or
    Merlin): the model and its `VoxCLIPProcessor` (volume processor and tokenizer) (`None`: `$VOXLM_CLIP_MODEL`, else
    the quickstart's VoxCLIP)."""
    from transformers import AutoModel, AutoProcessor

    import voxlm  # noqa: F401

    name = resolve_model_name(name, CLIP_MODEL_ENV, DEFAULT_CLIP_MODEL)
    model = _from_pretrained(AutoModel.from_pretrained, name, "VoxCLIP")
    # What retrieval and zero-shot classification call: any image-text dual encoder has them.
    if not all(hasattr(model, method) for method in ("get_image_features", "get_text_features", "logit_scale")):
        raise ModelNotFoundError(
            f"{name!r} holds a {model.config.model_type} model, not a VoxCLIP or another image-text dual encoder. "
            f"{HOW_TO_GET_A_MODEL}"
        )
    processor = _from_pretrained(AutoProcessor.from_pretrained, name, "VoxCLIP processor")
    return model.to(device or default_device()).eval(), processor


# Environment variables that set `ReadLimits` fields (the Space's settings), with the unit of their values.
READ_LIMIT_VARIABLES = {"VOXLM_MAX_VOLUME_MB": ("max_bytes", 2**20),
                        "VOXLM_MAX_UNPACKED_MB": ("max_unpacked_bytes", 2**20), "VOXLM_MAX_FILES": ("max_files", 1)}


def read_limits_from_environment() -> ReadLimits:
    """`ReadLimits` with the fields that `READ_LIMIT_VARIABLES` set in the environment (MiB, or a file count), the
    others at their defaults."""
    return ReadLimits(**{field: int(float(os.environ[name]) * unit)
                         for name, (field, unit) in READ_LIMIT_VARIABLES.items() if name in os.environ})


def read_input(volume, volume_processor, limits: ReadLimits | None = None) -> Volume:
    """Read a path (or array) once, with the processor's voxel limit and NaN policy and the reader's `limits`
    (`ReadLimits()` by default), into the canonical layout."""
    return read_volume(volume, max_voxels=volume_processor.max_voxels, limits=limits,
                       nan_policy=volume_processor.nan_policy)


def read_study_input(source, volume_processor, max_series: int | None = None,
                     limits: ReadLimits | None = None) -> Study:
    """Read a study once, with the processor's voxel limit and NaN policy and the reader's `limits`: a DICOM folder
    or `.zip` (its series), a list of files, or a single volume file (a one-series study)."""
    return read_study(source, max_series=max_series, max_voxels=volume_processor.max_voxels, limits=limits,
                      nan_policy=volume_processor.nan_policy)


def read_predict_input(source, volume_processor, max_series: int) -> Volume | Study:
    """What `predict` answers about: a `Volume`, or a `Study` of several series. Paths to DICOM folders and archives and
    lists of files are read as studies; a study of one series is answered as that volume."""
    if isinstance(source, (list, tuple, Study)) or (isinstance(source, (str, Path)) and (
            Path(source).is_dir() or str(source).lower().endswith(".zip"))):
        source = read_study_input(source, volume_processor, max_series)
        return source.volumes[0] if len(source) == 1 else source
    return read_input(source, volume_processor)


def _generate(inputs: dict, model, processor, max_new_tokens: int, on_step, seg_scan_index: int = 0):
    """Greedy answer `dict` (from `post_process_generation`) and mask logits `(1, D, H, W)` or `None`."""
    inputs = {key: value.to(model.device) for key, value in inputs.items()}
    prompt_length = inputs["input_ids"].shape[1]
    criteria = StoppingCriteriaList([_StepReporter(on_step, prompt_length, max_new_tokens)] if on_step else [])
    with_seg = getattr(model, "seg_head", None) is not None
    study = {"seg_scan_index": seg_scan_index} if "scan_mask" in inputs else {}
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_masks=with_seg,
                            stopping_criteria=criteria, **study)
    sequences = output.sequences if with_seg else output
    answer = processor.post_process_generation(sequences[:, prompt_length:])[0]
    return answer, output.masks[0] if with_seg else None


@torch.no_grad()
def predict(
    volume,
    question: str,
    model=None,
    processor=None,
    *,
    modality: str | None = None,
    window=None,
    max_new_tokens: int = 64,
    on_step: Callable[[int, int], None] | None = None,
    mask_series: int = 0,
) -> Prediction:
    """Answer a question about a volume or a study: greedy generation, boxes parsed, and a mask when the answer holds
    `[SEG]`.

    Args:
        volume: a path (NIfTI, DICOM folder or `.zip`, NRRD/MHA, `.npy`), an array `(D, H, W)` or a `Volume`; or a
            study: a DICOM folder or `.zip` holding several series, a list of files, or a `Study`. A study may hold
            up to the model's `max_study_scans` series.
        question (`str`): the question (plain text; the processor builds the prompt).
        model, processor (*optional*): a VoxLM and its processor; `None` loads them with `load_voxlm()`.
        modality (`str`, *optional*): `"CT"` or e.g. `"MR"`; default: the file's DICOM modality, else the processor's
            (`"MR"` for a volume that cannot be CT in Hounsfield units: `VoxVolumeProcessor.choose_modality`). The one
            used is in `Prediction.modality`.
        window (`str` or `(low, high)`, *optional*): overrides the processor's CT window for this volume.
        max_new_tokens (`int`, defaults to 64): the answer's length limit.
        on_step (`Callable[[int, int], None]`, *optional*): called with `(tokens so far, max_new_tokens)`.
        mask_series (`int`, defaults to 0): for a study, the series (in reading order) that the mask is decoded on and
            that boxes refer to.

    Raises:
        `VolumeError`: the volume cannot be read, naming the file and the problem.
    """
    if not question or not question.strip():
        raise ValueError("The question is empty; ask something about the volume")
    if model is None or processor is None:
        model, processor = load_voxlm()
    volume_processor = processor.image_processor
    source = read_predict_input(volume, volume_processor, getattr(processor, "max_study_scans", 1))
    study = {}
    if isinstance(source, Study):
        if not 0 <= mask_series < len(source):
            raise ValueError(f"mask_series {mask_series} does not exist: the study holds {len(source)} series "
                             f"(0 to {len(source) - 1})")
        inputs = processor(studies=source, text=question.strip(), modality=modality, window=window,
                           return_metadata=True)
        study_metadata = inputs.pop("metadata")[0]
        used = [{"modality": m.modality, "reason": m.modality_reason} for m in study_metadata]
        study = dict(series=inputs.pop("series_descriptions")[0], mask_series=mask_series,
                     skipped_series=source.skipped, series_modalities=used)
        metadata, source = study_metadata[mask_series], source.volumes[mask_series]
    else:
        inputs = processor(images=[source], text=[question.strip()], modality=modality, window=window,
                           return_metadata=True)
        metadata = inputs.pop("metadata")[0]
    answer, mask_logits = _generate(inputs, model, processor, max_new_tokens, on_step, mask_series)
    mask = canonical_mask = None
    if mask_logits is not None:
        probabilities = mask_logits.sigmoid().float().cpu()  # (1, D, H, W) at the model's image_size
        canonical_mask = volume_processor.mask_to_canonical(probabilities, metadata)
        mask = metadata.volume.to_source_grid(canonical_mask)
    corners = [volume_processor.box_to_canonical(box, metadata) for box in answer["boxes"]]
    return Prediction(
        text=answer["text"], boxes=answer["boxes"], boxes_canonical=corners,
        boxes_world=[source.canonical_to_world(c) for c in corners], has_seg=answer["has_seg"], mask=mask,
        canonical_mask=canonical_mask, volume=source, metadata=metadata, **study,
    )


@torch.no_grad()
def embed_volume(volume, clip, modality: str | None = None) -> torch.Tensor:
    """The normalised VoxCLIP image embedding `(P,)` of one volume; `clip` is `load_voxclip()`'s `(model, processor)`."""
    model, processor = clip
    pixel_values = processor(images=volume, modality=modality)["pixel_values"]  # (1, 1, D, H, W)
    return F.normalize(model.get_image_features(pixel_values.to(model.device)), dim=-1)[0].cpu()


@torch.no_grad()
def embed_reports(reports: list[str], clip, batch_size: int = 32) -> torch.Tensor:
    """Normalised VoxCLIP text embeddings `(N, P)`, tokenized by the model's processor (truncated to its
    `max_length`)."""
    model, processor = clip
    rows = []
    for start in range(0, len(reports), batch_size):
        tokens = processor(text=reports[start : start + batch_size]).to(model.device)
        rows.append(F.normalize(model.get_text_features(tokens["input_ids"], tokens["attention_mask"]), dim=-1))
    return torch.cat(rows).cpu()


def retrieve(volume, reports: list[str], clip=None, top_k: int = 5,
             modality: str | None = None, report_embeddings: torch.Tensor | None = None) -> list[dict]:
    """The `top_k` reports closest to a volume by cosine similarity.

    Args:
        volume: anything `read_volume` takes.
        reports (`list[str]`): the gallery.
        clip (`tuple`, *optional*): `(model, processor)` of a VoxCLIP; `None` loads `load_voxclip()`.
        report_embeddings (`torch.Tensor` of shape `(N, P)`, *optional*): `embed_reports(reports)`, when cached.

    Returns:
        `list[dict]`: `{"rank", "index", "score", "report"}`, best first.
    """
    if not reports:
        raise ValueError("The report gallery is empty")
    clip = clip or load_voxclip()
    _, processor = clip
    texts = report_embeddings if report_embeddings is not None else embed_reports(reports, clip)
    scores = texts @ embed_volume(read_input(volume, processor.image_processor), clip, modality)  # (N, P) @ (P,)
    best = scores.argsort(descending=True)[:top_k].tolist()
    return [{"rank": r + 1, "index": i, "score": round(float(scores[i]), 4), "report": reports[i]}
            for r, i in enumerate(best)]


@torch.no_grad()
def classify(volume, labels: list[str], clip=None, modality: str | None = None) -> dict[str, float]:
    """Zero-shot class probabilities of a volume over free-text labels (prompt ensembles, `evaluation.zero_shot`);
    `clip` is `(model, processor)` of a VoxCLIP (`None`: `load_voxclip()`)."""
    from voxlm.evaluation.zero_shot import class_embeddings, zero_shot_probabilities

    labels = [label.strip() for label in labels if label.strip()]
    if len(labels) < 2:
        raise ValueError(f"Zero-shot classification needs at least two labels, got {labels}")
    model, processor = clip or load_voxclip()
    classes = class_embeddings(model, processor, {label: [label] for label in labels}).cpu()
    pixel_values = processor(images=read_input(volume, processor.image_processor), modality=modality)["pixel_values"]
    probabilities = zero_shot_probabilities(model, pixel_values.to(model.device), classes.to(model.device))  # (1, C)
    return {label: round(float(p), 4) for label, p in zip(labels, probabilities[0].cpu())}


def read_reports(path: str | Path) -> list[str]:
    """A report gallery: JSON (a list of strings or of objects with a `report` field), CSV (a `report` column) or
    plain text (one report per non-empty line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such reports file")
    if path.suffix.lower() == ".json":
        items = json.loads(path.read_text())
        if not isinstance(items, list):
            raise ValueError(f"{path.name}: expected a JSON list of reports, got {type(items).__name__}")
        reports = [item if isinstance(item, str) else item.get("report", "") for item in items]
    elif path.suffix.lower() == ".csv":
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if "report" not in (reader.fieldnames or []):
                raise ValueError(f"{path.name}: the CSV needs a 'report' column, it has {reader.fieldnames}")
            reports = [row["report"] for row in reader]
    else:
        reports = path.read_text().splitlines()
    reports = [r.strip() for r in reports if r and r.strip()]
    if not reports:
        raise ValueError(f"{path.name}: holds no reports")
    return reports
