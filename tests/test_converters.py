"""Converters turn small fixture copies of each layout into rows that stream with `load_dataset`, split by patient."""

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from datasets import load_dataset

from voxlm.data.converters import (
    convert_cq500,
    convert_m3d_cap,
    convert_m3d_refseg,
    convert_m3d_seg,
    convert_m3d_vqa,
    convert_physionet,
    cq500_questions,
    write_converted,
)

CT5N = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


def m3d_tree(root: Path, cases: int) -> list[str]:
    """`ct_quizze/<case>/<series>/0.npy` (1, D, H, W) in [0, 1] with `text.txt`, two series per case."""
    paths = []
    rng = np.random.default_rng(0)
    for case in range(cases):
        for series in ("Axial", "Coronal"):
            folder = root / "ct_quizze" / f"{case:06d}" / series
            folder.mkdir(parents=True)
            np.save(folder / "0.npy", rng.random((1, 4, 8, 8)).astype(np.float32))
            (folder / "text.txt").write_text(f"Case {case} {series}: a finding.")
            paths.append(f"ct_quizze/{case:06d}/{series}")
    return paths


def streamed(folder, config):
    return {split: list(load_dataset(str(folder), config, split=split, streaming=True))
            for split in ("train", "test") if any((folder / "data" / config).glob(f"{split}-*"))}


