"""Preprocessing benchmark: VoxVolumeProcessor against the explicit MONAI Compose reference, same input, one run.

Input: a synthetic 512 x 512 x 200 int16 head CT (HU) saved as NIfTI; output 32 x 256 x 256 with the brain window.
Both pipelines load the same file, reorient to RAS, window, crop the foreground and resize trilinearly; the outputs are
compared (max abs difference) and each pipeline's volumes per second per core are reported, median of `--repeats`.

Usage: python benchmarks/bench_preprocessing.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose, CropForeground, EnsureChannelFirst, LoadImage, Orientation, Resize, ScaleIntensityRange

from voxlm.processing import VoxVolumeProcessor

IMAGE_SIZE = (32, 256, 256)


def synthetic_head_ct(shape=(512, 512, 200), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij", sparse=True)
    radius = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.85) ** 2
    ct = np.where(radius < 1, 35, -1000).astype(np.int16)
    ct[(radius > 0.85) & (radius < 1)] = 1200
    ct += rng.integers(-8, 8, size=shape, dtype=np.int16)
    return ct


def monai_pipeline() -> Compose:
    return Compose([
        LoadImage(image_only=True),
        EnsureChannelFirst(),
        Orientation(axcodes="RAS"),
        ScaleIntensityRange(a_min=0.0, a_max=80.0, b_min=0.0, b_max=1.0, clip=True),
        CropForeground(select_fn=lambda v: v > 0, margin=0),
        Resize(spatial_size=tuple(reversed(IMAGE_SIZE)), mode="trilinear"),
    ])


def timed(function, repeats: int) -> tuple[float, object]:
    output = function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        output = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ct.nii.gz"
        nib.save(nib.Nifti1Image(synthetic_head_ct(), np.diag([0.45, 0.45, 0.8, 1.0])), path)
        processor = VoxVolumeProcessor(image_size=IMAGE_SIZE, ct_window="brain")
        reference = monai_pipeline()
        ours_s, ours = timed(lambda: processor(str(path))["pixel_values"][0], args.repeats)
        theirs_s, theirs = timed(lambda: torch.as_tensor(reference(str(path))).permute(0, 3, 2, 1), args.repeats)
    difference = (ours - theirs.float()).abs().max().item()
    cores = torch.get_num_threads()
    print(f"Preprocessing, 512 x 512 x 200 int16 NIfTI -> {' x '.join(map(str, IMAGE_SIZE))}, {cores} threads, "
          f"median of {args.repeats}; max |voxlm - MONAI| = {difference:.2e}")
    print("| pipeline | s / volume | volumes / s / core | speed-up |")
    print("| --- | --- | --- | --- |")
    print(f"| voxlm VoxVolumeProcessor | {ours_s:.2f} | {1 / ours_s / cores:.3f} | {theirs_s / ours_s:.2f}x |")
    print(f"| MONAI Compose reference | {theirs_s:.2f} | {1 / theirs_s / cores:.3f} | 1.00x |")


if __name__ == "__main__":
    main()
