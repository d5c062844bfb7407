"""`voxlm predict`: ask a VoxLM about a volume or a study; print the answer and its boxes, write the mask."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from voxlm.commands.common import JSON_HELP, MODALITY_HELP, VOLUME_HELP, guarded, print_result
from voxlm.inference import DEFAULT_MODEL, MODEL_ENV, load_voxlm, predict

logger = logging.getLogger(__name__)

STUDY_HELP = (VOLUME_HELP + "; or a study: several such files, or a DICOM folder or .zip holding several series (up to "
              "the model's max_study_scans)")


def refuse_overwriting_inputs(output, inputs) -> None:
    """Refuse an output path that is one of the inputs (or a file inside an input folder), before any work: writing
    it would destroy the volume being read."""
    target = Path(output).resolve()
    for source in inputs:
        source = Path(source).resolve()
        if target == source or (source.is_dir() and target.is_relative_to(source)):
            raise ValueError(f"--mask-out {output} would overwrite the input {source.name}; choose another path")


def run(args) -> None:
    """Answer `args.question` about `args.volume` (one file, or the series of a study) and print the result."""
    if args.mask_out:
        refuse_overwriting_inputs(args.mask_out, args.volume)
    model, processor = load_voxlm(args.model)
    source = args.volume[0] if len(args.volume) == 1 else args.volume
    prediction = predict(source, args.question, model, processor, modality=args.modality, window=args.window,
                         max_new_tokens=args.max_new_tokens, mask_series=args.mask_series)
    result = prediction.to_dict()
    lines = [prediction.text]
    if prediction.series:
        lines.append(f"study of {len(prediction.series)} series; mask and boxes on series {prediction.mask_series}:")
        lines += [f"  {index}. {description}: {used['modality']} ({used['reason']})"
                  for index, (description, used) in enumerate(zip(prediction.series, prediction.series_modalities))]
        lines += [f"  skipped: {reason}" for reason in prediction.skipped_series]
    else:
        lines.append(f"modality: {prediction.modality} ({prediction.metadata.modality_reason})")
    for box, world in zip(result["boxes"], result["boxes_ras_mm"]):
        lines.append(f"box (z1, y1, x1, z2, y2, x2 in [0, 1]): {box}; corners in RAS mm: {world}")
    result["mask_path"] = None
    if args.mask_out:
        if prediction.mask is None:
            logger.warning("The answer holds no [SEG]: no mask written to %s", args.mask_out)
        else:
            result["mask_path"] = str(prediction.save_mask(args.mask_out))
            lines.append(f"mask ({result['mask_voxels']} voxels) written to {args.mask_out}")
    print_result(args, result, lines)


def add_parser(subparsers) -> None:
    """Register `predict` with the `voxlm` command."""
    parser = subparsers.add_parser(
        "predict", help="answer a question about a volume or a study; write the mask when the answer holds [SEG]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ask a VoxLM about one volume, or about a study (several files, or a DICOM folder or .zip holding "
        "several series, read as series in SeriesNumber order). Prints the answer and any boxes it holds; with "
        "--mask-out, writes the predicted mask as NIfTI on the input's own grid and affine (when the answer holds "
        "[SEG]). For a study, the mask and boxes are on one series: --mask-series (default 0, the first).\n\n"
        "Example:\n  voxlm predict head_ct.nii.gz --question \"Segment the hemorrhage in this CT.\" "
        "--mask-out mask.nii.gz --model voxlm-quickstart/finetune/final/model --json\n"
        "  voxlm predict study_dicom.zip --question \"Is there a hemorrhage?\" --mask-series 1",
    )
    parser.add_argument("volume", metavar="VOLUME", nargs="+", help=STUDY_HELP)
    parser.add_argument("--question", required=True, help="what to ask, e.g. \"Is there a hemorrhage?\"")
    parser.add_argument("--mask-out", type=Path, help="where to write the mask (.nii.gz)")
    parser.add_argument("--model", help=f"a VoxLM folder or Hub id (default: ${MODEL_ENV}, else {DEFAULT_MODEL})")
    parser.add_argument("--modality", help=MODALITY_HELP)
    parser.add_argument("--window", help="override the model's CT window preset (brain, subdural, stroke, "
                        "soft_tissue, lung, bone); the model was trained with its saved one")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (default 64)")
    parser.add_argument("--mask-series", type=int, default=0,
                        help="for a study: the series (0 = first, in the order printed) that the mask is decoded on "
                        "and written on the grid of, and that boxes refer to (default 0)")
    parser.add_argument("--json", action="store_true", help=JSON_HELP)
    parser.set_defaults(func=guarded(run))
