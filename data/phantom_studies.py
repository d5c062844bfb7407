"""Phantom head-CT studies: several series of one phantom head that differ in window, contrast phase and resolution.

A radiologist reads a study, not one scan. Each phantom study here is built from one phantom head
(`voxlm.data.phantoms`) as

    series 0  AXIAL NON-CONTRAST BRAIN    thin slices, brain window       (0, 80) HU
    series 1  AXIAL NON-CONTRAST BONE     thin slices, bone window        (-450, 1050) HU: blood barely differs
    series 2  AXIAL POST-CONTRAST         contrast phase, subdural window brain and vessels enhance
    series 3  AXIAL NON-CONTRAST THICK    4x thicker, 2x coarser slices, brain window (partial-volume blur)

and, for a fraction of the studies with a finding, the finding is drawn into one randomly chosen series only (the
others show the same head without it), the case a single-series model misses when it is handed another series.
The rows follow the `study` config of the Hub format (`voxlm.data.hub_format.STUDY_SCHEMA`); training-time sampling
of a study's series is `voxlm.data.study_sampling`.
"""

from __future__ import annotations

import numpy as np

from .hub_format import StudyError, encode_array, split_of
from .phantoms import HU_BRAIN, HU_SKULL, generate_case

# (description, window preset of VoxVolumeProcessor's CT_WINDOWS) of the four series, in study order.
SERIES_KINDS = (
    ("AXIAL NON-CONTRAST BRAIN", "brain"),
    ("AXIAL NON-CONTRAST BONE", "bone"),
    ("AXIAL POST-CONTRAST", "subdural"),
    ("AXIAL NON-CONTRAST THICK", "brain"),
)
# Post-contrast enhancement in HU: parenchyma a little (intact blood-brain barrier), dural venous sinuses a lot.
CONTRAST_BRAIN_HU, CONTRAST_SINUS_HU = 6.0, 120.0
THICK_SLICE_FACTOR = (4, 2, 2)  # (D, H, W) block averaged into one voxel of the thick series

def post_contrast(volume: np.ndarray) -> np.ndarray:
    """The contrast phase of a head in HU: brain enhances slightly, the superior sagittal sinus strongly.

    Args:
        volume (`np.ndarray` of shape `(D, H, W)`): non-contrast HU.
    """
    enhanced = volume.astype(np.float32)
    brain = (volume > HU_BRAIN - 20) & (volume < HU_SKULL / 2)
    enhanced[brain] += CONTRAST_BRAIN_HU
    # The sinus runs along the midline just under the vertex: the brain voxels of the top quarter, centre column.
    depth, _, width = volume.shape
    sinus = np.zeros_like(brain)
    sinus[depth * 3 // 4 :, :, width // 2 - max(1, width // 48) : width // 2 + max(1, width // 48)] = True
    enhanced[sinus & brain] += CONTRAST_SINUS_HU
    return enhanced


def thick_slices(volume: np.ndarray) -> np.ndarray:
    """A lower-resolution series: average `THICK_SLICE_FACTOR` blocks (partial-volume blur), `(D, H, W)` -> coarser."""
    f_d, f_h, f_w = THICK_SLICE_FACTOR
    depth, height, width = (size // factor * factor for size, factor in zip(volume.shape, THICK_SLICE_FACTOR))
    blocks = volume[:depth, :height, :width].astype(np.float32)
    # (D, H, W) -> (D / f_d, f_d, H / f_h, f_h, W / f_w, f_w) -> mean over the block axes
    return blocks.reshape(depth // f_d, f_d, height // f_h, f_h, width // f_w, f_w).mean(axis=(1, 3, 5))


def series_entry(volume: np.ndarray, kind: int, spacing) -> dict:
    """One `series` item of a study row: HU volume as `.npy` int16 bytes plus its description and window."""
    description, window = SERIES_KINDS[kind]
    return dict(
        image=encode_array(np.round(volume).astype(np.int16)),
        modality="CT",
        description=description,
        window=window,
        spacing=[float(s) for s in spacing],
    )


def generate_study(
    seed: int, shape=(32, 96, 96), normal_fraction: float = 1 / 3, single_series_fraction: float = 0.5
) -> dict:
    """One phantom study row (schema in the module docstring), deterministic per seed.

    Args:
        seed (`int`): the study's seed; the head is `phantoms.generate_case(seed)`.
        shape (`tuple[int, int, int]`, defaults to `(32, 96, 96)`): `(D, H, W)` of the thin series.
        normal_fraction (`float`, defaults to 1/3): probability that the study has no finding.
        single_series_fraction (`float`, defaults to 0.5): probability that a finding is drawn into one random series
            only (for a bleed, one whose window shows it: not the bone series); otherwise every series holds it
            (though the bone window hides a bleed's contrast).
    """
    if not 0.0 <= single_series_fraction <= 1.0:
        raise StudyError(f"single_series_fraction must lie in [0, 1], got {single_series_fraction}")
    case = generate_case(seed, shape=shape, normal_fraction=normal_fraction)
    # `normal_fraction=1` draws the same head (same seed, same geometry draws) without its finding and midline shift.
    normal = generate_case(seed, shape=shape, normal_fraction=1.0).volume
    rng = np.random.default_rng([seed, 1])
    num_series = len(SERIES_KINDS)
    if case.finding is None:
        finding_series = []
    elif rng.random() < single_series_fraction:
        # A bleed is 30-40 HU above brain, under 3% of the bone window: only series that can show it are chosen.
        visible = [0, 2, 3] if case.finding.is_hemorrhage else list(range(num_series))
        finding_series = [visible[int(rng.integers(len(visible)))]]
    else:
        finding_series = list(range(num_series))
    heads = [case.volume if index in finding_series else normal for index in range(num_series)]
    thick_spacing = [s * f for s, f in zip(case.spacing, THICK_SLICE_FACTOR)]
    series = [
        series_entry(heads[0], 0, case.spacing),
        series_entry(heads[1], 1, case.spacing),
        series_entry(post_contrast(heads[2]), 2, case.spacing),
        series_entry(thick_slices(heads[3]), 3, thick_spacing),
    ]
    patient_id = f"phantom-patient-{seed:06d}"
    return dict(
        id=f"phantom-study-{seed:06d}",
        patient_id=patient_id,
        study_id=f"phantom-study-{seed:06d}",
        series=series,
        report=case.report,
        label=case.finding.kind if case.finding else "normal",
        finding_series=finding_series,
        split=split_of(patient_id, test_fraction=0.2),
    )


__all__ = ["SERIES_KINDS", "generate_study", "post_contrast", "thick_slices"]
