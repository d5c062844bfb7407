"""`voxlm predict`: ask a VoxLM about a volume or a study; print the answer and its boxes, write the mask."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from voxlm import dicomweb
from voxlm.commands.common import JSON_HELP, MODALITY_HELP, VOLUME_HELP, guarded, print_result
from voxlm.dicom_output import write_dicom_results
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
            raise ValueError(f"{output} would overwrite the input {source.name}; choose another path")


def run(args) -> None:
    """Answer `args.question` about `args.volume` (one file, or the series of a study), or about studies on a DICOMweb
    server, and print the result."""
    check_sources(args)
    outputs = [path for path in (args.mask_out, args.dicom_seg_out, args.dicom_sr_out) if path]
    for output in outputs:
        refuse_overwriting_inputs(output, args.volume)
    model, processor = load_voxlm(args.model)
    model_name = model.name_or_path or str(args.model)
    options = dict(modality=args.modality, window=args.window, max_new_tokens=args.max_new_tokens,
                   mask_series=args.mask_series)
    if args.dicomweb:
        run_dicomweb(args, model, processor, model_name, options)
        return
    source = args.volume[0] if len(args.volume) == 1 else args.volume
    prediction = predict(source, args.question, model, processor, **options)
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
    if args.dicom_seg_out or args.dicom_sr_out:
        lines += write_dicom_outputs(args, prediction, model_name, result)
    print_result(args, result, lines)


def check_sources(args) -> None:
    """Refuse option combinations that cannot work, before the model is loaded."""
    if args.dicomweb:
        if args.volume:
            raise ValueError("give volumes or --dicomweb, not both")
        if bool(args.study_uid) == bool(args.study_uids):
            raise ValueError("--dicomweb needs --study-uid UID or --study-uids FILE (one of them)")
        if args.study_uids and not args.summary_out:
            raise ValueError("--study-uids needs --summary-out (.parquet or .jsonl), the one row per study it writes")
        if args.study_uids and (args.mask_out or args.dicom_seg_out or args.dicom_sr_out):
            raise ValueError("--mask-out, --dicom-seg-out and --dicom-sr-out name one file: use them with --study-uid")
    else:
        if not args.volume:
            raise ValueError("give a volume, a study, or --dicomweb URL with --study-uid or --study-uids")
        for flag in ("study_uid", "study_uids", "store", "summary_out"):
            if getattr(args, flag):
                raise ValueError(f"--{flag.replace('_', '-')} works with --dicomweb URL only")


def write_dicom_outputs(args, prediction, model_name: str, result: dict) -> list[str]:
    """Write the DICOM SEG (when the answer holds a mask) and SR asked for; the lines to print."""
    segmentation, report = write_dicom_results(prediction, args.question, model_name, seg_path=args.dicom_seg_out,
                                               sr_path=args.dicom_sr_out, label=args.segment_label)
    lines = []
    result["dicom_seg_path"] = str(args.dicom_seg_out) if args.dicom_seg_out and segmentation is not None else None
    result["dicom_sr_path"] = str(args.dicom_sr_out) if args.dicom_sr_out else None
    if args.dicom_seg_out:
        if segmentation is None:
            logger.warning("The answer holds no [SEG] or its mask is empty: no DICOM SEG written to %s",
                           args.dicom_seg_out)
        else:
            lines.append(f"DICOM SEG ({segmentation.NumberOfFrames} frames) written to {args.dicom_seg_out}")
    if args.dicom_sr_out:
        lines.append(f"DICOM SR written to {args.dicom_sr_out}")
    return lines


def run_dicomweb(args, model, processor, model_name: str, options: dict) -> None:
    """Answer about one study (`--study-uid`) or many (`--study-uids`) on the DICOMweb server."""
    client = dicomweb.connect(args.dicomweb, timeout=args.timeout)
    if args.study_uids:
        rows = dicomweb.answer_studies(client, dicomweb.read_study_uids(args.study_uids), args.question, model,
                                       processor, model_name, summary_path=args.summary_out, store=args.store,
                                       label=args.segment_label, **options)
        counts = {status: sum(row["status"] == status for row in rows) for status in ("answered", "skipped", "failed")}
        print_result(args, {"studies": len(rows), **counts, "summary_path": str(args.summary_out)},
                     [f"{len(rows)} studies: {counts['answered']} answered, {counts['skipped']} skipped (already "
                      f"answered by this model), {counts['failed']} failed; summary written to {args.summary_out}"])
        if counts["failed"]:
            failed = [row["study_uid"] for row in rows if row["status"] == "failed"]
            raise dicomweb.DicomWebError(f"{len(failed)} studies failed ({', '.join(failed[:5])}"
                                         f"{', ...' if len(failed) > 5 else ''}); the summary says why")
        return
    row = dicomweb.answer_study(client, args.study_uid, args.question, model, processor, model_name,
                                store=args.store, seg_path=args.dicom_seg_out, sr_path=args.dicom_sr_out,
                                mask_path=args.mask_out, label=args.segment_label, **options)
    if row["status"] == "skipped":
        lines = [f"study {args.study_uid} already holds this model's report {row['sr_uid']}: nothing done"]
    else:
        stored = [f"SEG {row['seg_uid']}"] * (row["seg_uid"] is not None) + [f"SR {row['sr_uid']}"]
        lines = [row["answer"]] + [f"stored into study {args.study_uid}: {', '.join(stored)}"] * args.store
    print_result(args, row, lines)


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
        "  voxlm predict study_dicom.zip --question \"Is there a hemorrhage?\" --mask-series 1\n"
        "  voxlm predict ct_series/ --question \"Segment the hemorrhage in this CT.\" --dicom-seg-out seg.dcm "
        "--dicom-sr-out sr.dcm\n"
        "  voxlm predict --dicomweb http://pacs:8042/dicom-web --study-uid 1.2.840.1234 --question \"Segment the "
        "hemorrhage in this CT.\" --store",
    )
    parser.add_argument("volume", metavar="VOLUME", nargs="*", help=STUDY_HELP + " (none with --dicomweb)")
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
    dicom = parser.add_argument_group("DICOM results and DICOMweb (pip install 'voxlm[dicom]')")
    dicom.add_argument("--dicom-seg-out", type=Path, help="for DICOM input: write the mask as a DICOM Segmentation on "
                       "the source series (when the answer holds [SEG])")
    dicom.add_argument("--dicom-sr-out", type=Path, help="for DICOM input: write the question, the answer and its "
                       "boxes (patient coordinates) as a DICOM Structured Report, referencing the SEG")
    dicom.add_argument("--segment-label", help="the SEG's segment label (default: what the question asks to segment, "
                       "e.g. 'hemorrhage' from 'Segment the hemorrhage in this CT.')")
    dicom.add_argument("--dicomweb", metavar="URL", help="a DICOMweb server's root (e.g. http://pacs:8042/dicom-web): "
                       "fetch the study from it (QIDO-RS, WADO-RS) instead of reading VOLUME")
    dicom.add_argument("--study-uid", metavar="UID", help="with --dicomweb: the StudyInstanceUID to answer about")
    dicom.add_argument("--study-uids", metavar="FILE", type=Path, help="with --dicomweb: a file of StudyInstanceUIDs "
                       "(one per line) to answer about one after the other; studies that already hold this model's SR "
                       "are skipped, so a stopped run resumes")
    dicom.add_argument("--store", action="store_true", help="with --dicomweb: send the SEG and SR back into the study "
                       "(STOW-RS); nothing already stored is modified")
    dicom.add_argument("--summary-out", type=Path, help="with --study-uids: one row per study (.parquet or .jsonl)")
    dicom.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each DICOMweb request "
                       "(default 60)")
    parser.add_argument("--json", action="store_true", help=JSON_HELP)
    parser.set_defaults(func=guarded(run))
