"""DICOM SEG and SR out of `voxlm predict` on pydicom's CT5N series, read back with highdicom and pydicom: the SEG's
frames are the source slices that hold mask voxels, at their positions, with the voxels of `--mask-out`'s NIfTI; the
SR holds the question, the answer, the boxes in the patient frame and the SEG's reference."""

import dataclasses
import json

import highdicom
import nibabel as nib
import numpy as np
import pydicom
import pytest
from study_files import CT5N
from tiny_models import DEMO_SEG_QUESTION

from voxlm import cli, dicom_output, inference

# A box the answer is made to hold (the demo model answers without one): (z1, y1, x1, z2, y2, x2) in [0, 1].
BOX = [0.1, 0.2, 0.3, 0.6, 0.7, 0.9]


@pytest.fixture(scope="module")
def voxlm_pair(demo_model_dirs):
    return inference.load_voxlm(str(demo_model_dirs[0]))


@pytest.fixture()
def answer_with_a_box(monkeypatch):
    """The model's answer with `BOX` added, for everything after generation (parsing is tested elsewhere)."""
    generate = inference._generate

    def with_box(*args, **kwargs):
        answer, mask_logits = generate(*args, **kwargs)
        return {**answer, "boxes": [BOX]}, mask_logits

    monkeypatch.setattr(inference, "_generate", with_box)


def source_datasets() -> dict:
    """CT5N's slices by SOP Instance UID."""
    return {dataset.SOPInstanceUID: dataset for dataset in map(pydicom.dcmread, CT5N.iterdir())}


def test_seg_and_sr_of_the_ct5n_series_read_back(demo_model_dirs, answer_with_a_box, tmp_path, capsys):
    seg_path, sr_path, mask_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm", tmp_path / "mask.nii.gz"
    assert cli.main(["predict", str(CT5N), "--question", DEMO_SEG_QUESTION, "--model", str(demo_model_dirs[0]),
                     "--mask-out", str(mask_path), "--dicom-seg-out", str(seg_path), "--dicom-sr-out", str(sr_path),
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dicom_seg_path"] == str(seg_path) and result["dicom_sr_path"] == str(sr_path)
    mask = np.asarray(nib.load(mask_path).dataobj)  # (columns, rows, slices): the source grid
    sources = source_datasets()
    first = next(iter(sources.values()))

    seg = highdicom.seg.segread(seg_path)
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert [item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence] == [first.SeriesInstanceUID]
    assert seg.get_segment_description(1).segment_label == "brain"  # what DEMO_SEG_QUESTION asks to segment
    assert seg.Manufacturer == "voxlm" and seg.ContentQualification == "RESEARCH"
    # One frame per source slice that holds mask voxels, each at that slice's position, holding its voxels.
    slices_with_voxels = {k for k in range(mask.shape[2]) if mask[:, :, k].any()}
    assert seg.NumberOfFrames == len(slices_with_voxels) > 0
    stacked = sorted(sources.values(), key=lambda d: float(d.ImagePositionPatient[2]))  # CT5N is axial, feet first
    frames = seg.pixel_array.reshape(-1, first.Rows, first.Columns)  # (frames, rows, columns)
    seen = set()
    for frame, groups in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        source_uid = groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        source = sources[source_uid]
        k = [d.SOPInstanceUID for d in stacked].index(source_uid)
        seen.add(k)
        np.testing.assert_allclose(groups.PlanePositionSequence[0].ImagePositionPatient, source.ImagePositionPatient)
        np.testing.assert_array_equal(frame, mask[:, :, k].T)
    assert seen == slices_with_voxels

    report = highdicom.sr.srread(sr_path)
    assert report.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert report.StudyInstanceUID == first.StudyInstanceUID and report.ContentQualification == "RESEARCH"
    items = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in report.ContentSequence}
    assert items["Request"].TextValue == DEMO_SEG_QUESTION
    assert "Research use only" in items["Comment"].TextValue
    findings = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in items["Findings"].ContentSequence}
    assert findings["Finding"].TextValue == result["answer"]
    region = findings["Image Region"]
    assert region.GraphicType == "MULTIPOINT" and region.ReferencedFrameOfReferenceUID == first.FrameOfReferenceUID
    lps = np.asarray(region.GraphicData, dtype=float).reshape(2, 3)
    ras = np.asarray(result["boxes_ras_mm"][0])  # (2, 3), rounded to 0.01 mm in the JSON
    np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=0.006)
    assert findings["Referenced Segment"].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    evidence = {item.ReferencedSOPInstanceUID for study in report.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert evidence == set(sources) | {seg.SOPInstanceUID}


def test_seg_leaves_out_slices_without_mask_voxels(voxlm_pair):
    prediction = inference.predict(CT5N, DEMO_SEG_QUESTION, *voxlm_pair, max_new_tokens=8)
    mask = prediction.mask.copy()
    mask[:, :, [0, 3]] = 0
    mask[2:5, 3:9, 1] = 1
    seg = dicom_output.dicom_segmentation(dataclasses.replace(prediction, mask=mask), "brain", "tiny-model")
    positions = {tuple(np.round(groups.PlanePositionSequence[0].ImagePositionPatient, 3))
                 for groups in seg.PerFrameFunctionalGroupsSequence}
    expected = {tuple(np.round(prediction.volume.dicom_slices[k].ImagePositionPatient, 3))
                for k in range(mask.shape[2]) if mask[:, :, k].any()}
    assert positions == expected and len(expected) == 3


def test_an_answer_without_seg_gives_a_report_and_no_segmentation(voxlm_pair):
    prediction = inference.predict(CT5N, DEMO_SEG_QUESTION, *voxlm_pair, max_new_tokens=8)
    prediction = dataclasses.replace(prediction, mask=None, has_seg=False, text="No hemorrhage.")
    segmentation, report = dicom_output.write_dicom_results(prediction, "Is there a hemorrhage?", "tiny-model")
    assert segmentation is None
    findings = report.ContentSequence[2].ContentSequence
    assert [item.ValueType for item in findings] == ["TEXT"] and findings[0].TextValue == "No hemorrhage."
    with pytest.raises(ValueError, match="holds no \\[SEG\\]"):
        dicom_output.dicom_segmentation(prediction, "hemorrhage", "tiny-model")


def test_dicom_outputs_need_a_dicom_input(demo_model_dirs, mni_path, tmp_path):
    with pytest.raises(SystemExit, match="mni152_t1.nii.gz is not a DICOM series"):
        cli.main(["predict", str(mni_path), "--question", DEMO_SEG_QUESTION, "--model", str(demo_model_dirs[0]),
                  "--modality", "MR", "--dicom-sr-out", str(tmp_path / "sr.dcm")])
    assert not (tmp_path / "sr.dcm").exists()


@pytest.mark.parametrize("question, label", [
    ("Segment the hemorrhage in this CT.", "hemorrhage"),
    ("Please segment the left kidney on the scan", "left kidney"),
    ("Can you outline any nodules in this image?", "nodules"),
    ("Is there a hemorrhage?", "Is there a hemorrhage"),
])
def test_segment_label_is_what_was_asked_for(question, label):
    assert dicom_output.segment_label(question) == label


def test_ras_to_lps_flips_x_and_y():
    np.testing.assert_array_equal(dicom_output.ras_to_lps([[1.0, 2.0, 3.0]]), [[-1.0, -2.0, 3.0]])
