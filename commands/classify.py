"""`voxlm classify`: zero-shot classification of one volume over free-text labels (VoxCLIP)."""

from __future__ import annotations

import argparse

from voxlm.commands.common import CLIP_MODEL_HELP, JSON_HELP, MODALITY_HELP, VOLUME_HELP, guarded, print_result
from voxlm.inference import classify, load_voxclip


def run(args) -> None:
    """Print the probability of each of the comma-separated `args.labels` for `args.volume`, most likely first."""
    probabilities = classify(args.volume, args.labels.split(","), load_voxclip(args.model), modality=args.modality)
    ranked = sorted(probabilities.items(), key=lambda item: -item[1])
    print_result(args, probabilities, [f"{p:.3f}  {label}" for label, p in ranked])


def add_parser(subparsers) -> None:
    """Register `classify` with the `voxlm` command."""
    parser = subparsers.add_parser(
        "classify", help="zero-shot classification of a volume over free-text labels (VoxCLIP)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Zero-shot classification: each label is embedded through a prompt ensemble and compared with the "
        "volume's embedding.\n\nExample:\n  voxlm classify head_ct.nii.gz --labels \"intracranial hemorrhage,skull "
        "fracture,no acute abnormality\"",
    )
    parser.add_argument("volume", metavar="VOLUME", help=VOLUME_HELP)
    parser.add_argument("--labels", required=True, help="comma-separated class descriptions (at least two)")
    parser.add_argument("--model", help=CLIP_MODEL_HELP)
    parser.add_argument("--modality", help=MODALITY_HELP)
    parser.add_argument("--json", action="store_true", help=JSON_HELP)
    parser.set_defaults(func=guarded(run))
