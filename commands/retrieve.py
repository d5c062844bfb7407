"""`voxlm retrieve`: rank the reports of a gallery by VoxCLIP similarity to one volume."""

from __future__ import annotations

import argparse
from pathlib import Path

from voxlm.commands.common import CLIP_MODEL_HELP, JSON_HELP, MODALITY_HELP, VOLUME_HELP, guarded, print_result
from voxlm.inference import load_voxclip, read_reports, retrieve


def run(args) -> None:
    """Print the `args.top_k` reports of `args.reports` closest to `args.volume`, best first."""
    reports = read_reports(args.reports)
    hits = retrieve(args.volume, reports, load_voxclip(args.model), top_k=args.top_k, modality=args.modality)
    print_result(args, hits, [f"{h['rank']}. ({h['score']:.3f}) {h['report']}" for h in hits])


def add_parser(subparsers) -> None:
    """Register `retrieve` with the `voxlm` command."""
    parser = subparsers.add_parser(
        "retrieve", help="rank reports by similarity to a volume (VoxCLIP)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Rank the reports of a gallery by VoxCLIP similarity to one volume.\n\n"
        "Example:\n  voxlm retrieve head_ct.nii.gz --reports spaces/examples/reports.json --top-k 3",
    )
    parser.add_argument("volume", metavar="VOLUME", help=VOLUME_HELP)
    parser.add_argument("--reports", required=True, type=Path,
                        help="JSON (list of strings or objects with 'report'), CSV ('report' column) or "
                        "text (one report per line)")
    parser.add_argument("--model", help=CLIP_MODEL_HELP)
    parser.add_argument("--top-k", type=int, default=5, help="how many reports to show (default 5)")
    parser.add_argument("--modality", help=MODALITY_HELP)
    parser.add_argument("--json", action="store_true", help=JSON_HELP)
    parser.set_defaults(func=guarded(run))
