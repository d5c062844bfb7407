"""Preprocessing benchmark: VoxVolumeProcessor against the explicit MONAI Compose reference, same input, one run.

Input: a synthetic 512 x 512 x 200 int16 head CT (HU) saved as NIfTI; output 32 x 256 x 256 with the brain window.
Both pipelines load the same file, reorient to RAS, window, crop the foreground and resize trilinearly; the outputs are
compared (max abs difference) and each pipeline's volumes per second per core are reported, median of `--repeats`.

Usage: python benchmarks/bench_preprocessing.py [--repeats 3] [--shape 512 512 200] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose, CropForeground, EnsureChannelFirst, LoadImage, Orientation, Resize, ScaleIntensityRange

import common
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


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200], help="the synthetic CT (x, y, z)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ct.nii.gz"
        nib.save(nib.Nifti1Image(synthetic_head_ct(tuple(args.shape)), np.diag([0.45, 0.45, 0.8, 1.0])), path)
        processor = VoxVolumeProcessor(image_size=IMAGE_SIZE, ct_window="brain")
        reference = monai_pipeline()
        outputs = {}

        def ours():
            outputs["voxlm"] = processor(str(path))["pixel_values"][0]

        def theirs():
            outputs["monai"] = torch.as_tensor(reference(str(path))).permute(0, 3, 2, 1)

        ours_s = common.median_time(ours, args.repeats)
        theirs_s = common.median_time(theirs, args.repeats)
    difference = (outputs["voxlm"] - outputs["monai"].float()).abs().max().item()
    cores = torch.get_num_threads()
    shape = " x ".join(map(str, args.shape))
    result = dict(
        name="preprocessing",
        title="Preprocessing",
        command=common.command_line("bench_preprocessing.py", argv),
        description=(
            f"A synthetic {shape} int16 head CT (NIfTI) to {' x '.join(map(str, IMAGE_SIZE))} with the brain window: "
            f"voxlm's `VoxVolumeProcessor` against the explicit MONAI `Compose` (LoadImage, Orientation RAS, "
            f"ScaleIntensityRange, CropForeground, Resize trilinear), same file, same run, {cores} threads, median of "
            f"{args.repeats}. Target: at least 2x with equal output; max |voxlm - MONAI| = {difference:.2e}."
        ),
        tables=[dict(columns=["pipeline", "s / volume", "volumes / s / core", "speed-up"], rows=[
            ["voxlm VoxVolumeProcessor", ours_s, common.fmt(1 / ours_s / cores, 3), common.fmt(theirs_s / ours_s, suffix="x")],
            ["MONAI Compose reference", theirs_s, common.fmt(1 / theirs_s / cores, 3), "1.00x"],
        ])],
        figures={"speedup": theirs_s / ours_s, "max_abs_difference": difference, "seconds_per_volume": ours_s},
    )
    common.emit(result, args.json_out)


if __name__ == "__main__":
    main()
