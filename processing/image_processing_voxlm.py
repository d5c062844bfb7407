"""VoxVolumeProcessor: the one place where a CT or MRI volume becomes `pixel_values`.

Steps, each recorded in `preprocessor_config.json`:

    read (any format) -> canonical orientation (RAS, depth first) -> [resample to `spacing` mm] -> modality (the
    caller's, the DICOM tag, the processor's; `choose_modality`) -> intensity range (`intensity_normalization`: by
    default a CT Hounsfield window / other modalities a percentile window; or the volume's min and max, or percentiles
    for every modality, as M3D's data scripts do) -> scale to `output_range` ([0, 1] by default) -> crop the
    foreground (voxels above the range's low end) -> fit to `image_size` (`fit`: trilinear resize, masks
    `mask_resample_mode`; or pad and crop about the centre) -> [`(x - image_mean) / image_std`] -> [axes to
    `axis_order`] -> (1, D, H, W) float32

`m3d_volume_processor` builds the settings that reproduce the volumes M3D-LaMed was trained on; the presets of the
released encoders voxlm converts (`colipri_volume_processor`, `hlip_volume_processor`, `merlin_volume_processor`,
`dcformer_volume_processor`) those of COLIPRI, HLIP, Merlin and Med3DVLM's DCFormer-SigLIP.

The modality is never guessed silently: each volume's `VolumeMetadata` records the one used and why, and a volume
that cannot be CT in Hounsfield units (no air: hardly a voxel below -200, where air is -1000 HU) is not put through
a CT window unless the caller asks for it, since the window would turn it black.

Training collators, evaluation, the CLI and the Space all call it, so a saved model carries its exact preprocessing.
A study (several series) goes through the same steps series by series, and studies are zero-padded to one number of
scans with a `scan_mask`: `(B, S, 1, D, H, W)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .readers import DEFAULT_MAX_VOXELS, Study, Volume, VolumeError, read_study, read_volume

# Hounsfield windows as (low, high) = (level - width / 2, level + width / 2).
CT_WINDOWS = {
    "brain": (0.0, 80.0),
    "subdural": (-20.0, 180.0),
    "stroke": (8.0, 48.0),
    "soft_tissue": (-160.0, 240.0),
    "lung": (-1350.0, 150.0),
    "bone": (-450.0, 1050.0),
}
CT_MODALITIES = ("CT",)
# A CT in Hounsfield units has air: -1000 HU outside the body, in the airways, sinuses and bowel, and lung is -500 to
# -900, while fat (-50 to -150 HU, noise included) stays above -200. A magnitude MRI has no negative intensities; only
# resampling overshoots below 0, on a few edge voxels. So a volume is taken for CT when more than a thousandth of its
# voxels lie below -200 (pydicom's CT5N, a 16 x 16 crop of a CT, has 18%; the phantoms 75%), a share that edge
# overshoot hardly reaches. A CT cropped or skull-stripped to soft tissue with a background of 0 lacks it and is
# normalised as MR with a warning naming `modality="CT"`: its contrast stays visible, where the opposite mistake (a CT
# window on an MRI of intensities 0 to 1 or 0 to 255) maps the whole volume to black or white.
CT_AIR_BELOW = -200.0
CT_MIN_AIR_SHARE = 1e-3
# What a volume that cannot be CT is normalised as: the percentile window of every modality other than CT.
NOT_CT_MODALITY = "MR"
# `intensity_normalization`: how the intensity range mapped to [0, 1] is chosen (`VoxVolumeProcessor.intensity_range`).
INTENSITY_NORMALIZATIONS = ("window", "minmax", "percentiles", "foreground_percentiles")
# `mask_resample_mode`: "nearest-exact" samples voxel centres; "nearest" is torch's and MONAI's legacy nearest (what
# M3D's `Resized(mode="nearest")` gave its masks), which shifts them by up to a voxel towards the origin.
MASK_RESAMPLE_MODES = ("nearest-exact", "nearest")
# `spacing_grid`: where the voxels of a volume resampled to `spacing` lie, as each source library places them
# (`resample_to_spacing`).
SPACING_GRIDS = ("centre", "origin", "extent")
# `fit`: how the volume reaches `image_size`; `pad_crop_rule`: on which side an odd pad or crop puts its extra voxel
# (`pad_or_crop`).
FITS = ("resize", "pad_or_crop")
PAD_CROP_RULES = ("floor_before", "ceil_before", "monai")
# `axis_order`: the order of `pixel_values`' spatial axes: voxlm's (S, A, R), or (R, A, S), the array order of
# nibabel, MONAI's `Orientation("RAS")` and TorchIO's `ToOrientation("RAS")`.
AXIS_ORDERS = ("SAR", "RAS")

logger = logging.getLogger(__name__)


def is_ct(modality: str) -> bool:
    """Whether `modality` (a DICOM Modality code such as `"CT"`, `"MR"`, any case) is windowed in Hounsfield units."""
    return modality.upper() in CT_MODALITIES


@dataclass
class VolumeMetadata:
    """What it takes to map a result at model resolution back onto the source grid.

    Args:
        volume (`Volume`): the canonical volume's geometry (affine, orientation, source shape); its voxels are dropped.
        canonical_shape (`tuple[int, int, int]`): the canonical `(D, H, W)` before cropping.
        crop (`tuple[tuple[int, int], ...]`): the foreground box `((d0, d1), (h0, h1), (w0, w1))` in canonical voxels.
        modality (`str`, *optional*): the modality the volume was normalised as (`"CT"`: a Hounsfield window; any
            other: percentiles), from [`VoxVolumeProcessor.choose_modality`].
        modality_reason (`str`, *optional*): why that modality, e.g. `"the file's DICOM Modality tag"`.
    """

    volume: Volume
    canonical_shape: tuple[int, int, int]
    crop: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    modality: str | None = None
    modality_reason: str | None = None


def resize_volume(array: np.ndarray | torch.Tensor, size, mode: str = "trilinear") -> torch.Tensor:
    """Resize a `(D, H, W)` array to `size` with `F.interpolate` (`align_corners=False`, as MONAI's `Resize`)."""
    tensor = torch.as_tensor(array, dtype=torch.float32)[None, None]  # (D, H, W) -> (1, 1, D, H, W)
    if tuple(tensor.shape[2:]) == tuple(size):
        return tensor[0, 0]
    align = False if mode == "trilinear" else None
    return F.interpolate(tensor, size=tuple(size), mode=mode, align_corners=align)[0, 0]


def linear_resample_axis(array: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of `array` along `axis` at fractional voxel `positions` (within `[0, n - 1]`)."""
    below = np.clip(np.floor(positions).astype(np.int64), 0, array.shape[axis] - 1)
    above = np.minimum(below + 1, array.shape[axis] - 1)
    weight = (positions - below).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
    return (np.take(array, below, axis=axis) * (1.0 - weight) + np.take(array, above, axis=axis) * weight)


def resample_to_spacing(array: np.ndarray, affine: np.ndarray, spacing, grid: str) -> np.ndarray:
    """A canonical `(D, H, W)` volume resampled (linearly) to `spacing` mm per axis.

    Args:
        array (`np.ndarray` of shape `(D, H, W)`): the canonical volume.
        affine (`np.ndarray` of shape `(4, 4)`): its voxel -> RAS millimetre matrix (the voxel sizes are its columns'
            lengths).
        spacing (sequence of 3 floats): the target voxel size of each axis in mm.
        grid (`str`): where the new voxels lie, as each library places them (`SPACING_GRIDS`):
            - `"centre"`: `floor(n s / t)` voxels of exactly `t` mm centred on the volume's centre, so none lies outside
              it (TorchIO's `Resample`, which SimpleITK interpolates linearly);
            - `"origin"`: MONAI's `Spacing` (the first voxel's centre kept, exactly `t` mm, MONAI's own output shape
              and border padding);
            - `"extent"`: `floor(n s / t)` voxels over the same extent, `F.interpolate(..., mode="trilinear")` to
              that size (voxels close to, not exactly, `t` mm: HLIP's `data/ct_rate/process.py`).
    """
    source = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)  # (3,) mm per canonical axis
    target = np.asarray(spacing, dtype=np.float64)
    shape = np.array(array.shape)
    size = np.where(shape == 1, 1, np.floor(shape * source / target)).astype(int)
    if grid == "extent":
        return resize_volume(array, size).numpy()
    if grid == "centre":
        resampled = np.asarray(array, dtype=np.float64)
        for axis in range(3):
            positions = (shape[axis] - 1) / 2 + (np.arange(size[axis]) - (size[axis] - 1) / 2) * target[axis] / source[axis]
            resampled = linear_resample_axis(resampled, positions, axis)
        return resampled.astype(np.float32)
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    volume = MetaTensor(torch.as_tensor(array, dtype=torch.float32)[None], affine=torch.as_tensor(affine))
    return Spacing(pixdim=tuple(target), mode="bilinear")(volume)[0].numpy().astype(np.float32)


def pad_crop_bounds(size: int, target: int, rule: str) -> tuple[int, int]:
    """`(start, stop)` of the `target` voxels kept from an axis of `size` voxels (outside `[0, size)`: padding).

    `rule` (`PAD_CROP_RULES`): the extra voxel of an odd difference goes after (`"floor_before"`: HLIP's pad and crop,
    MONAI's `SpatialPad`), before (`"ceil_before"`: TorchIO's `CropOrPad`), or as MONAI's `SpatialPad` (floor before)
    then `CenterSpatialCrop` (from `size // 2 - target // 2`) place it (`"monai"`).
    """
    if size < target:
        before = -(-(target - size) // 2) if rule == "ceil_before" else (target - size) // 2
        return -before, target - before
    if rule == "monai":
        start = size // 2 - target // 2
    else:
        start = -(-(size - target) // 2) if rule == "ceil_before" else (size - target) // 2
    return start, start + target


def pad_or_crop(array: np.ndarray, size, rule: str, value: float) -> np.ndarray:
    """`array (D, H, W)` padded with `value` and / or cropped about its centre to `size` (`pad_crop_bounds`)."""
    result = np.full(tuple(size), value, dtype=np.float32)
    source, destination = [], []
    for length, target in zip(array.shape, size):
        start, stop = pad_crop_bounds(length, target, rule)
        source.append(slice(max(start, 0), min(stop, length)))
        destination.append(slice(max(-start, 0), max(-start, 0) + min(stop, length) - max(start, 0)))
    result[tuple(destination)] = array[tuple(source)]
    return result


def pad_studies(studies: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad studies to the longest one.

    Args:
        studies (`list[torch.Tensor]`): each `(S_i, C, D, H, W)`.

    Returns:
        `(pixel_values (B, S, C, D, H, W), scan_mask (B, S))` with `S = max S_i` and `scan_mask` `True` for real scans.
    """
    num_scans = max(study.shape[0] for study in studies)
    pixel_values = torch.zeros(len(studies), num_scans, *studies[0].shape[1:])  # (B, S, C, D, H, W)
    scan_mask = torch.zeros(len(studies), num_scans, dtype=torch.bool)  # (B, S)
    for index, study in enumerate(studies):
        pixel_values[index, : study.shape[0]] = study
        scan_mask[index, : study.shape[0]] = True
    return pixel_values, scan_mask


class VoxVolumeProcessor(BaseImageProcessor):
    r"""
    Turns volumes into `pixel_values (B, 1, D, H, W)` in [0, 1], and masks predicted on them back into the source grid.

    Args:
        image_size (`tuple[int, int, int]`, *optional*, defaults to `(32, 256, 256)`): output `(D, H, W)`.
        modality (`str`, *optional*, defaults to `"CT"`): the modality of volumes that neither the call nor the file
            names: `"CT"` uses `ct_window`; anything else (`"MR"`, ...) uses `percentiles`. With `"CT"`, a volume
            without air (at most `CT_MIN_AIR_SHARE` of its voxels below -200), which cannot be CT in Hounsfield units,
            is normalised as `"MR"` instead, with a warning. A call's `modality` always wins, then the file's DICOM
            Modality tag (`choose_modality`).
        ct_window (`str` or `tuple[float, float]`, *optional*, defaults to `"brain"`): a preset name from
            `CT_WINDOWS` (brain, subdural, stroke, soft_tissue, lung, bone) or a `(low, high)` range in HU.
        percentiles (`tuple[float, float]`, *optional*, defaults to `(0.5, 99.5)`): intensity window of non-CT volumes
            (of every volume with `intensity_normalization="percentiles"`, and of the voxels above the volume's mean
            with `"foreground_percentiles"`).
        crop_foreground (`bool`, *optional*, defaults to `True`): crop to the box of voxels above the intensity
            range's low end (MONAI's `CropForeground` after scaling: voxels above 0).
        max_voxels (`int`, *optional*): refuse volumes whose header claims more voxels (checked before reading them).
        nan_policy (`str`, *optional*, defaults to `"error"`): `"error"` or `"zero"` for NaN / Inf voxels.
        intensity_normalization (`str`, *optional*, defaults to `"window"`): the intensity range mapped to [0, 1]
            (values outside it are clipped), as [`intensity_range`] computes it:
            - `"window"`: per modality, CT through `ct_window`, any other through `percentiles` (`choose_modality`);
            - `"minmax"`: the volume's minimum and maximum, whatever the modality (M3D-Cap and M3D-VQA,
              `Data/process/m3d_cap_data_prepare.py`);
            - `"percentiles"`: `percentiles` of the volume, whatever the modality (MONAI's
              `ScaleIntensityRangePercentiles`; M3D-RefSeg, `m3d_refseg_data_prepare.py`);
            - `"foreground_percentiles"`: `percentiles` of the voxels above the volume's mean, whatever the modality
              (M3D-Seg: `m3d_seg_data_preprocess.py` `normalize`, then the min-max of `m3d_seg_data_prepare.py`).
        mask_resample_mode (`str`, *optional*, defaults to `"nearest-exact"`): how masks are resized to `image_size`:
            `"nearest-exact"` (voxel centres) or `"nearest"` (torch's legacy nearest, MONAI's `Resize(mode="nearest")`,
            what M3D's data scripts gave its training masks).
        spacing (sequence of 3 floats, *optional*): resample each volume to these voxel sizes in mm, per canonical
            `(D, H, W)` axis (`(S, A, R)`), before anything else (default: no resampling).
        spacing_grid (`str`, *optional*, defaults to `"centre"`): where the resampled voxels lie (`SPACING_GRIDS`,
            `resample_to_spacing`): TorchIO's `"centre"`, MONAI's `"origin"` or HLIP's `"extent"`.
        output_range (`tuple[float, float]`, *optional*, defaults to `(0.0, 1.0)`): what the intensity range maps to.
        fit (`str`, *optional*, defaults to `"resize"`): how volumes reach `image_size`: `"resize"` (trilinear) or
            `"pad_or_crop"` (pad with `pad_value` and / or crop about the centre, keeping the voxel size).
        pad_crop_rule (`str`, *optional*, defaults to `"floor_before"`): the side of an odd pad or crop's extra voxel
            (`PAD_CROP_RULES`, `pad_crop_bounds`).
        pad_value (`float` or `"minimum"`, *optional*, defaults to 0.0): the padding, in `output_range` units, or the
            volume's minimum after scaling (TorchIO's `padding_mode="minimum"`).
        image_mean (`float`, *optional*), image_std (`float`, *optional*): a last `(x - image_mean) / image_std`.
        axis_order (`str`, *optional*, defaults to `"SAR"`): the order of the output's spatial axes (`AXIS_ORDERS`):
            voxlm's `(S, A, R)`, or `(R, A, S)`, the array order of TorchIO, MONAI and nibabel on RAS volumes. With
            `"RAS"`, `image_size` is in that order too.

    Masks map back onto the source grid (`postprocess_mask`, `box_to_canonical`) only through a resize of the
    canonical grid: processors with `spacing`, `fit="pad_or_crop"` or `axis_order="RAS"` embed volumes only.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size=(32, 256, 256),
        modality: str = "CT",
        ct_window="brain",
        percentiles=(0.5, 99.5),
        crop_foreground: bool = True,
        max_voxels: int = DEFAULT_MAX_VOXELS,
        nan_policy: str = "error",
        intensity_normalization: str = "window",
        mask_resample_mode: str = "nearest-exact",
        spacing=None,
        spacing_grid: str = "centre",
        output_range=(0.0, 1.0),
        fit: str = "resize",
        pad_crop_rule: str = "floor_before",
        pad_value=0.0,
        image_mean: float | None = None,
        image_std: float | None = None,
        axis_order: str = "SAR",
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value, choices in (("spacing_grid", spacing_grid, SPACING_GRIDS), ("fit", fit, FITS),
                                     ("pad_crop_rule", pad_crop_rule, PAD_CROP_RULES),
                                     ("axis_order", axis_order, AXIS_ORDERS)):
            if value not in choices:
                raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")
        self.spacing = None if spacing is None else [float(v) for v in spacing]
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ValueError(f"`spacing` must be three positive voxel sizes in mm, got {spacing!r}")
        self.spacing_grid, self.fit, self.pad_crop_rule, self.axis_order = spacing_grid, fit, pad_crop_rule, axis_order
        self.output_range = [float(v) for v in output_range]
        if len(self.output_range) != 2 or not self.output_range[0] < self.output_range[1]:
            raise ValueError(f"`output_range` must be (low, high) with low < high, got {output_range!r}")
        if not (pad_value == "minimum" or isinstance(pad_value, (int, float))):
            raise ValueError(f"`pad_value` must be a number or 'minimum', got {pad_value!r}")
        self.pad_value = pad_value if pad_value == "minimum" else float(pad_value)
        if (image_mean is None) != (image_std is None) or (image_std is not None and not image_std > 0):
            raise ValueError(f"`image_mean` and `image_std` go together, with `image_std` > 0; got {image_mean!r} and "
                             f"{image_std!r}")
        self.image_mean = None if image_mean is None else float(image_mean)
        self.image_std = None if image_std is None else float(image_std)
        if intensity_normalization not in INTENSITY_NORMALIZATIONS:
            raise ValueError(f"`intensity_normalization` must be one of {INTENSITY_NORMALIZATIONS}, got "
                             f"{intensity_normalization!r}")
        if mask_resample_mode not in MASK_RESAMPLE_MODES:
            raise ValueError(f"`mask_resample_mode` must be one of {MASK_RESAMPLE_MODES}, got {mask_resample_mode!r}")
        self.intensity_normalization = intensity_normalization
        self.mask_resample_mode = mask_resample_mode
        self.image_size = [int(s) for s in image_size]
        if len(self.image_size) != 3 or min(self.image_size) < 1:
            raise ValueError(f"`image_size` must be three positive ints (D, H, W), got {image_size!r}")
        self.modality = modality
        self.ct_window = ct_window if isinstance(ct_window, str) else [float(v) for v in ct_window]
        self.window_range("CT")  # validates the window now rather than on the first volume
        self.percentiles = [float(p) for p in percentiles]
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"`percentiles` must satisfy 0 <= low < high <= 100, got {percentiles!r}")
        self.crop_foreground = crop_foreground
        self.max_voxels = int(max_voxels)
        self.nan_policy = nan_policy
        self.orientation = ("RAS, depth first (D, H, W) = (S, A, R)" if axis_order == "SAR"
                            else "RAS, (D, H, W) = (R, A, S)")
        # Descriptions, not settings (saved configs carry them, and loading overwrites them from the settings).
        self.resample = f"trilinear (masks: {mask_resample_mode})"

    def window_range(self, modality: str, array: np.ndarray | None = None, window=None) -> tuple[float, float]:
        """The intensity range mapped to [0, 1]: the CT window in HU, or the volume's percentiles."""
        if is_ct(modality):
            window = self.ct_window if window is None else window
            if isinstance(window, str):
                if window not in CT_WINDOWS:
                    raise ValueError(f"Unknown CT window {window!r}; choose one of {sorted(CT_WINDOWS)} or (low, high)")
                return CT_WINDOWS[window]
            low, high = (float(v) for v in window)
            if not low < high:
                raise ValueError(f"A CT window needs low < high, got ({low}, {high})")
            return low, high
        return self.percentile_range(array)

    def percentile_range(self, values: np.ndarray) -> tuple[float, float]:
        """The `percentiles` of `values`, refused when they coincide."""
        low, high = np.percentile(values, self.percentiles)
        if not low < high:
            raise VolumeError("the volume's intensity percentiles coincide; it holds no contrast to scale")
        return float(low), float(high)

    def intensity_range(self, modality: str, array: np.ndarray, window=None) -> tuple[float, float]:
        """The intensity range that `intensity_normalization` maps to [0, 1] (see the class docstring).

        Args:
            modality (`str`): the modality the volume is normalised as (only `"window"` uses it).
            array (`np.ndarray` of shape `(D, H, W)`): the canonical volume.
            window (`str` or `tuple`, *optional*): overrides `ct_window` (only `"window"` uses it).
        """
        if self.intensity_normalization == "window":
            return self.window_range(modality, array, window)
        if self.intensity_normalization == "minmax":
            # Note: M3D divides by max(max - min, 1e-8) (m3d_cap_data_prepare.py); the reader refuses constant
            # volumes, so the range is never empty here.
            return float(array.min()), float(array.max())
        if self.intensity_normalization == "foreground_percentiles":
            # Note: M3D-Seg clips to these percentiles of the voxels above the mean and z-scores
            # (m3d_seg_data_preprocess.py `normalize`), then min-maxes (m3d_seg_data_prepare.py): the z-score cancels
            # out, and the clipped volume's min and max are the two percentiles, so this range reproduces it.
            array = array[array > array.mean()]
        return self.percentile_range(array)

    def choose_modality(self, volume: Volume, modality: str | None = None) -> tuple[str, str]:
        """The modality a volume is normalised as, and why. In order: the caller's `modality`; the file's DICOM
        Modality tag; the processor's `modality`, except that a volume without air (at most `CT_MIN_AIR_SHARE` of its
        voxels below `CT_AIR_BELOW`, -200) cannot be CT in Hounsfield units and is normalised as `"MR"` rather than
        put through the CT window (logged as a warning). A CT window that the caller asks for on such a volume is
        applied, with a warning.

        Args:
            volume (`Volume`): the canonical volume (`read_volume`); its `modality` is the file's DICOM tag, if any.
            modality (`str`, *optional*): the caller's choice, which always wins.

        Returns:
            `tuple[str, str]`: `(modality, reason)`, e.g. `("MR", "no voxel below -200 (the lowest is 0), ...")`.
        """
        air = float(np.mean(volume.array < CT_AIR_BELOW))
        fits_hounsfield = air > CT_MIN_AIR_SHARE
        share = "no voxel" if air == 0 else f"only {air:.2%} of voxels"
        not_hounsfield = (f"{share} below {CT_AIR_BELOW:g} (the lowest is {float(volume.array.min()):.4g}), so not CT "
                          "in Hounsfield units, where air is -1000")
        if modality:
            if is_ct(modality) and not fits_hounsfield:
                logger.warning("%s: the CT window is applied as asked to a volume with %s; it may come out black or "
                               "white", volume.source, not_hounsfield)
            return modality, "given by the caller"
        if volume.modality:
            # A DICOM CT is in Hounsfield units by the standard (the reader applies the rescale), even cropped to
            # soft tissue, so the tag outranks the intensity rule.
            return volume.modality, "the file's DICOM Modality tag"
        if not is_ct(self.modality):
            return self.modality, "the processor's modality"
        if fits_hounsfield:
            return self.modality, (f"the processor's modality, and {air:.1%} of voxels lie below {CT_AIR_BELOW:g} "
                                   "as air does in Hounsfield units")
        logger.warning("%s: normalised as %s by percentiles, not with the processor's CT window: %s; pass "
                       "modality='CT' if it is a CT", volume.source, NOT_CT_MODALITY, not_hounsfield)
        return NOT_CT_MODALITY, not_hounsfield

    def foreground_box(self, array: np.ndarray, low: float) -> tuple[tuple[int, int], ...]:
        """The box of voxels above `low` (after scaling: above 0, MONAI's `CropForeground` default)."""
        if not self.crop_foreground:
            return tuple((0, n) for n in array.shape)
        foreground = array > low
        box = []
        for axis in range(3):
            present = np.flatnonzero(foreground.any(axis=tuple(a for a in range(3) if a != axis)))
            if present.size == 0:  # nothing above the window: keep the whole volume
                return tuple((0, n) for n in array.shape)
            box.append((int(present[0]), int(present[-1]) + 1))
        return tuple(box)

    def preprocess_volume(self, volume, modality: str | None = None, window=None) -> tuple[torch.Tensor, VolumeMetadata]:
        """One volume -> `(pixel_values (1, D, H, W), metadata)`.

        Args:
            volume: anything `read_volume` takes.
            modality (`str`, *optional*): overrides `self.modality`.
            window (`str` or `tuple`, *optional*): overrides `self.ct_window` for this volume.
        """
        volume = read_volume(volume, max_voxels=self.max_voxels, nan_policy=self.nan_policy)
        if self.spacing is not None:
            volume = replace(volume, array=resample_to_spacing(volume.array, volume.affine, self.spacing,
                                                               self.spacing_grid))
        if self.intensity_normalization == "window":
            modality, reason = self.choose_modality(volume, modality)
        else:  # the range ignores the modality: record the one known, without the CT rule's warnings
            modality, reason = modality or volume.modality or self.modality, (
                f"recorded only: intensity_normalization={self.intensity_normalization!r} treats every modality alike")
        if window is not None and not (is_ct(modality) and self.intensity_normalization == "window"):
            logger.warning("%s: the CT window %r is not used: the volume is normalised as %s (%s)", volume.source,
                           window, modality, reason)
        low, high = self.intensity_range(modality, volume.array, window)
        # Cropping before scaling touches fewer voxels; "above low" before scaling is "above 0" after it.
        box = self.foreground_box(volume.array, low)
        cropped = volume.array[box[0][0] : box[0][1], box[1][0] : box[1][1], box[2][0] : box[2][1]]
        scaled = np.clip(cropped, low, high)
        scaled -= low
        scaled *= 1.0 / (high - low)
        pixel_values = self.fit_to_size(self.to_output_range(scaled))[None]  # (1, D, H, W)
        geometry = Volume(
            array=np.empty(0, dtype=np.float32), affine=volume.affine, spacing=volume.spacing, source=volume.source,
            orientation=volume.orientation, source_shape=volume.source_shape, modality=volume.modality,
        )
        return pixel_values, VolumeMetadata(volume=geometry, canonical_shape=volume.array.shape, crop=box,
                                            modality=modality, modality_reason=reason)

    def to_output_range(self, scaled: np.ndarray) -> np.ndarray:
        """Values in [0, 1] -> `output_range`."""
        low, high = self.output_range
        return scaled if (low, high) == (0.0, 1.0) else scaled * (high - low) + low

    def fit_to_size(self, array: np.ndarray) -> torch.Tensor:
        """A scaled canonical `(D, H, W)` volume -> `image_size` (`fit`), normalised by `image_mean` / `image_std`
        and with its axes in `axis_order`."""
        size = self.image_size if self.axis_order == "SAR" else self.image_size[::-1]  # in canonical order
        if self.fit == "resize":
            fitted = resize_volume(array, size)
        else:
            value = float(array.min()) if self.pad_value == "minimum" else self.pad_value
            fitted = torch.from_numpy(pad_or_crop(array, size, self.pad_crop_rule, value))
        if self.image_mean is not None:
            fitted = (fitted - self.image_mean) / self.image_std
        return fitted if self.axis_order == "SAR" else fitted.permute(2, 1, 0)  # (S, A, R) -> (R, A, S)

    def check_masks_map_back(self) -> None:
        """Raise `ValueError` unless masks and boxes at model resolution map back onto the source grid (a resize of
        the canonical grid, which only `spacing=None`, `fit="resize"` and `axis_order="SAR"` keep)."""
        if self.spacing is not None or self.fit != "resize" or self.axis_order != "SAR":
            raise ValueError("This processor (spacing / pad_or_crop / axis_order settings of a converted encoder) "
                             "prepares volumes for embedding only; masks and boxes do not map back through it")

    def preprocess_mask(self, mask, metadata: VolumeMetadata) -> torch.Tensor:
        """A mask on its volume's canonical grid -> `(1, D, H, W)` in {0, 1}, cropped and resized (nearest) like it.

        Args:
            mask: anything `read_volume` takes, on the same grid as the volume of `metadata`.
            metadata (`VolumeMetadata`): from `preprocess_volume` of that volume.
        """
        self.check_masks_map_back()
        mask = read_volume(mask, max_voxels=self.max_voxels, allow_constant=True).array
        if mask.shape != tuple(metadata.canonical_shape):
            raise VolumeError(
                f"{metadata.volume.source}: the mask's shape {mask.shape} differs from the volume's "
                f"{tuple(metadata.canonical_shape)}"
            )
        (d0, d1), (h0, h1), (w0, w1) = metadata.crop
        binary = (mask[d0:d1, h0:h1, w0:w1] > 0).astype(np.float32)
        # "nearest-exact" samples voxel centres; plain "nearest" (M3D's) shifts masks by up to a voxel towards the
        # origin (`MASK_RESAMPLE_MODES`).
        return resize_volume(binary, self.image_size, mode=self.mask_resample_mode)[None]

    def mask_targets(self, masks: list, metadata: list[VolumeMetadata]) -> dict[str, torch.Tensor]:
        """`seg_masks (B, 1, D, H, W)` (zeros where a mask is `None`) and `has_mask (B,)`, one mask per volume."""
        empty = torch.zeros(1, *self.image_size)
        seg_masks = [empty if m is None else self.preprocess_mask(m, meta) for m, meta in zip(masks, metadata)]
        return {"seg_masks": torch.stack(seg_masks), "has_mask": torch.tensor([m is not None for m in masks])}

    def postprocess_mask(self, mask, metadata: VolumeMetadata, threshold: float = 0.5) -> np.ndarray:
        """A mask at model resolution -> a uint8 mask on the source file's own grid.

        Args:
            mask (`np.ndarray` or `torch.Tensor` of shape `(D, H, W)` or `(1, D, H, W)`): probabilities or a binary mask
                at `image_size` (pass logits through a sigmoid first).
            metadata (`VolumeMetadata`): from `preprocess_volume` of the same volume.
            threshold (`float`, defaults to 0.5): probability above which a voxel is foreground.
        """
        return metadata.volume.to_source_grid(self.mask_to_canonical(mask, metadata, threshold))

    def mask_to_canonical(self, mask, metadata: VolumeMetadata, threshold: float = 0.5) -> np.ndarray:
        """A mask at model resolution -> a uint8 mask on the canonical grid `(D, H, W)` of `read_volume`, before
        cropping: the grid a viewer of the canonical volume draws it on.

        Args:
            mask (`np.ndarray` or `torch.Tensor` of shape `(D, H, W)` or `(1, D, H, W)`): probabilities or a binary mask
                at `image_size`.
            metadata (`VolumeMetadata`): from `preprocess_volume` of the same volume.
            threshold (`float`, defaults to 0.5): probability above which a voxel is foreground.
        """
        self.check_masks_map_back()
        mask = torch.as_tensor(np.asarray(mask, dtype=np.float32) if not torch.is_tensor(mask) else mask.float())
        mask = mask.reshape(mask.shape[-3:])
        (d0, d1), (h0, h1), (w0, w1) = metadata.crop
        resized = resize_volume(mask, (d1 - d0, h1 - h0, w1 - w0)).numpy() > threshold
        canonical = np.zeros(metadata.canonical_shape, dtype=np.uint8)
        canonical[d0:d1, h0:h1, w0:w1] = resized
        return canonical

    def box_to_canonical(self, box, metadata: VolumeMetadata) -> np.ndarray:
        """A box as the model writes it -> its two corners in canonical voxel-index coordinates.

        Args:
            box (sequence of 6 floats): `(z1, y1, x1, z2, y2, x2)` in [0, 1] of the model's input, which is the
                foreground crop resized to `image_size`.
            metadata (`VolumeMetadata`): from `preprocess_volume` of the same volume.

        Returns:
            `np.ndarray` of shape `(2, 3)`: `(d, h, w)` of the low and high corners; continuous, voxel centres at
            integers, so a box over whole voxels `i..j` spans `i - 0.5 .. j + 0.5`.
        """
        self.check_masks_map_back()
        values = np.clip(np.asarray(box, dtype=np.float64).reshape(2, 3), 0.0, 1.0)  # (6,) -> (corner, axis)
        start = np.array([low for low, _ in metadata.crop], dtype=np.float64)
        extent = np.array([high - low for low, high in metadata.crop], dtype=np.float64)
        return start + values * extent - 0.5

    def save_mask_nifti(self, mask, metadata: VolumeMetadata, path: str | Path, threshold: float = 0.5) -> Path:
        """Write a model-resolution mask as NIfTI on the source's grid with the source's affine."""
        path = Path(path)
        source_mask = self.postprocess_mask(mask, metadata, threshold)
        nib.save(nib.Nifti1Image(source_mask, metadata.volume.affine), path)
        return path

    def __call__(self, volumes, masks=None, modality: str | None = None, window=None, return_tensors="pt",
                 return_metadata: bool = False, **kwargs) -> BatchFeature:
        return self.preprocess(volumes, masks=masks, modality=modality, window=window,
                               return_tensors=return_tensors, return_metadata=return_metadata)

    def preprocess(self, volumes, masks=None, modality: str | None = None, window=None, return_tensors="pt",
                   return_metadata: bool = False, **kwargs) -> BatchFeature:
        """Preprocess one volume or a list of them.

        Args:
            volumes: a volume (path, array, tensor, `Volume`) or a list of them.
            masks (*optional*): one mask per volume (or `None` entries), on each volume's grid; adds `seg_masks`.
            modality (`str`, *optional*), window (*optional*): override the processor's settings for this call.
            return_metadata (`bool`, defaults to `False`): add `metadata`, a list of `VolumeMetadata` (the crop, and
                the modality each volume was normalised as and why).

        Returns:
            `BatchFeature` with `pixel_values (B, 1, D, H, W)` float32, `seg_masks (B, 1, D, H, W)` and `has_mask (B,)`
            when `masks` are given, and `metadata` on request.
        """
        single = not isinstance(volumes, (list, tuple))
        volumes = [volumes] if single else list(volumes)
        if masks is not None:
            masks = [masks] if single and not isinstance(masks, (list, tuple)) else list(masks)
            if len(masks) != len(volumes):
                raise ValueError(f"{len(masks)} masks were given for {len(volumes)} volumes")
        pixel_values, metadata = zip(*(self.preprocess_volume(v, modality, window) for v in volumes))
        data = {"pixel_values": torch.stack(pixel_values)}
        if masks is not None:
            data.update(self.mask_targets(masks, metadata))
        features = BatchFeature(data=data, tensor_type=return_tensors)
        if return_metadata:
            features["metadata"] = list(metadata)
        return features

    def preprocess_studies(self, studies, masks=None, modality: str | None = None, window=None,
                           max_series: int | None = None, return_tensors="pt", return_metadata: bool = False,
                           **kwargs) -> BatchFeature:
        """Preprocess studies: every series as [`preprocess_volume`] does, then the studies padded to one length.

        Args:
            studies: one study or a list of them. A study is anything `read_study` takes: a DICOM folder or `.zip`
                holding several series, a list of files (NIfTI, DICOM, ...), a `Study`. A `str`, `Path` or `Study` is
                one study; a list is one entry per study (so one study given as a list of files is `[[file, ...]]`).
            masks (*optional*): per study, a mask on the grid of its first series (or `None`); adds `seg_masks` and
                `has_mask`, the targets of `VoxLMForConditionalGeneration` with `seg_scan_index=0`.
            modality (`str`, *optional*), window (*optional*): override the processor's settings for every series
                (default: each series' own DICOM modality, else the processor's, as `choose_modality` decides).
            max_series (`int`, *optional*): refuse studies with more series (`VoxLMConfig.max_study_scans`).
            return_metadata (`bool`, defaults to `False`): add `metadata`, per study a list of `VolumeMetadata`.

        Returns:
            `BatchFeature` with `pixel_values (B, S, 1, D, H, W)` float32 (zero-padded), `scan_mask (B, S)`,
            `series_descriptions` (per study a list of `str`), and `seg_masks`, `has_mask`, `metadata` as asked.
        """
        studies = [studies] if isinstance(studies, (str, Path, Study)) else list(studies)
        if masks is not None:
            masks = list(masks) if isinstance(masks, (list, tuple)) else [masks]
            if len(masks) != len(studies):
                raise ValueError(f"{len(masks)} masks were given for {len(studies)} studies")
        read = [read_study(study, max_series=max_series, max_voxels=self.max_voxels, nan_policy=self.nan_policy)
                for study in studies]
        tensors, metadata = [], []
        for study in read:
            pixel_values, study_metadata = zip(*(self.preprocess_volume(v, modality, window) for v in study.volumes))
            tensors.append(torch.stack(pixel_values))  # (S_i, C, D, H, W)
            metadata.append(list(study_metadata))
        pixel_values, scan_mask = pad_studies(tensors)
        data = {"pixel_values": pixel_values, "scan_mask": scan_mask}
        if masks is not None:
            data.update(self.mask_targets(masks, [study_metadata[0] for study_metadata in metadata]))
        features = BatchFeature(data=data, tensor_type=return_tensors)
        features["series_descriptions"] = [study.descriptions for study in read]
        if return_metadata:
            features["metadata"] = metadata
        return features


# M3D's training data, by the script that prepared its volumes: the `intensity_normalization` and `percentiles` that
# reproduce it (`m3d_volume_processor`).
M3D_DATASETS = {
    "cap": {"intensity_normalization": "minmax"},
    "seg": {"intensity_normalization": "foreground_percentiles", "percentiles": (0.05, 99.95)},
    "refseg": {"intensity_normalization": "percentiles", "percentiles": (0.5, 99.5)},
}


def m3d_volume_processor(image_size=(32, 256, 256), dataset: str = "cap", **kwargs) -> VoxVolumeProcessor:
    """A `VoxVolumeProcessor` that prepares volumes as M3D prepared the training data of M3D-LaMed.

    M3D (BAAI-DCAI/M3D@63e72005) preprocessed every volume once, offline, and trained and evaluated on the saved
    `(1, 32, 256, 256)` arrays; loading adds nothing at evaluation (`LaMed/src/dataset/multi_dataset.py`:
    `val_transform` is `ToTensor` only) and only random augmentation in training (90-degree rotations in the H-W
    plane, flips, intensity scale and shift), which a processor must not apply. Per dataset:

    - `"cap"` (M3D-Cap, whose volumes M3D-VQA reuses: captions and VQA, most of the training data),
      `Data/process/m3d_cap_data_prepare.py`: min-max over the whole volume to [0, 1] (lines 107-108), then MONAI
      `CropForeground()` (line 23: `select_fn` `x > 0` on the min-maxed volume, margin 0: the box of voxels above the
      volume's minimum) and `Resize([32, 256, 256], mode="bilinear")` (line 24), which MONAI turns into trilinear
      interpolation for a 3D volume (`resolves_modes`, in MONAI 1.3.0 as pinned by M3D and in 1.6), with
      `align_corners=False` and no anti-aliasing: voxlm's volume resize. No Hounsfield window is applied, but the
      sources were 8-bit PNG/JPEG slices (divided by 255, line 90) that Radiopaedia contributors had already
      displayed through a window of their choice; a CT in HU put through `"minmax"` spans air to metal, so
      `m3d_volume_processor(intensity_normalization="window")` (a CT window, then the same crop and resize) may be
      closer to those images.
    - `"seg"` (M3D-Seg: segmentation, and the boxes of referring expressions), `m3d_seg_data_preprocess.py`
      `normalize` (clip to the 0.05th and 99.95th percentiles of the voxels above the mean, z-score) then
      `m3d_seg_data_prepare.py` (min-max lines 52-53, `CropForegroundd` on the image, `Resized` bilinear / masks
      nearest, lines 17-19).
    - `"refseg"` (M3D-RefSeg), `m3d_refseg_data_prepare.py` lines 12-15: `ScaleIntensityRangePercentilesd` (0.5,
      99.5, clipped to [0, 1]), `CropForegroundd`, `Resized` trilinear / masks nearest.

    Every dataset's masks were resized with MONAI's `"nearest"` (`mask_resample_mode="nearest"`) after the image's
    crop. Results still map back onto the source grid (`postprocess_mask`, `box_to_canonical`) through the crop box
    in each volume's metadata.

    Axis order: M3D's arrays are `(C, D, H, W)`, but their axes come from the sources, not from an orientation step.
    M3D-Cap stacks 2D images in the order of their file numbers (lines 80-103): `(D, H, W)` = (slice number, image
    row, image column), which for axial slices in radiological display is (the source's slice order, anterior to
    posterior, patient right to left). voxlm reads volumes as RAS with depth first, `(D, H, W)` = (S, A, R), with
    indices growing inferior to superior, posterior to anterior, left to right: the same depth axis (up to its
    direction), and H and W both reversed, a 180-degree rotation in the H-W plane (one M3D's training augmentation
    `RandRotate90(spatial_axes=(1, 2))` produced). M3D-Seg swaps a NIfTI's (x, y, z) voxel axes to (z, y, x) without
    reorienting (`m3d_seg_data_preprocess.py` leaves `Orientationd` commented out; `m3d_seg_data_prepare.py` line
    48), voxlm's order for a file stored in RAS; M3D-RefSeg transposes them to (z, x, y) (line 26), H and W swapped.

    Args:
        image_size (`tuple[int, int, int]`, *optional*, defaults to `(32, 256, 256)`): output `(D, H, W)` (M3D's
            `Resize(spatial_size=[32, 256, 256])`).
        dataset (`str`, *optional*, defaults to `"cap"`): whose preparation to reproduce: `"cap"`, `"seg"` or
            `"refseg"`.
        kwargs: other `VoxVolumeProcessor` settings, which win over the dataset's.

    Returns:
        `VoxVolumeProcessor` with `crop_foreground=True`, `mask_resample_mode="nearest"` and the dataset's
        `intensity_normalization` (and `percentiles`).
    """
    if dataset not in M3D_DATASETS:
        raise ValueError(f"`dataset` must be one of {sorted(M3D_DATASETS)} (M3D's data scripts), got {dataset!r}")
    settings = {"crop_foreground": True, "mask_resample_mode": "nearest", **M3D_DATASETS[dataset], **kwargs}
    return VoxVolumeProcessor(image_size=image_size, **settings)


# timm's IMAGENET_DEFAULT_MEAN and _STD averaged over the channels, as float32 tensors average them (HLIP's
# `Normalize(torch.as_tensor(IMAGENET_DEFAULT_MEAN).mean(), torch.as_tensor(IMAGENET_DEFAULT_STD).mean())`).
HLIP_MEAN = float(np.float32(np.mean(np.array([0.485, 0.456, 0.406], dtype=np.float32), dtype=np.float32)))
HLIP_STD = float(np.float32(np.mean(np.array([0.229, 0.224, 0.225], dtype=np.float32), dtype=np.float32)))
# The preprocessing of each released encoder voxlm converts, as `VoxVolumeProcessor` settings (every one a CT model:
# its Hounsfield window is applied to CT volumes, and to others only when the call says `modality="CT"`).
RELEASED_ENCODER_SETTINGS = {
    # colipri 0.1.3 configs/processor/image_transform/default.yaml (TorchIO): ToOrientation RAS, Resample(2) linear,
    # Clamp and RescaleIntensity (-1000, 1000) HU -> (-1, 1), CropOrPad 192^3 with padding_mode "minimum".
    "colipri": dict(image_size=(192, 192, 192), spacing=(2.0, 2.0, 2.0), spacing_grid="centre",
                    ct_window=(-1000.0, 1000.0), output_range=(-1.0, 1.0), fit="pad_or_crop",
                    pad_crop_rule="ceil_before", pad_value="minimum", axis_order="RAS"),
    # Zch0414/hlip (CT-RATE chest CT): data/ct_rate/process.py resamples to (3, 1, 1) mm by F.interpolate to
    # int(n s / t) voxels; src/hlip_test/zeroshot_ct_rate.py windows (-1150, 350) HU to [0, 1], pads / crops to
    # (112, 336, 336) with the odd voxel after, and normalises by timm's mean and std averaged over channels. Its
    # arrays are SimpleITK's (z, y, x) of the file as stored: voxlm's (S, A, R) for a file stored in RAS.
    "hlip": dict(image_size=(112, 336, 336), spacing=(3.0, 1.0, 1.0), spacing_grid="extent",
                 ct_window=(-1150.0, 350.0), fit="pad_or_crop", pad_crop_rule="floor_before", pad_value=0.0,
                 image_mean=HLIP_MEAN, image_std=HLIP_STD),
    # StanfordMIMI/Merlin merlin/data/monai_transforms.py (MONAI): Orientation RAS, Spacing (1.5, 1.5, 3) mm
    # bilinear, ScaleIntensityRange (-1000, 1000) HU -> [0, 1] clipped, SpatialPad then CenterSpatialCrop to
    # (224, 224, 160) in (R, A, S) order.
    "merlin": dict(image_size=(224, 224, 160), spacing=(3.0, 1.5, 1.5), spacing_grid="origin",
                   ct_window=(-1000.0, 1000.0), fit="pad_or_crop", pad_crop_rule="monai", pad_value=0.0,
                   axis_order="RAS"),
}


def released_encoder_processor(name: str, **kwargs) -> VoxVolumeProcessor:
    """The `VoxVolumeProcessor` that reproduces a released encoder's own preprocessing (`RELEASED_ENCODER_SETTINGS`).

    Args:
        name (`str`): `"colipri"`, `"hlip"` or `"merlin"`.
        kwargs: other `VoxVolumeProcessor` settings, which win over the preset's.
    """
    if name not in RELEASED_ENCODER_SETTINGS:
        raise ValueError(f"No preprocessing preset {name!r}; choose one of {sorted(RELEASED_ENCODER_SETTINGS)}")
    settings = {"crop_foreground": False, **RELEASED_ENCODER_SETTINGS[name], **kwargs}
    return VoxVolumeProcessor(**settings)


def colipri_volume_processor(**kwargs) -> VoxVolumeProcessor:
    """COLIPRI's preprocessing (`RELEASED_ENCODER_SETTINGS["colipri"]`): (1, 192, 192, 192) in [-1, 1], axes (R, A, S)."""
    return released_encoder_processor("colipri", **kwargs)


def hlip_volume_processor(**kwargs) -> VoxVolumeProcessor:
    """HLIP's chest-CT preprocessing (`RELEASED_ENCODER_SETTINGS["hlip"]`): (1, 112, 336, 336), normalised."""
    return released_encoder_processor("hlip", **kwargs)


def merlin_volume_processor(**kwargs) -> VoxVolumeProcessor:
    """Merlin's preprocessing (`RELEASED_ENCODER_SETTINGS["merlin"]`): (1, 224, 224, 160) in [0, 1], axes (R, A, S)."""
    return released_encoder_processor("merlin", **kwargs)


def dcformer_volume_processor(image_size=(128, 256, 256), **kwargs) -> VoxVolumeProcessor:
    """What Med3DVLM's DCFormer-SigLIP was trained on: M3D-Cap's preparation at (128, 256, 256)
    (mirthAI/Med3DVLM src/utils/m3d_cap_data_prepare_128.py: min-max to [0, 1], MONAI `CropForeground`, `Resize`
    bilinear), which `m3d_volume_processor` reproduces."""
    return m3d_volume_processor(image_size=image_size, dataset="cap", **kwargs)


__all__ = ["VoxVolumeProcessor", "VolumeMetadata", "CT_WINDOWS", "CT_AIR_BELOW", "CT_MIN_AIR_SHARE",
           "INTENSITY_NORMALIZATIONS", "M3D_DATASETS", "MASK_RESAMPLE_MODES", "RELEASED_ENCODER_SETTINGS", "SPACING_GRIDS",
           "FITS", "PAD_CROP_RULES", "AXIS_ORDERS", "colipri_volume_processor", "dcformer_volume_processor",
           "hlip_volume_processor", "merlin_volume_processor", "released_encoder_processor", "resample_to_spacing",
           "pad_or_crop", "is_ct", "m3d_volume_processor",
           "pad_studies", "resize_volume"]
