"""Converters from public 3D medical datasets into voxlm's Hub format, re-split by patient.

- M3D-Cap: `M3D_Cap.json` (`{split: [{"image": "<case>/<series>/x.npy", "text": ".../text.txt"}]}`), images
  normalised to [0, 1] with a channel axis (LaMed/src/dataset/multi_dataset.py).
- M3D-VQA: CSV with `Image Path, Question Type, Question, Choice A..D, Answer, Answer Choice`; closed questions are
  asked with their choices and answered `"{letter}. {answer}"`, as M3D trains and scores them; the `Question Type`
  (1 to 5) becomes the row's `question_category` (plane, phase, organ, abnormality, location), which closed-VQA
  accuracy is broken down by, as in M3D's paper.
- M3D-Seg (LaMed's preprocessed form): `<tag>/<tag>.json` (decathlon lists `train` / `test` of `{"image", "label"}`),
  one `.npy` mask per class named `..._<class id>.npy`, class names given by the caller.
- M3D-RefSeg: CSV `Image, Mask, Mask_ID, Question_Type, Question, Answer`; the mask is `label_map == Mask_ID`.
- CQ500: `reads.csv` (three readers per scan; a label holds when at least two agree) and a DICOM folder per patient,
  turned into the question-answer pairs of seed 002, section 4.2.
- PhysioNet CT-ICH: `Patient demographics.csv` (hemorrhage types and fracture per patient, found by column name)
  and `ct_scans/<number>.nii`, turned into the same questions.

M3D's own splits put series of one case in several splits; every converter here assigns the split from the patient
id instead, so no patient appears in two splits.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from voxlm.processing import read_volume

from .hub_format import encode_array, split_of, write_dataset

M3D_MODALITY = "M3D (normalised to [0, 1])"  # not "CT": the volume processor then scales by percentiles, not HU
# M3D-VQA's `Question Type`: Data/process/m3d_vqa_data_generation.py asks for questions on these five aspects.
M3D_VQA_CATEGORIES = {"1": "plane", "2": "phase", "3": "organ", "4": "abnormality", "5": "location"}
CQ500_FINDINGS = {"IPH": "intraparenchymal", "IVH": "intraventricular", "SDH": "subdural", "EDH": "epidural",
                  "SAH": "subarachnoid"}
CQ500_CLOSED = {
    "ChronicBleed": "Is there a chronic bleed?",
    "Fracture": "Is there a fracture?",
    "CalvarialFracture": "Is there a calvarial fracture?",
    "MassEffect": "Is there mass effect?",
    "MidlineShift": "Is there a midline shift?",
}


def m3d_patient(image_path: str) -> str:
    """M3D's case folder (`"ct_quizze/000006/Axial/0.npy"` -> `"ct_quizze/000006"`), the unit of a patient."""
    parts = Path(image_path).parts
    if len(parts) < 3:
        raise ValueError(f"M3D image path {image_path!r} does not start with <source>/<case>/")
    return "/".join(parts[:2])


def load_m3d_image(root: Path, relative: str) -> bytes:
    """An M3D `.npy` (`(1, D, H, W)` in [0, 1]) as `.npy` bytes of `(D, H, W)`."""
    array = np.load(root / relative, allow_pickle=False)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"{relative}: expected (1, D, H, W) or (D, H, W), got shape {array.shape}")
    return encode_array(array.astype(np.float32))


def base_row(row_id: str, patient: str, image: bytes, modality: str, split: str) -> dict:
    return dict(id=row_id, patient_id=patient, study_id=patient, image=image, modality=modality, spacing=None,
                report=None, choices=None, mask=None, mask_label=None, box=None, split=split)


def read_records(csv_path: str | Path) -> list[dict]:
    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


def convert_m3d_cap(json_path: str | Path, data_root: str | Path, test_fraction: float = 0.1) -> list[dict]:
    """M3D-Cap image-report pairs as `cap` rows (question: M3D's caption prompt; answer: the report)."""
    data_root = Path(data_root)
    entries = [entry for split_entries in json.loads(Path(json_path).read_text()).values() for entry in split_entries]
    rows = []
    for index, entry in enumerate(entries):
        patient = m3d_patient(entry["image"])
        report = (data_root / entry["text"]).read_text().strip()
        row = base_row(f"m3d-cap-{index:07d}", patient, load_m3d_image(data_root, entry["image"]), M3D_MODALITY,
                       split_of(patient, test_fraction))
        row.update(report=report, question="Describe the findings of this medical image.", answer=report,
                   question_type="report")
        rows.append(row)
    return rows


