"""Orthogonal slice views of a canonical volume, with a mask overlay, box outlines and orientation letters, for the
Space and notebooks; and the lines of text the Space shows beside them.

Display only: the intensity window comes from the model's volume processor (`window_range`), the geometry from the
canonical layout `(D, H, W) = (S, A, R)` that `read_volume` gives. Slices are shown in radiological convention
(anterior or superior at the top, the patient's right on the viewer's left) at their physical aspect ratio, with the
patient direction written on each edge (R/L, A/P, S/I).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from voxlm.processing import CT_WINDOWS, SEG_TOKEN, Study, Volume, is_ct

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
# The patient directions at the low and high index ends of the canonical axes (D, H, W) = (S, A, R) of `read_volume`.
AXIS_ENDS = (("I", "S"), ("P", "A"), ("L", "R"))
# Light blue with a black outline: legible on black and on bone, and told apart from the red mask and the yellow boxes.
LETTER_COLOUR = (140, 230, 255)


def window_settings(choice: str) -> tuple[str | None, str | None]:
    """`(modality, ct_window)` for a window choice: a CT preset name, or `MRI_WINDOW` (percentiles)."""
    if choice == MRI_WINDOW:
        return "MR", None
    if choice not in CT_WINDOWS:
        raise ValueError(f"Unknown window {choice!r}; choose one of {WINDOW_CHOICES}")
    return "CT", choice


def window_for(modality: str, choice: str, ct_window="brain") -> str:
    """The window menu entry to show a volume normalised as `modality` with: `MRI_WINDOW` for anything but CT; for CT
    the visitor's `choice`, except that `MRI_WINDOW` gives way to the model's CT preset (`ct_window`; `"brain"` when
    the model's window is a `(low, high)` range, which the menu does not list)."""
    if not is_ct(modality):
        return MRI_WINDOW
    if choice != MRI_WINDOW:
        return choice
    return ct_window if isinstance(ct_window, str) and ct_window in CT_WINDOWS else "brain"


def modality_override(choice: str, shown: str) -> str | None:
    """The modality to ask the model for: `None` (each series' own, as the processor chooses) while the window menu
    agrees with the shown series' modality `shown`; the menu's modality when the visitor switched it between CT and
    MRI. CT presets themselves change the view only; the model keeps its own window."""
    modality, _ = window_settings(choice)
    return modality if is_ct(modality) != is_ct(shown) else None


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


def orientation_letters(plane: str) -> dict[str, str]:
    """The patient direction at each edge of a `render_plane` image of `plane`.

    Returns:
        `dict[str, str]`: `{"top", "bottom", "left", "right"}` -> one of R, L, A, P, S, I; axial is
        `{"top": "A", "bottom": "P", "left": "R", "right": "L"}`.
    """
    rows, cols = (axis for axis in range(3) if axis != PLANES.index(plane))
    # `render_plane` flips both image axes: the high index end of the row axis is at the top, of the column axis at
    # the left.
    return {"top": AXIS_ENDS[rows][1], "bottom": AXIS_ENDS[rows][0], "left": AXIS_ENDS[cols][1],
            "right": AXIS_ENDS[cols][0]}


@functools.lru_cache(maxsize=8)
def _letter_font(size: int):
    return ImageFont.load_default(size=size)


def draw_letters(image: Image.Image, letters: dict[str, str]) -> None:
    """Write letters in place at the middle of the edges of an RGB image (`orientation_letters`' keys), in
    `LETTER_COLOUR` with a black outline; nothing on images too small to hold them."""
    width, height = image.size
    size = max(10, min(width, height) // 16)
    if min(width, height) < 4 * size:
        return
    draw, margin = ImageDraw.Draw(image), 2
    places = {"top": ((width / 2, margin), "mt"), "bottom": ((width / 2, height - margin), "mb"),
              "left": ((margin, height / 2), "lm"), "right": ((width - margin, height / 2), "rm")}
    for edge, letter in letters.items():
        position, anchor = places[edge]
        draw.text(position, letter, fill=LETTER_COLOUR, font=_letter_font(size), anchor=anchor, stroke_width=1,
                  stroke_fill=(0, 0, 0))


def render_plane(display: np.ndarray, plane: str, index: int, spacing=(1.0, 1.0, 1.0), mask: np.ndarray | None = None,
                 boxes=(), min_size: int = 256, max_pixels: int = MAX_PIXELS,
                 max_voxel_aspect: float = MAX_VOXEL_ASPECT, letters: bool = True) -> np.ndarray:
    """One slice as an RGB image with the mask, the boxes and the patient directions drawn on it.

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
        letters (`bool`, defaults to `True`): write the patient direction on each edge (`orientation_letters`).

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
    if letters:
        draw_letters(pixels, orientation_letters(plane))
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


def describe_modality(modality: str, reason: str, choice: str) -> str:
    """One status sentence: the modality a volume is read as and why, and the window it is shown with."""
    override = "" if is_ct(modality) else "; pick a CT window to have the model read it as CT"
    return f"Modality {modality}: {reason}{override}. Shown with the {choice} window."


def describe_shown(study: Study, series: int, modality: str, reason: str, choice: str) -> str:
    """The status line of a shown series: `describe_series`, `describe_modality`, and the modality the model reads it
    as when the visitor's window `choice` switched between CT and MRI (`modality_override`)."""
    line = f"{describe_series(study, series)}. {describe_modality(modality, reason, choice)}"
    asked = modality_override(choice, modality)
    return line if asked is None else f"{line} The model reads it as {asked}, as the window asks."


def describe_boxes(prediction) -> str:
    """A Markdown list of the boxes of a `voxlm.inference.Prediction`: model coordinates and RAS mm corners."""
    summary = prediction.to_dict()
    return "\n".join(f"- box {box} (z1, y1, x1, z2, y2, x2 in [0, 1]); RAS mm corners {world}"
                     for box, world in zip(summary["boxes"], summary["boxes_ras_mm"]))


def answer_for_display(text: str, mask: np.ndarray | None) -> str:
    """The answer with each `[SEG]` token replaced by a note on the mask it produced: shown in red, empty, or absent
    (a model without a mask head).

    Args:
        text (`str`): the answer (`Prediction.text`, `[SEG]` kept).
        mask (`np.ndarray`, *optional*): the predicted mask, `None` when the model made none.
    """
    if mask is None:
        note = "(no mask: this model has no mask head)"
    elif not mask.any():
        note = "(the predicted mask is empty)"
    else:
        note = "(the mask shown in red on the slices)"
    return text.replace(SEG_TOKEN, note)
