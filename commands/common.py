"""What `voxlm predict`, `retrieve` and `classify` share: the help of their common options, the printing of a result,
and the guard that turns bad input into a message."""

from __future__ import annotations

import json

from voxlm.dicomweb import DicomWebError
from voxlm.inference import CLIP_MODEL_ENV, DEFAULT_CLIP_MODEL, ModelNotFoundError
from voxlm.processing import VolumeError

VOLUME_HELP = "a NIfTI file, a DICOM series folder or .zip, an NRRD/MHA file or a .npy array (D, H, W)"
MODALITY_HELP = ("CT (Hounsfield window) or MR (percentile window); default: the file's DICOM Modality, else the "
                 "model's, except that a volume without air (below -200 HU), which cannot be CT, is read as MR")
CLIP_MODEL_HELP = f"a VoxCLIP folder or Hub id (default: ${CLIP_MODEL_ENV}, else {DEFAULT_CLIP_MODEL})"
JSON_HELP = "print the result as JSON"


def print_result(args, result, lines: list[str]) -> None:
    """Print `result` as JSON with `--json`, else the human-readable `lines`."""
    # The command's output is its result, on stdout; logs go to stderr.
    print(json.dumps(result, indent=2) if args.json else "\n".join(lines))


def guarded(run):
    """`run(args)` such that bad input and missing models end the command with their message, not a traceback."""

    def wrapper(args) -> None:
        try:
            run(args)
        except (VolumeError, ModelNotFoundError, DicomWebError, ValueError, ImportError) as error:
            raise SystemExit(f"voxlm {args.command}: {error}") from error

    return wrapper