def convert_m3d_vqa(csv_paths: list[str | Path], data_root: str | Path, test_fraction: float = 0.1) -> list[dict]:
    """M3D-VQA rows (all given CSVs pooled, then re-split by patient): each closed and open question of a row."""
    data_root = Path(data_root)
    rows = []
    for csv_path in csv_paths:
        for index, record in enumerate(read_records(csv_path)):
            patient = m3d_patient(record["Image Path"])
            image = load_m3d_image(data_root, record["Image Path"])
            split = split_of(patient, test_fraction)
            choices = [f"{letter}. {record[f'Choice {letter}']}" for letter in "ABCD"]
            category = str(record["Question Type"]).strip()
            if category not in M3D_VQA_CATEGORIES:
                raise ValueError(f"{Path(csv_path).name}, row {index + 1}: Question Type {category!r} is not one of "
                                 f"M3D-VQA's {sorted(M3D_VQA_CATEGORIES)}")
            closed = base_row(f"m3d-vqa-{Path(csv_path).stem}-{index:07d}-closed", patient, image, M3D_MODALITY, split)
            closed.update(question=f"{record['Question']} Choices: {' '.join(choices)}", choices=choices,
                          answer=f"{record['Answer Choice']}. {record['Answer']}", question_type="closed",
                          question_category=M3D_VQA_CATEGORIES[category], report=record.get("Text"))
            opened = dict(closed, id=closed["id"][: -len("closed")] + "open", question=record["Question"],
                          answer=str(record["Answer"]), choices=None, question_type="open")
            rows += [closed, opened]
    return rows


def load_m3d_mask(root: Path, relative: str, label_value: int | None = None) -> np.ndarray:
    """An M3D mask `.npy` (`(1, D, H, W)` or `(D, H, W)`) as uint8 `(D, H, W)`; with `label_value`, one label of a map."""
    mask = np.load(root / relative, allow_pickle=False)
    mask = mask[0] if mask.ndim == 4 else mask
    return ((mask == label_value) if label_value is not None else (mask > 0)).astype(np.uint8)


def convert_m3d_seg(root: str | Path, tag: str, class_names: list[str], test_fraction: float = 0.1) -> list[dict]:
    """One M3D-Seg sub-dataset as `seg` rows: "Segment the <class>." answered with `[SEG]` (or that it is absent)."""
    root = Path(root)
    listing = json.loads((root / tag / f"{tag}.json").read_text())
    rows = []
    for index, entry in enumerate(listing.get("train", []) + listing.get("test", [])):
        class_id = int(Path(entry["label"]).stem.split("_")[-1])
        if not 0 <= class_id < len(class_names):
            raise ValueError(f"{entry['label']}: class id {class_id} has no name among {len(class_names)} classes")
        mask = load_m3d_mask(root, entry["label"])
        patient = f"m3d-seg-{tag}/{Path(entry['image']).parent.name}"
        row = base_row(f"m3d-seg-{tag}-{index:07d}", patient, load_m3d_image(root, entry["image"]), M3D_MODALITY,
                       split_of(patient, test_fraction))
        name = class_names[class_id]
        present = bool(mask.any())
        row.update(question=f"Can you segment the {name} in this image?", question_type="seg",
                   answer="It is [SEG]." if present else f"There is no {name} in this image.",
                   mask=encode_array(mask) if present else None, mask_label=name)
        rows.append(row)
    return rows


def convert_m3d_refseg(csv_path: str | Path, data_root: str | Path, test_fraction: float = 0.1) -> list[dict]:
    """M3D-RefSeg referring expressions as `refseg` rows with their masks."""
    data_root = Path(data_root)
    rows = []
    for index, record in enumerate(read_records(csv_path)):
        patient = m3d_patient(record["Image"])
        mask = load_m3d_mask(data_root, record["Mask"], int(float(record["Mask_ID"])))
        row = base_row(f"m3d-refseg-{index:07d}", patient, load_m3d_image(data_root, record["Image"]), M3D_MODALITY,
                       split_of(patient, test_fraction))
        row.update(question=record["Question"], answer=record["Answer"], question_type="refseg",
                   mask=encode_array(mask), mask_label=record.get("Question_Type"))
        rows.append(row)
    return rows