def assert_split_by_patient(rows):
    splits = {}
    for row in rows:
        splits.setdefault(row["patient_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits.values())


def test_m3d_cap_rows_stream_and_keep_series_of_a_case_together(tmp_path):
    series = m3d_tree(tmp_path / "M3D_Cap", cases=12)
    # M3D's own split puts the two series of a case in different splits; the converter must not.
    listing = {"train": [{"image": f"{s}/0.npy", "text": f"{s}/text.txt"} for s in series[::2]],
               "test": [{"image": f"{s}/0.npy", "text": f"{s}/text.txt"} for s in series[1::2]]}
    (tmp_path / "M3D_Cap.json").write_text(json.dumps(listing))
    rows = convert_m3d_cap(tmp_path / "M3D_Cap.json", tmp_path / "M3D_Cap", test_fraction=0.3)
    assert len(rows) == 24 and rows[0]["answer"].startswith("Case")
    assert_split_by_patient(rows)
    out = write_converted(rows, tmp_path / "out", "M3D-Cap")
    loaded = [row for split_rows in streamed(out, "cap").values() for row in split_rows]
    assert len(loaded) == 24
    assert_split_by_patient(loaded)


def test_m3d_vqa_closed_and_open_rows(tmp_path):
    series = m3d_tree(tmp_path / "M3D_Cap", cases=6)
    header = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
              "Answer", "Answer Choice"]
    with open(tmp_path / "M3D_VQA_train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for index, path in enumerate(series):
            writer.writerow([f"{path}/0.npy", "report", "1", "Which plane is this?", "Axial", "Sagittal",
                             "Coronal", "Oblique", "Axial", "A"])
    rows = convert_m3d_vqa([tmp_path / "M3D_VQA_train.csv"], tmp_path / "M3D_Cap", test_fraction=0.3)
    closed = [r for r in rows if r["question_type"] == "closed"]
    opened = [r for r in rows if r["question_type"] == "open"]
    assert len(closed) == len(opened) == 12
    assert closed[0]["answer"] == "A. Axial" and "Choices: A. Axial B. Sagittal" in closed[0]["question"]
    assert opened[0]["answer"] == "Axial"
    loaded = [row for split_rows in streamed(write_converted(rows, tmp_path / "out", "M3D-VQA"), "vqa").values()
              for row in split_rows]
    assert len(loaded) == 24
    assert_split_by_patient(loaded)


def cq500_record(name, **labels):
    record = {"name": name, "Category": "B1"}
    for reader in (1, 2, 3):
        for label in ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "BleedLocation-Right",
                      "ChronicBleed", "Fracture", "CalvarialFracture", "OtherFracture", "MassEffect", "MidlineShift"):
            record[f"R{reader}:{label}"] = str(labels.get(label, (0, 0, 0))[reader - 1])
    return record


def test_cq500_majority_vote_and_questions():
    qa = cq500_questions(cq500_record("CQ500-CT-1", IPH=(1, 1, 0), SDH=(1, 0, 0), **{
        "BleedLocation-Left": (1, 1, 1), "MassEffect": (0, 1, 1), "Fracture": (1, 0, 0)}))
    answers = {q["question"]: q["answer"] for q in qa}
    assert answers["What type of hemorrhage is there, and on which side?"] == "Intraparenchymal hemorrhage on the left."
    assert answers["Is there mass effect?"] == "Yes." and answers["Is there a fracture?"] == "No."
    normal = {q["question"]: q["answer"] for q in cq500_questions(cq500_record("CQ500-CT-2"))}
    assert normal["What type of hemorrhage is there, and on which side?"] == "There is no intracranial hemorrhage."


@pytest.mark.parametrize("num_patients", [4])
def test_cq500_rows_from_dicom_folders(tmp_path, num_patients):
    records = [cq500_record(f"CQ500-CT-{i}", IVH=(1, 1, 1) if i % 2 else (0, 0, 0)) for i in range(num_patients)]
    with open(tmp_path / "reads.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    for record in records:
        shutil.copytree(CT5N, tmp_path / "scans" / record["name"])
    rows = convert_cq500(tmp_path / "reads.csv", tmp_path / "scans", test_fraction=0.5)
    assert len(rows) == num_patients * 6
    assert {r["modality"] for r in rows} == {"CT"}
    loaded = [row for split_rows in streamed(write_converted(rows, tmp_path / "out", "CQ500"), "vqa").values()
              for row in split_rows]
    assert len(loaded) == len(rows)
    assert_split_by_patient(loaded)
    first = next(r for r in loaded if r["patient_id"] == "CQ500-CT-1" and r["question_type"] == "open")
    assert first["answer"] == "Intraventricular hemorrhage."


def test_m3d_seg_rows_carry_masks_and_class_names(tmp_path):
    rng = np.random.default_rng(1)
    entries = []
    for case in range(6):
        folder = tmp_path / "0003" / f"case{case}"
        folder.mkdir(parents=True)
        np.save(folder / "image.npy", rng.random((1, 4, 8, 8)).astype(np.float32))
        for class_id in (0, 1):
            mask = np.zeros((1, 4, 8, 8), np.int8)
            if class_id == 0:
                mask[0, 1:3, 2:5, 2:5] = 1
            np.save(folder / f"mask_{class_id}.npy", mask)
            entries.append({"image": f"0003/case{case}/image.npy", "label": f"0003/case{case}/mask_{class_id}.npy"})
    (tmp_path / "0003" / "0003.json").write_text(json.dumps({"train": entries[:8], "test": entries[8:]}))
    rows = convert_m3d_seg(tmp_path, "0003", ["liver", "spleen"], test_fraction=0.3)
    liver = [r for r in rows if r["mask_label"] == "liver"]
    spleen = [r for r in rows if r["mask_label"] == "spleen"]
    assert all(r["answer"] == "It is [SEG]." and r["mask"] is not None for r in liver)
    assert all(r["answer"] == "There is no spleen in this image." and r["mask"] is None for r in spleen)
    assert_split_by_patient(rows)
    loaded = [row for rows_ in streamed(write_converted(rows, tmp_path / "out", "M3D-Seg"), "seg").values()
              for row in rows_]
    assert len(loaded) == 12
    with pytest.raises(ValueError, match="class id 1 has no name"):
        convert_m3d_seg(tmp_path, "0003", ["liver"])


def test_m3d_refseg_selects_the_mask_id(tmp_path):
    series = m3d_tree(tmp_path / "data", cases=4)
    label_map = np.zeros((1, 4, 8, 8), np.int16)
    label_map[0, :2] = 3
    label_map[0, 2:] = 5
    with open(tmp_path / "refseg.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image", "Mask", "Mask_ID", "Question_Type", "Question", "Answer"])
        for path in series:
            np.save(tmp_path / "data" / path / "mask.npy", label_map)
            writer.writerow([f"{path}/0.npy", f"{path}/mask.npy", "5", "0", "Where is the lesion?", "It is [SEG]."])
    rows = convert_m3d_refseg(tmp_path / "refseg.csv", tmp_path / "data", test_fraction=0.3)
    mask = np.load(io.BytesIO(rows[0]["mask"]), allow_pickle=False)
    np.testing.assert_array_equal(mask, (label_map[0] == 5).astype(np.uint8))
    loaded = [row for rows_ in streamed(write_converted(rows, tmp_path / "out", "RefSeg"), "refseg").values()
              for row in rows_]
    assert len(loaded) == 8
    assert_split_by_patient(loaded)


def test_physionet_rows_from_demographics_and_nifti(tmp_path):
    import nibabel as nib

    (tmp_path / "ct_scans").mkdir()
    header = ["Patient Number", "Age (years)", "Gender", "Intraventricular", "Intraparenchymal", "Subarachnoid",
              "Epidural", "Subdural", "Fracture (yes 1/no 0)", "Condition on file", "Note1"]
    with open(tmp_path / "Patient demographics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerow(["", "", "", "Hemorrhage type", "", "", "", "", "", "", ""])  # the file's second header line
        for number in (49, 50, 51):
            writer.writerow([number, 40, "Male", 0, 1 if number == 50 else 0, 0, 0, 0, 1 if number == 51 else 0,
                             "", ""])
            volume = np.random.default_rng(number).integers(-1000, 100, (16, 16, 6)).astype(np.int16)
            nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "ct_scans" / f"{number:03d}.nii")
    rows = convert_physionet(tmp_path / "Patient demographics.csv", tmp_path / "ct_scans", test_fraction=0.3)
    answers = {(r["patient_id"], r["question"]): r["answer"] for r in rows}
    open_question = "What type of hemorrhage is there, and on which side?"
    assert answers[("physionet-ich-050", open_question)] == "Intraparenchymal hemorrhage."
    assert answers[("physionet-ich-049", open_question)] == "There is no intracranial hemorrhage."
    assert answers[("physionet-ich-051", "Is there a fracture?")] == "Yes."
    loaded = [row for rows_ in streamed(write_converted(rows, tmp_path / "out", "PhysioNet"), "vqa").values()
              for row in rows_]
    assert len(loaded) == 6
    assert_split_by_patient(loaded)
