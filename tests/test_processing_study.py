"""Studies in the processor: a DICOM folder or `.zip` of several series (pydicom's CT series and a re-identified
copy), lists of NIfTI / DICOM files (nilearn's MNI152), padding and scan masks, prompts with one set of placeholders
per series, and the errors for unusable input."""

import nibabel as nib
import numpy as np
import pytest
import torch
from study_files import CT5N, LOCALISER, SECOND_SERIES, copy_series, write_dicom_study, zip_folder

import voxlm  # noqa: F401  (registers the processors)
from voxlm.processing import (
    Study,
    VolumeError,
    VoxLMProcessor,
    VoxVolumeProcessor,
    add_voxlm_tokens,
    read_study,
    read_volume,
)

CT5N_DESCRIPTION = "SmartScore - Gated 0.5 sec"


@pytest.fixture(scope="module")
def dicom_study(tmp_path_factory):
    return write_dicom_study(tmp_path_factory.mktemp("dicom") / "study")


@pytest.fixture(scope="module")
def mni_path(tmp_path_factory):
    from nilearn.datasets import load_mni152_template

    path = tmp_path_factory.mktemp("mni") / "mni152_t1.nii.gz"
    nib.save(load_mni152_template(resolution=4), path)
    return path


def test_dicom_folder_and_zip_read_as_series_by_uid_in_series_number_order(dicom_study, tmp_path):
    expected = read_volume(CT5N).array
    for source in (dicom_study, zip_folder(dicom_study, tmp_path / "study.zip")):
        study = read_study(source)
        assert study.descriptions == [CT5N_DESCRIPTION, SECOND_SERIES] and len(study) == 2
        assert study.skipped == [f"{LOCALISER}: the series has a single slice; a volume needs at least 2"]
        np.testing.assert_array_equal(study.volumes[0].array, expected)
        np.testing.assert_array_equal(study.volumes[1].array, expected + 100)
        assert all(volume.modality == "CT" for volume in study.volumes)


def test_file_lists_keep_their_order_and_group_loose_dicom_slices(dicom_study, mni_path, tmp_path):
    slices = sorted((dicom_study / "brighter").iterdir()) + sorted((dicom_study / "ct5n").iterdir())
    localiser = next((dicom_study / "localiser").iterdir())
    study = read_study([mni_path, *slices[::-1], localiser])
    assert study.descriptions == ["mni152_t1.nii.gz", CT5N_DESCRIPTION, SECOND_SERIES]
    np.testing.assert_array_equal(study.volumes[0].array, read_volume(mni_path).array)
    np.testing.assert_array_equal(study.volumes[2].array, read_volume(dicom_study / "brighter").array)
    assert len(study.skipped) == 1 and study.skipped[0].startswith(LOCALISER)
    single = read_study(mni_path)  # one file: a one-series study
    assert len(single) == 1 and single.descriptions == ["mni152_t1.nii.gz"]


def test_series_without_a_description_are_named_by_number(tmp_path):
    copy_series(tmp_path / "study" / "a", 3, None)
    assert read_study(tmp_path / "study").descriptions == ["series 3"]


def test_volume_processor_pads_studies_and_preprocesses_each_series_alone(dicom_study, mni_path):
    processor = VoxVolumeProcessor(image_size=(4, 16, 16))
    batch = processor.preprocess_studies([dicom_study, [mni_path]], modality=None, return_metadata=True)
    assert batch["pixel_values"].shape == (2, 2, 1, 4, 16, 16)
    assert batch["scan_mask"].tolist() == [[True, True], [True, False]]
    assert batch["series_descriptions"] == [[CT5N_DESCRIPTION, SECOND_SERIES], ["mni152_t1.nii.gz"]]
    torch.testing.assert_close(batch["pixel_values"][0, 0], processor(str(CT5N))["pixel_values"][0])
    torch.testing.assert_close(batch["pixel_values"][1, 0], processor(str(mni_path))["pixel_values"][0])
    assert batch["pixel_values"][1, 1].abs().sum() == 0  # padding
    assert [len(m) for m in batch["metadata"]] == [2, 1]
    one = processor.preprocess_studies(dicom_study)  # a folder alone is one study: (1, S, C, D, H, W)
    assert one["pixel_values"].shape == (1, 2, 1, 4, 16, 16)


@pytest.fixture()
def study_processor(smollm2_tokenizer):
    add_voxlm_tokens(smollm2_tokenizer)
    return VoxLMProcessor(VoxVolumeProcessor(image_size=(4, 16, 16)), smollm2_tokenizer, num_image_tokens=8,
                          max_study_scans=2)


def test_prompts_hold_the_placeholders_of_each_study(study_processor, dicom_study, mni_path):
    image_token = study_processor.image_token_id
    single = study_processor(studies=dicom_study, text="Compare the two series.", return_metadata=True)
    assert (single["input_ids"] == image_token).sum().item() == 2 * 8 + 1
    assert single["pixel_values"].shape == (1, 2, 1, 4, 16, 16) and single["scan_mask"].tolist() == [[True, True]]
    assert single["series_descriptions"] == [[CT5N_DESCRIPTION, SECOND_SERIES]] and len(single["metadata"][0]) == 2
    batch = study_processor(studies=[dicom_study, [mni_path]], text=["Any bleed?", "Any mass?"],
                            answers=["No.", "No."], masks=[None, read_volume(mni_path).array > 0])
    assert (batch["input_ids"] == image_token).sum(dim=1).tolist() == [17, 8]
    assert batch["scan_mask"].tolist() == [[True, True], [True, False]]
    assert batch["has_mask"].tolist() == [False, True] and batch["seg_masks"][1].sum() > 0
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "scan_mask", "seg_masks", "has_mask"}
    plain = study_processor(images=[read_volume(mni_path)], text=["Any mass?"])
    assert (plain["input_ids"] == image_token).sum().item() == 8 and "scan_mask" not in plain


def test_study_processor_round_trip_keeps_the_series_cap(study_processor, tmp_path):
    from transformers import AutoProcessor

    study_processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.max_study_scans == 2 and loaded.num_study_image_tokens(2) == 17


def test_unusable_studies_raise_clear_errors(study_processor, dicom_study, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(VolumeError, match="empty: no DICOM image slices"):
        read_study(tmp_path / "empty")
    copy_series(tmp_path / "scouts" / "a", 1, "SCOUT", slices=1)
    with pytest.raises(VolumeError, match=r"scouts: no DICOM series could be read as a volume \(SCOUT: the series "
                       "has a single slice"):
        read_study(tmp_path / "scouts")
    with pytest.raises(VolumeError, match=r"study: the study holds 2 series .* more than the 1 this model reads"):
        read_study(dicom_study, max_series=1)
    copy_series(write_dicom_study(tmp_path / "three", localiser=False) / "third", 9, "THIRD")
    with pytest.raises(VolumeError, match="three: the study holds 3 series"):
        study_processor(studies=tmp_path / "three", text="Too many?")
    with pytest.raises(ValueError, match="1 studies for 2 questions"):
        study_processor(studies=dicom_study, text=["a?", "b?"])
    with pytest.raises(ValueError, match="not several"):
        study_processor(images=[CT5N], studies=dicom_study, text="a?")
    with pytest.raises(VolumeError, match="empty list"):
        read_study([])
    assert isinstance(read_study(read_study(dicom_study)), Study)
