"""Orthogonal slice views of a canonical volume, with a mask overlay and box outlines, for the Space and notebooks.

Display only: the intensity window comes from the model's volume processor (`window_range`), the geometry from the
canonical layout `(D, H, W) = (S, A, R)` that `read_volume` gives. Slices are shown in radiological convention
(anterior or superior at the top, the patient's right on the viewer's left) at their physical aspect ratio.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from voxlm.processing import CT_WINDOWS, Study, Volume

MRI_WINDOW = "MRI (percentiles)"
WINDOW_CHOICES = [*CT_WINDOWS, MRI_WINDOW]
PLANES = ("axial", "coronal", "sagittal")
MASK_COLOUR = np.array([1.0, 0.15, 0.1])
BOX_COLOUR = np.array([1.0, 0.85, 0.0])
MASK_ALPHA = 0.45
# A rendered plane is at most this many pixels (~12 MB of RGB): volumes with a huge grid or spacing are drawn smaller.
MAX_PIXELS = 2048 * 2048
# Voxels are drawn at most this many times taller than wide (or wider than tall): a 100,000 mm slice or a 1e-4 mm
# pixel would otherwise ask for a plane of billions of pixels. Real scans stay well below (5 mm slices of 0.4 mm
# pixels: 12.5).
MAX_VOXEL_ASPECT = 50.0


def window_settings(choice: str) -> tuple[str | None, str | None]:
    """`(modality, ct_window)` for a window choice: a CT preset name, or `MRI_WINDOW` (percentiles)."""
    if choice == MRI_WINDOW:
        return "MR", None
    if choice not in CT_WINDOWS:
        raise ValueError(f"Unknown window {choice!r}; choose one of {WINDOW_CHOICES}")
    return "CT", choice


def display_volume(volume: Volume, volume_processor, choice: str) -> np.ndarray:
    """The volume's voxels windowed to [0, 1] for display, `(D, H, W)` float32."""
    modality, window = window_settings(choice)
    low, high = volume_processor.window_range(modality, volume.array, window)
    return ((np.clip(volume.array, low, high) - low) / (high - low)).astype(np.float32)


def box_voxel_ranges(corners: np.ndarray, shape) -> list[tuple[int, int]]:
    """Inclusive voxel index ranges `[(d0, d1), (h0, h1), (w0, w1)]` covered by canonical box corners `(2, 3)`."""
    low = np.clip(np.floor(corners[0] + 0.5), 0, np.array(shape) - 1).astype(int)
    high = np.clip(np.ceil(corners[1] - 0.5), 0, np.array(shape) - 1).astype(int)
    return [(int(a), int(max(a, b))) for a, b in zip(low, high)]


def _outline(rgb: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]) -> None:
    """Draw a one-voxel rectangle outline in place on an `(R, C, 3)` image."""
    rgb[rows[0], cols[0] : cols[1] + 1] = BOX_COLOUR
    rgb[rows[1], cols[0] : cols[1] + 1] = BOX_COLOUR
    rgb[rows[0] : rows[1] + 1, cols[0]] = BOX_COLOUR
    rgb[rows[0] : rows[1] + 1, cols[1]] = BOX_COLOUR


def render_plane(display: np.ndarray, plane: str, index: int, spacing=(1.0, 1.0, 1.0), mask: np.ndarray | None = None,
                 boxes=(), min_size: int = 256, max_pixels: int = MAX_PIXELS,
                 max_voxel_aspect: float = MAX_VOXEL_ASPECT) -> np.ndarray:
    """One slice as an RGB image with the mask and the boxes drawn on it.

    Args:
        display (`np.ndarray` of shape `(D, H, W)`): windowed voxels in [0, 1] (`display_volume`).
        plane (`str`): `"axial"` (index along D), `"coronal"` (along H) or `"sagittal"` (along W).
        index (`int`): the slice, clipped to the volume.
        spacing (`tuple[float, float, float]`): voxel size along `(D, H, W)` in mm, for the aspect ratio.
        mask (`np.ndarray` of shape `(D, H, W)`, *optional*): a binary mask on the same grid.
        boxes (iterable of `np.ndarray` of shape `(2, 3)`): box corners in canonical voxel coordinates.
        min_size (`int`): the shorter side is scaled up to at least this many pixels (nearest neighbour).
        max_pixels (`int`, defaults to `MAX_PIXELS`): the image is scaled down to at most this many pixels (voxels
            are then skipped, nearest neighbour).
        max_voxel_aspect (`float`, defaults to `MAX_VOXEL_ASPECT`): a voxel's drawn height / width is clamped to
            `[1 / max_voxel_aspect, max_voxel_aspect]`; beyond it the image is not at the physical aspect ratio.

    Returns:
        `np.ndarray` of shape `(rows, cols, 3)`, uint8.
    """
    axis = PLANES.index(plane)
    index = int(np.clip(index, 0, display.shape[axis] - 1))
    image = np.take(display, index, axis=axis)  # (D, H, W) -> the two other axes, in order
    rgb = np.repeat(image[..., None], 3, axis=-1)  # (rows, cols) -> (rows, cols, 3)
    if mask is not None:
        selected = np.take(mask, index, axis=axis) > 0
        rgb[selected] = (1 - MASK_ALPHA) * rgb[selected] + MASK_ALPHA * MASK_COLOUR
    in_plane = [a for a in range(3) if a != axis]
    for corners in boxes:
        ranges = box_voxel_ranges(np.asarray(corners), display.shape)
        if ranges[axis][0] <= index <= ranges[axis][1]:
            _outline(rgb, ranges[in_plane[0]], ranges[in_plane[1]])
    # Rows run inferior -> superior (or posterior -> anterior) and columns towards the patient's right: flipping both
    # puts superior/anterior at the top and the patient's right on the viewer's left.
    rgb = rgb[::-1, ::-1]
    # A voxel's drawn height / width; the spacing comes from the file, so it is clamped to something drawable.
    aspect = float(np.clip(spacing[in_plane[0]] / spacing[in_plane[1]], 1 / max_voxel_aspect, max_voxel_aspect))
    row_px, col_px = max(aspect, 1.0), max(1.0 / aspect, 1.0)  # pixels per voxel, the smaller one 1
    height, width = rgb.shape[0] * row_px, rgb.shape[1] * col_px
    scale = max(min_size / min(height, width), 1.0)
    scale = min(scale, np.sqrt(max_pixels / (height * width)))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL takes (width, height)
    pixels = Image.fromarray(np.round(rgb * 255).astype(np.uint8)).resize(size, Image.NEAREST)
    return np.asarray(pixels)


def render_planes(display: np.ndarray, position, spacing=(1.0, 1.0, 1.0), mask=None, boxes=(),
                  max_pixels: int = MAX_PIXELS) -> list[np.ndarray]:
    """Axial, coronal and sagittal images through `position = (d, h, w)`, each at most `max_pixels` pixels."""
    return [render_plane(display, plane, index, spacing, mask, boxes, max_pixels=max_pixels)
            for plane, index in zip(PLANES, position)]


def describe_series(study: Study, series: int) -> str:
    """One status line about the shown series of a study: which one it is (when there are several), its grid and
    spacing, and the series left out."""
    volume = study.volumes[series]
    shape = " x ".join(str(n) for n in volume.array.shape)
    spacing = " x ".join(f"{s:.2f}" for s in volume.spacing)
    shown = f"series {series}. {study.descriptions[series]} of {len(study)}: " if len(study) > 1 else ""
    skipped = "".join(f"; skipped {reason}" for reason in study.skipped)
    return f"{shown}{shape} voxels (D x H x W), spacing {spacing} mm{skipped}"
