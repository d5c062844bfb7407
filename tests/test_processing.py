"""The processor on real files that PyPI packages ship, against MONAI's reference pipeline, and on bad input."""

import logging
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import (
    Compose,
    CropForeground,
    EnsureChannelFirst,
    LoadImage,
    Orientation,
    Resize,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
)

import voxlm  # noqa: F401  (registers the processors)
from voxlm.data import generate_case
from voxlm.processing import (
    Volume,
    VolumeError,
    VoxLMProcessor,
    VoxVolumeProcessor,
    add_voxlm_tokens,
    format_box,
    parse_boxes,
    read_study,
    read_volume,
)

PYDICOM_TESTS = Path(pydicom.data.__file__).parent / "test_files"
CT5N = PYDICOM_TESTS / "dicomdirtests" / "98892001" / "CT5N"
EXAMPLE_4D = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"


def synthetic_ct(shape=(60, 50, 40), seed=0) -> np.ndarray:
    """Air around a head-like ellipsoid of soft tissue with a bright lesion, in HU, on (x, y, z) axes."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    ct = np.full(shape, -1000.0)
    ct[(x / 0.8) ** 2 + (y / 0.7) ** 2 + (z / 0.6) ** 2 < 1] = 35.0
    ct[(x - 0.3) ** 2 + y**2 + z**2 < 0.04] = 75.0
    return (ct + rng.normal(0, 3, shape)).astype(np.int16)


def save_nifti(array, affine, path) -> Path:
    nib.save(nib.Nifti1Image(array, affine), path)
    return Path(path)


def monai_reference(path, image_size, window=None, percentiles=None) -> torch.Tensor:
    """The same steps as an explicit MONAI Compose; MONAI keeps (C, x, y, z), voxlm puts depth first."""
    intensity = (
        ScaleIntensityRange(a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True)
        if window is not None
        else ScaleIntensityRangePercentiles(lower=percentiles[0], upper=percentiles[1], b_min=0.0, b_max=1.0, clip=True)
    )
    pipeline = Compose([
        LoadImage(image_only=True),
        EnsureChannelFirst(),
        Orientation(axcodes="RAS"),
        intensity,
        CropForeground(select_fn=lambda x: x > 0, margin=0),
        Resize(spatial_size=tuple(reversed(image_size)), mode="trilinear"),
    ])
    return torch.as_tensor(pipeline(str(path))).permute(0, 3, 2, 1).float()  # (C, x, y, z) -> (C, z, y, x)


def test_ct_nifti_matches_monai_reference(tmp_path):
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    path = save_nifti(synthetic_ct(), affine, tmp_path / "ct.nii.gz")
    processor = VoxVolumeProcessor(image_size=(16, 32, 32), ct_window="brain")
    ours = processor(str(path))["pixel_values"][0]
    torch.testing.assert_close(ours, monai_reference(path, (16, 32, 32), window=(0.0, 80.0)), atol=1e-4, rtol=0)
    assert ours.shape == (1, 16, 32, 32) and ours.min() >= 0 and ours.max() <= 1


def test_mri_template_matches_monai_reference(mni_path):
    processor = VoxVolumeProcessor(image_size=(16, 32, 32), modality="MR")
    ours = processor(str(mni_path))["pixel_values"][0]
    reference = monai_reference(mni_path, (16, 32, 32), percentiles=(0.5, 99.5))
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


def test_nibabel_images_read_like_their_files(mni_path):
    """A loaded or in-memory NIfTI image (what nilearn hands out) keeps its affine, as its file does."""
    from_file = read_volume(mni_path)
    loaded = read_volume(nib.load(mni_path))
    np.testing.assert_array_equal(loaded.array, from_file.array)
    np.testing.assert_allclose(loaded.affine, from_file.affine)
    assert loaded.source == mni_path.name
    image = nib.load(mni_path)
    reverse_x = np.array([[-1.0, 0, 0, image.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    flipped = nib.Nifti1Image(np.asarray(image.dataobj)[::-1], image.affine @ reverse_x)
    in_memory = read_volume(flipped)  # the same head stored right-to-left: the affine undoes the flip
    np.testing.assert_array_equal(in_memory.array, from_file.array)
    corners = np.array([[0.0, 0, 0], [5, 6, 7]])
    np.testing.assert_allclose(in_memory.canonical_to_world(corners), from_file.canonical_to_world(corners))
    assert in_memory.source == "NIfTI image"
    with pytest.raises(VolumeError, match="NIfTI image: 4D data"):
        read_volume(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)))


def test_mri_through_a_ct_processor_is_normalised_as_mr_and_says_why(mni_path, text_processor, caplog):
    """A new user's first call: nilearn's MNI152 T1 through a processor configured for CT (the default, and what saved
    CT models carry) gets the pixel values of `modality="MR"`, the reason in its metadata and a warning; a CT window
    that the caller asks for is applied (near black) with a warning, and a CT window on an MRI is reported unused."""
    assert text_processor.image_processor.modality == "CT"
    with caplog.at_level(logging.WARNING):
        default = text_processor(images=str(mni_path), text="Is there a lesion?", return_metadata=True)
    assert "mni152_t1.nii.gz: normalised as MR by percentiles, not with the processor's CT window" in caplog.text
    explicit = text_processor(images=str(mni_path), text="Is there a lesion?", modality="MR", return_metadata=True)
    torch.testing.assert_close(default["pixel_values"], explicit["pixel_values"], atol=0, rtol=0)
    assert default["metadata"][0].modality == "MR" and explicit["metadata"][0].modality_reason == "given by the caller"
    assert default["metadata"][0].modality_reason == ("no voxel below -200 (the lowest is 0), so not CT in Hounsfield "
                                                      "units, where air is -1000")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        forced = text_processor.image_processor(str(mni_path), modality="CT", return_metadata=True)
        windowed = text_processor.image_processor(str(mni_path), window="bone")
    assert forced["metadata"][0].modality == "CT" and forced["pixel_values"].max() < 0.02  # 0..1 in a 0..80 window
    assert "the CT window is applied as asked to a volume with no voxel below -200" in caplog.text
    assert "the CT window 'bone' is not used: the volume is normalised as MR" in caplog.text
    torch.testing.assert_close(windowed["pixel_values"][0], explicit["pixel_values"][0], atol=0, rtol=0)


def test_modality_rule_on_ct_phantoms_dicom_ct_and_volumes_without_air(caplog):
    """CT phantoms (air at -1000) and pydicom's CT5N (Modality tag CT, a 16 x 16 crop with 18% air) are CT; the
    phantom cropped to the brain (5 to 37 HU, as a skull-stripped CT) cannot be told from an MRI and is MR with a
    warning, also with one stray voxel of air; the caller outranks the tag, the tag outranks the intensities."""
    processor = VoxVolumeProcessor(image_size=(8, 16, 16))
    phantom = generate_case(3, shape=(16, 48, 48)).volume
    modality, reason = processor.choose_modality(read_volume(phantom))
    assert modality == "CT" and reason == ("the processor's modality, and 74.6% of voxels lie below -200 as air does in "
                                           "Hounsfield units")
    brain = phantom[4:12, 16:32, 16:32].copy()
    assert brain.min() > 0
    with caplog.at_level(logging.WARNING):
        assert processor.choose_modality(read_volume(brain))[0] == "MR"
    assert "array input: normalised as MR by percentiles" in caplog.text and "modality='CT'" in caplog.text
    brain[0, 0, 0] = -1000  # one voxel in 2,048: resampling overshoot, not the air of a CT
    assert processor.choose_modality(read_volume(brain)) == (
        "MR", "only 0.05% of voxels below -200 (the lowest is -1000), so not CT in Hounsfield units, where air is -1000")
    tagged = Volume(array=brain.astype(np.float32), affine=np.eye(4), spacing=(1.0, 1.0, 1.0), source="crop",
                    modality="CT")
    assert processor.choose_modality(tagged) == ("CT", "the file's DICOM Modality tag")
    ct5n = read_volume(CT5N)
    assert processor.choose_modality(ct5n) == ("CT", "the file's DICOM Modality tag")
    assert processor.choose_modality(ct5n, "MR") == ("MR", "given by the caller")
    metadata = processor(str(CT5N), return_metadata=True)["metadata"][0]
    assert (metadata.modality, metadata.modality_reason) == ("CT", "the file's DICOM Modality tag")
    # A processor configured for MR keeps percentiles for CT data too: they never turn a volume black.
    assert VoxVolumeProcessor(modality="MR").choose_modality(read_volume(phantom)) == ("MR", "the processor's modality")


def test_orientation_is_checked_not_assumed(tmp_path):
    """The same anatomy stored with flipped and permuted axes preprocesses to the same tensor."""
    ct = synthetic_ct()
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    flipped = ct[::-1, :, ::-1]
    flip_affine = affine.copy()
    flip_affine[0, 0], flip_affine[2, 2] = -0.8, -2.5
    flip_affine[:3, 3] = [0.8 * (ct.shape[0] - 1), 0, 2.5 * (ct.shape[2] - 1)]
    permuted = np.transpose(ct, (2, 0, 1))  # stored as (z, x, y)
    perm_affine = np.zeros((4, 4))
    perm_affine[0, 1], perm_affine[1, 2], perm_affine[2, 0], perm_affine[3, 3] = 0.8, 0.9, 2.5, 1.0
    processor = VoxVolumeProcessor(image_size=(16, 32, 32))
    reference = processor(str(save_nifti(ct, affine, tmp_path / "a.nii.gz")))["pixel_values"]
    for name, data, matrix in (("flip", flipped, flip_affine), ("perm", permuted, perm_affine)):
        other = processor(str(save_nifti(np.ascontiguousarray(data), matrix, tmp_path / f"{name}.nii.gz")))
        torch.testing.assert_close(other["pixel_values"], reference, atol=1e-5, rtol=0)


def test_dicom_ct_series_in_hounsfield_units_from_folder_and_zip(tmp_path):
    volume = read_volume(CT5N)
    assert volume.array.shape == (5, 16, 16) and volume.modality == "CT"
    # Rescale slope / intercept applied: the raw stored values are shifted into HU.
    raw = pydicom.dcmread(next(p for p in CT5N.iterdir())).pixel_array
    assert volume.array.min() < 0 <= raw.min()
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in CT5N.iterdir():
            handle.write(path, f"CT5N/{path.name}")
    np.testing.assert_array_equal(read_volume(archive).array, volume.array)
    pixel_values = VoxVolumeProcessor(image_size=(4, 16, 16))(str(archive))["pixel_values"]
    assert pixel_values.shape == (1, 1, 4, 16, 16)


def test_single_ct_slice_is_refused_as_2d():
    ct_small = PYDICOM_TESTS / "CT_small.dcm"
    assert pydicom.dcmread(ct_small).Modality == "CT"
    with pytest.raises(VolumeError, match="CT_small.dcm.*2D slice"):
        read_volume(ct_small)


def test_4d_needs_a_frame():
    with pytest.raises(VolumeError, match="example4d.nii.gz.*frame=N"):
        read_volume(EXAMPLE_4D)
    volume = read_volume(EXAMPLE_4D, frame=1)
    assert volume.array.ndim == 3
    expected = np.asarray(nib.load(EXAMPLE_4D).dataobj)[..., 1]
    assert sorted(volume.array.shape) == sorted(expected.shape)


def test_mask_maps_back_to_the_source_grid_and_affine(tmp_path, mni_path):
    source = nib.load(mni_path)
    shape = source.shape
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)
    centre = np.array([30, 60, 40])
    blob = (np.linalg.norm(grid - centre, axis=-1) < 7).astype(np.uint8)
    processor = VoxVolumeProcessor(image_size=(32, 64, 64), modality="MR")
    features = processor(str(mni_path), masks=[save_nifti(blob, source.affine, tmp_path / "blob.nii.gz")],
                         return_metadata=True)
    assert features["has_mask"].tolist() == [True] and features["seg_masks"].sum() > 0
    written = processor.save_mask_nifti(features["seg_masks"][0], features["metadata"][0], tmp_path / "back.nii.gz")
    back = nib.load(written)
    assert back.shape == shape
    np.testing.assert_allclose(back.affine, source.affine)
    centroid = np.argwhere(np.asarray(back.dataobj) > 0).mean(axis=0)
    assert np.linalg.norm(centroid - centre) <= 1.0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.nii.gz", "no such file"),
        (lambda d: (d / "notes.nii.gz").write_bytes(b"plain text, not an image") and d / "notes.nii.gz", "NIfTI"),
        (lambda d: (d / "scan.xyz").write_bytes(b"??") and d / "scan.xyz", "unknown volume format"),
        (lambda d: save_nifti(np.zeros((10, 10, 10), np.int16), np.eye(4), d / "flat.nii.gz"), "constant"),
        (lambda d: save_nifti(np.ones((10, 10), np.float32), np.eye(4), d / "flat2d.nii.gz"), "3D volume"),
    ],
)
def test_bad_files_raise_volume_errors_naming_the_problem(tmp_path, make, message):
    with pytest.raises(VolumeError, match=message):
        read_volume(make(tmp_path))


def test_truncated_nifti_is_a_clear_error(tmp_path):
    path = save_nifti(synthetic_ct(), np.eye(4), tmp_path / "ct.nii.gz")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match="truncated.nii.gz.*(truncated|corrupt)"):
        read_volume(truncated)


def test_nan_voxels_raise_unless_replaced():
    array = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    array[1, 2, 3] = np.nan
    array[4, 4, 4] = np.inf
    with pytest.raises(VolumeError, match="2 voxels are NaN or Inf"):
        read_volume(array)
    assert np.isfinite(read_volume(array.copy(), nan_policy="zero").array).all()


def test_huge_header_is_refused_before_allocation(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.int16)
    path = tmp_path / "huge.nii"
    with open(path, "wb") as handle:  # a header that claims 137 GB, with almost no data behind it
        handle.write(header.binaryblock + b"\0" * 4 + b"\1\2" * 8)
    with pytest.raises(VolumeError, match="huge.nii.*above the limit"):
        read_volume(path, max_voxels=512**3)
    npy = tmp_path / "huge.npy"
    with open(npy, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<i2", "fortran_order": False, "shape": (4096,) * 3})
    with pytest.raises(VolumeError, match="above the limit"):
        read_volume(npy, max_voxels=512**3)


def dicom_series_copy(tmp_path, drop=None, resize_one=False) -> Path:
    folder = tmp_path / "series"
    folder.mkdir()
    files = sorted(CT5N.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for index, path in enumerate(files):
        if index == drop:
            continue
        dataset = pydicom.dcmread(path)
        if resize_one and index == 0:
            dataset.Rows = dataset.Rows // 2
        dataset.save_as(folder / path.name)
    return folder


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    with pytest.raises(VolumeError, match="slices are missing"):
        read_volume(dicom_series_copy(tmp_path, drop=2))


def test_dicom_series_with_mixed_slices_is_refused(tmp_path):
    with pytest.raises(VolumeError, match="mixes slice sizes"):
        read_volume(dicom_series_copy(tmp_path, resize_one=True))


@pytest.mark.parametrize("read", [read_volume, read_study], ids=["volume", "study"])
@pytest.mark.parametrize("entry", ["../escape.dcm", "/abs/escape.dcm", "a/../../escape.dcm"])
def test_zip_entries_that_leave_the_folder_are_refused(tmp_path, entry, read):
    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("ok/slice.dcm", b"x")
        handle.writestr(entry, b"x")
    with pytest.raises(VolumeError, match="leave the extraction folder"):
        read(archive)
    assert not (tmp_path.parent / "escape.dcm").exists()


def test_config_round_trip_records_every_step(tmp_path):
    processor = VoxVolumeProcessor(image_size=(16, 32, 32), ct_window=(-50, 150), crop_foreground=False)
    processor.save_pretrained(tmp_path)
    loaded = VoxVolumeProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    saved = (tmp_path / "preprocessor_config.json").read_text()
    for field in ("image_size", "ct_window", "percentiles", "crop_foreground", "orientation", "resample"):
        assert field in saved


@pytest.mark.parametrize("window", ["sinus", (100, 50)])
def test_bad_window_fails_at_construction(window):
    with pytest.raises(ValueError, match="window"):
        VoxVolumeProcessor(ct_window=window)


def test_boxes_format_and_parse():
    text = format_box([0.125, 0.25, 0.0, 0.5, 0.75, 1.2])
    assert text == "<bx_start>[0.125, 0.250, 0.000, 0.500, 0.750, 1.000]<bx_end>"
    assert parse_boxes(f"Here {text} and <bx_start>[0.1, 0.2]<bx_end>") == [[0.125, 0.25, 0.0, 0.5, 0.75, 1.0]]


@pytest.fixture()
def text_processor(smollm2_tokenizer):
    add_voxlm_tokens(smollm2_tokenizer)
    return VoxLMProcessor(VoxVolumeProcessor(image_size=(8, 16, 16)), smollm2_tokenizer, num_image_tokens=8)


def test_prompt_token_count_labels_and_padding(text_processor):
    tokenizer = text_processor.tokenizer
    volume = synthetic_ct().transpose(2, 1, 0)
    batch = text_processor(images=[volume, volume], text=["Is there a bleed?", "Which side?"],
                           answers=["Yes.", "Left [SEG]"])
    assert (batch["input_ids"] == text_processor.image_token_id).sum(dim=1).tolist() == [8, 8]
    assert batch["pixel_values"].shape == (2, 1, 8, 16, 16)
    first = batch["labels"][0][batch["labels"][0] != -100]
    assert tokenizer.decode(first) == "Yes." + tokenizer.eos_token
    assert batch["attention_mask"][0, -1] == 0 or batch["attention_mask"][1, -1] == 0  # right padding
    generation = text_processor(images=[volume, volume], text=["Is there a bleed?", "Which side is it on?"])
    assert "labels" not in generation and generation["attention_mask"][:, -1].tolist() == [1, 1]  # left padding
    assert "<|im_start|>assistant" in tokenizer.decode(generation["input_ids"][0])


def test_question_with_image_tokens_is_refused(text_processor):
    with pytest.raises(ValueError, match="9 image tokens instead of 8"):
        text_processor.tokenize_one("<im_patch> sneaky")
    with pytest.raises(ValueError, match="1 image tokens instead of 0"):
        text_processor(text=["<im_patch> sneaky"])


def test_text_only_prompts_hold_no_image_tokens_and_unknown_arguments_are_refused(text_processor):
    features = text_processor(text=["What is a CT?", "And an MRI?"])
    assert "pixel_values" not in features
    assert not (features["input_ids"] == text_processor.image_token_id).any()
    assert features["input_ids"].shape[0] == 2 and features["attention_mask"].sum(1).min() > 3
    padded = text_processor(text="What is a CT?", padding="max_length", max_length=40)
    assert padded["input_ids"].shape == (1, 40) and padded["attention_mask"].sum() < 40
    with pytest.raises(ValueError, match="truncation=False"):
        text_processor(text="Q?", answers="word " * 50, max_length=40, truncation=False)
    assert text_processor(text="Q?", answers="word " * 50, max_length=40)["input_ids"].shape == (1, 40)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['paddding'\]"):
        text_processor(text="Q?", paddding=True)
    with pytest.raises(ValueError, match="padding=False"):
        text_processor(text="Q?", padding=False)


def test_text_processor_round_trip_and_decoding(text_processor, tmp_path):
    from transformers import AutoProcessor

    text_processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, VoxLMProcessor) and loaded.num_image_tokens == 8
    assert loaded.image_processor.image_size == [8, 16, 16]
    ids = text_processor.tokenizer("It is here [SEG] " + format_box([0.1] * 6) + "<|im_end|>", add_special_tokens=False)
    decoded = loaded.post_process_generation(torch.tensor([ids["input_ids"]]))[0]
    assert decoded["has_seg"] and decoded["boxes"] == [[0.1] * 6] and "<|im_end|>" not in decoded["text"]


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_mha_read_like_the_same_nifti(tmp_path, suffix):
    import SimpleITK as sitk

    ct = synthetic_ct()
    spacing = (0.8, 0.9, 2.5)
    nifti = read_volume(save_nifti(ct, np.diag([*spacing, 1.0]), tmp_path / "ct.nii.gz"))
    image = sitk.GetImageFromArray(np.transpose(ct, (2, 1, 0)))  # SimpleITK arrays are (z, y, x)
    image.SetSpacing(spacing)
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # LPS storage of the same RAS axes
    image.SetOrigin((0.0, 0.0, 0.0))
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image, str(path))
    other = read_volume(path)
    np.testing.assert_array_equal(other.array, nifti.array)
    assert other.spacing == pytest.approx(nifti.spacing)
