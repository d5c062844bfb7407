"""Write the Space's bundled cases and report gallery from voxlm's phantom generator (seeds far above the quickstart's
0..N, so the quickstart model never trained on them). Re-run to regenerate: `python spaces/examples/make_examples.py`.

    phantom_<kind>.nii.gz   two head-CT phantoms, 32 x 96 x 96 int16 HU, RAS affine with the phantom's spacing
    reports.json            the reports of 24 phantoms, the two cases' among them, for retrieval
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from voxlm.data import generate_case

HERE = Path(__file__).parent
CASES = {"phantom_epidural_right.nii.gz": 900009, "phantom_fracture_left.nii.gz": 900003}
GALLERY_SEEDS = range(900000, 900024)
SHAPE = (32, 96, 96)


def write_case(seed: int, path: Path) -> None:
    case = generate_case(seed, shape=SHAPE)
    # The phantom is (D, H, W) = (S, A, R); NIfTI voxel axes are stored (R, A, S) with a diagonal RAS affine.
    ras = np.ascontiguousarray(np.transpose(case.volume, (2, 1, 0)))
    affine = np.diag([case.spacing[2], case.spacing[1], case.spacing[0], 1.0])
    nib.save(nib.Nifti1Image(ras, affine), path)


def main() -> None:
    for name, seed in CASES.items():
        write_case(seed, HERE / name)
    gallery = []
    for seed in GALLERY_SEEDS:
        case = generate_case(seed, shape=SHAPE)
        gallery.append({"id": case.case_id, "finding": case.finding.describe() if case.finding else "normal",
                        "report": case.report})
    (HERE / "reports.json").write_text(json.dumps(gallery, indent=1) + "\n")


if __name__ == "__main__":
    main()