def cq500_majority(record: dict, label: str) -> bool:
    """A CQ500 label holds when at least two of its three readers marked it."""
    return sum(int(float(record[f"R{reader}:{label}"] or 0)) for reader in (1, 2, 3)) >= 2


def head_ct_questions(types: list[str], side: str, closed: dict[str, bool]) -> list[dict]:
    """Seed 002's QA pairs: hemorrhage type and side (open), then closed yes/no questions."""
    if types:
        answer = f"{' and '.join(types).capitalize()} hemorrhage{' ' + side if side else ''}."
    else:
        answer = "There is no intracranial hemorrhage."
    qa = [dict(question="What type of hemorrhage is there, and on which side?", answer=answer, question_type="open")]
    qa += [dict(question=question, answer="Yes." if value else "No.", question_type="closed",
                question_category="abnormality") for question, value in closed.items()]
    return qa


def cq500_questions(record: dict) -> list[dict]:
    """Seed 002's QA pairs for one CQ500 scan, from the readers' majority."""
    types = [name for code, name in CQ500_FINDINGS.items() if cq500_majority(record, code)]
    left, right = cq500_majority(record, "BleedLocation-Left"), cq500_majority(record, "BleedLocation-Right")
    side = "on both sides" if left and right else "on the left" if left else "on the right" if right else ""
    return head_ct_questions(types, side, {q: cq500_majority(record, label) for label, q in CQ500_CLOSED.items()})


def physionet_questions(record: dict) -> list[dict]:
    """Seed 002's QA pairs for one PhysioNet CT-ICH patient (the file records no side)."""

    def flag(word: str) -> bool:
        column = next((key for key in record if word.lower() in key.lower()), None)
        if column is None:
            raise ValueError(f"Patient demographics.csv has no column for {word!r}; columns: {sorted(record)}")
        return str(record[column]).strip() in ("1", "1.0", "yes", "Yes")

    types = [name for name in ("intraventricular", "intraparenchymal", "subarachnoid", "epidural", "subdural")
             if flag(name)]
    return head_ct_questions(types, "", {"Is there a fracture?": flag("fracture")})


def head_ct_rows(patient: str, source, questions: list[dict], test_fraction: float) -> list[dict]:
    """One CT (read into HU, canonical) and its questions as rows of one patient."""
    volume = read_volume(source)
    image = encode_array(volume.array.astype(np.int16))
    split = split_of(patient, test_fraction)
    rows = []
    for index, qa in enumerate(questions):
        row = base_row(f"{patient}-q{index:02d}", patient, image, "CT", split)
        row.update(qa, spacing=list(volume.spacing))
        rows.append(row)
    return rows


def convert_physionet(demographics_csv: str | Path, scans_root: str | Path, test_fraction: float = 0.2) -> list[dict]:
    """PhysioNet CT-ICH patients (`ct_scans/<number>.nii`) as `vqa` rows."""
    scans_root = Path(scans_root)
    rows = []
    for record in read_records(demographics_csv):
        number_column = next(key for key in record if "patient" in key.lower())
        number = str(record[number_column]).strip()
        if not number.isdigit():  # the file's second header line
            continue
        rows += head_ct_rows(f"physionet-ich-{int(number):03d}", scans_root / f"{int(number):03d}.nii",
                             physionet_questions(record), test_fraction)
    return rows


def convert_cq500(reads_csv: str | Path, images_root: str | Path, test_fraction: float = 0.2) -> list[dict]:
    """CQ500 scans (a DICOM folder per patient, named as in `reads.csv`) as `vqa` rows."""
    images_root = Path(images_root)
    rows = []
    for record in read_records(reads_csv):
        rows += head_ct_rows(record["name"], images_root / record["name"], cq500_questions(record), test_fraction)
    return rows


def write_converted(rows: list[dict], out_dir: str | Path, source: str, overwrite: bool = False) -> Path:
    """Write converted rows as a voxlm dataset with a card naming the source (`overwrite`: as in `write_dataset`)."""
    description = f"# {source} in voxlm's format\n\nConverted by `voxlm.data.converters`; splits by patient."
    return write_dataset(rows, out_dir, description, overwrite=overwrite)
