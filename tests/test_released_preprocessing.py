"""The processors of the released encoders voxlm converts equal their sources' own preprocessing code on nilearn's
MNI152 template, as it is and in Hounsfield units (references made by tests/released_preprocessing/make_references.py
with colipri 0.1.3's TorchIO pipeline, HLIP's CT-RATE scripts, Merlin's MONAI transforms and Med3DVLM's M3D-Cap
preparation)."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from voxlm.processing import VoxVolumeProcessor, dcformer_volume_processor, released_encoder_processor
from voxlm.processing.image_processing_voxlm import pad_crop_bounds, pad_or_crop

REFERENCES = Path(__file__).parent / "released_preprocessing" / "references.safetensors"


@pytest.fixture(scope="module")
def mni_inputs():
    from nilearn.datasets import load_mni152_template

    image = load_mni152_template(resolution=1)
    data = image.get_fdata(dtype=np.float32)
    return {"mni": nib.Nifti1Image(data, image.affine),
            "mni_hu": nib.Nifti1Image((data * 3000.0 - 1000.0).astype(np.float32), image.affine)}


def assert_equals_reference(pixel_values: torch.Tensor, key: str) -> None:
    """`pixel_values (1, D, H, W)` equal the source's output stored under `key`: the strided voxels to 1e-4, and the
    sums over every voxel to a mean difference of 1e-6 (above float32 rounding, a difference is a systematic one)."""
    references = load_file(REFERENCES)
    with safe_open(REFERENCES, "pt") as file:
        stride = int(file.metadata()["stride"])
    pixel_values = pixel_values.double()
    assert list(pixel_values.shape) == references[f"{key}.shape"].tolist(), key
    strided = pixel_values[0, ::stride, ::stride, ::stride]
    torch.testing.assert_close(strided, references[f"{key}.strided"].double(), atol=1e-4, rtol=0, msg=key)
    for statistic, value in (("sum", pixel_values.sum()), ("sum_of_squares", pixel_values.square().sum())):
        mean_difference = abs(float(value) - float(references[f"{key}.{statistic}"])) / pixel_values.numel()
        assert mean_difference < 1e-6, (key, statistic, mean_difference)


@pytest.mark.parametrize("model", ["colipri", "hlip", "merlin"])
def test_processor_equals_source_preprocessing(model, mni_inputs):
    processor = released_encoder_processor(model)
    for name, image in mni_inputs.items():
        # Every one of them is a CT model: the MNI152 template (an MRI) goes through the CT window as the sources put
        # any volume through it.
        assert_equals_reference(processor(image, modality="CT")["pixel_values"][0], f"{model}.{name}")


def test_dcformer_processor_equals_med3dvlm_preparation():
    from nilearn.datasets import load_mni152_template

    # Med3DVLM's volumes come from 8-bit PNG slices: the same 8-bit values, as a NIfTI.
    image = load_mni152_template(resolution=1)
    data = np.round(image.get_fdata() / image.get_fdata().max() * 255).astype(np.float32)
    pixel_values = dcformer_volume_processor()(nib.Nifti1Image(data, image.affine))["pixel_values"][0]
    assert_equals_reference(pixel_values, "dcformer.mni_8bit")


def test_released_processors_save_and_load(tmp_path):
    for model in ("colipri", "hlip", "merlin"):
        processor = released_encoder_processor(model)
        processor.save_pretrained(tmp_path / model)
        loaded = VoxVolumeProcessor.from_pretrained(tmp_path / model)
        assert loaded.to_dict() == processor.to_dict()
    with pytest.raises(ValueError, match="No preprocessing preset 'ct-clip'"):
        released_encoder_processor("ct-clip")


def test_pad_crop_rules():
    # An odd difference: the extra voxel after (floor before), before (TorchIO), or MONAI's centre crop.
    assert pad_crop_bounds(6, 3, "floor_before") == (1, 4)
    assert pad_crop_bounds(6, 3, "ceil_before") == (2, 5)
    assert pad_crop_bounds(6, 3, "monai") == (2, 5)
    assert pad_crop_bounds(7, 4, "monai") == (1, 5)
    assert pad_crop_bounds(3, 6, "floor_before") == (-1, 5)
    assert pad_crop_bounds(3, 6, "ceil_before") == (-2, 4)
    array = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    fitted = pad_or_crop(array, (5, 4, 2), "floor_before", -1.0)
    assert fitted.shape == (5, 4, 2)
    assert (fitted[0] == -1).all() and (fitted[4] == -1).all()
    np.testing.assert_array_equal(fitted[1:4], array[:, :, 1:3])


def test_embedding_processors_refuse_masks():
    processor = released_encoder_processor("merlin")
    with pytest.raises(ValueError, match="embedding only"):
        processor.mask_to_canonical(np.zeros((4, 4, 4)), None)


@pytest.mark.parametrize("settings, message", [
    ({"spacing": (1.0, 0.0, 1.0)}, "`spacing` must be three positive"),
    ({"spacing_grid": "corner"}, "`spacing_grid` must be one of"),
    ({"fit": "crop"}, "`fit` must be one of"),
    ({"axis_order": "LPS"}, "`axis_order` must be one of"),
    ({"output_range": (1.0, -1.0)}, "`output_range` must be"),
    ({"pad_value": "mean"}, "`pad_value` must be a number or 'minimum'"),
    ({"image_mean": 0.5}, "`image_mean` and `image_std` go together"),
])
def test_invalid_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        VoxVolumeProcessor(**settings)
