"""`voxlm convert KIND SRC OUT`: a released checkpoint of another project as a voxlm folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from voxlm.commands.common import guarded

CONVERTERS = {
    "m3d-lamed": "M3D-LaMed (GoodBaiBai88/M3D-LaMed-Phi-3-4B, GoodBaiBai88/M3D-LaMed-Llama-2-7B), with SegVol; "
                 "--config: the numbers of M3D's code its files lack (voxlm.modeling.convert_m3d.M3D_LAMED_CONSTANTS)",
    "m3d-clip": "M3D-CLIP (GoodBaiBai88/M3D-CLIP) as a VoxCLIP; --config: text_config / vision_config / max_length",
    "colipri": "COLIPRI (microsoft/colipri) as a ColipriModel; --config: colipri's own dotted config names "
               "(voxlm.modeling.convert_colipri.COLIPRI_DEFAULTS) and text_config",
    "hlip": "HLIP (Zch0414/hlip open_clip releases) as an HLIPModel; --config: HLIP's model arguments (img_size, "
            "depth, slice_attn_indexes, ...) and context_length",
    "merlin": "Merlin (stanfordmimi/Merlin, with yikuan8/Clinical-Longformer's config and tokenizer); --config: "
              "checkpoint / text_encoder (a folder or Hub id) / max_length",
    "dcformer-siglip": "Med3DVLM's DCFormer-SigLIP (MagicXin/DCFormer_SigLIP); --config: input_size / text_config",
    "med3dvlm": "Med3DVLM (MagicXin/Med3DVLM-Qwen-2.5-7B): DCFormer, MLP-Mixer projector, Qwen2.5; --config: "
                "prompt_layout ('med3dvlm' for its VQA prompts, 'med3dvlm_caption' for captions)",
}

# kind -> its function in voxlm.conversion
CONVERTER_FUNCTIONS = {"m3d-lamed": "convert_m3d_lamed", "m3d-clip": "convert_m3d_clip", "colipri": "convert_colipri",
                       "hlip": "convert_hlip", "merlin": "convert_merlin",
                       "dcformer-siglip": "convert_dcformer_siglip", "med3dvlm": "convert_med3dvlm"}


def run(args) -> Path:
    """Convert `args.source` into `args.output` and print where it went."""
    from voxlm import conversion

    settings = json.loads(Path(args.config).read_text()) if args.config else None
    if args.output.exists() and any(args.output.iterdir()):
        raise ValueError(f"{args.output} exists and is not empty; choose a new folder")
    convert = getattr(conversion, CONVERTER_FUNCTIONS[args.kind])
    output = convert(args.source, args.output, settings)
    print(f"{args.kind} checkpoint {args.source} converted to {output}")
    return output


def add_parser(subparsers) -> None:
    """Register `convert` with the `voxlm` command."""
    parser = subparsers.add_parser(
        "convert", help="convert a released checkpoint (M3D-LaMed, M3D-CLIP, COLIPRI, HLIP, DCFormer-SigLIP, Med3DVLM, "
        "Merlin) "
        "into a voxlm folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a released checkpoint into a voxlm folder (weights shard by shard, config, processor "
        "with the source's preprocessing and prompt layout, tokenizer, model card), loadable with AutoModel / "
        "AutoProcessor with voxlm installed or with trust_remote_code=True.\n\n"
        + "\n".join(f"  {kind}: {what}" for kind, what in CONVERTERS.items())
        + "\n\nExample:\n  voxlm convert m3d-lamed GoodBaiBai88/M3D-LaMed-Phi-3-4B m3d-lamed-phi3\n"
        "  voxlm predict ct.nii.gz --model m3d-lamed-phi3 --question \"Segment the liver.\" --mask-out liver.nii.gz",
    )
    parser.add_argument("kind", choices=sorted(CONVERTERS), help="what the source is")
    parser.add_argument("source", metavar="SRC", help="the released repo's folder, or its Hub id (downloaded)")
    parser.add_argument("output", metavar="OUT", type=Path, help="the voxlm folder to write (new or empty)")
    parser.add_argument("--config", metavar="FILE",
                        help="a JSON file of the source's architecture numbers that its files do not hold (head "
                        "counts), for checkpoints not at the released sizes (see the kinds above)")
    parser.set_defaults(func=guarded(run))
