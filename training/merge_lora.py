"""`voxlm merge-lora`: merge a LoRA adapter (the `final/adapter` that `voxlm train finetune` saves) into its base VoxLM
and save a plain checkpoint that loads with `AutoModel`, without PEFT.

    voxlm merge-lora --base runs/align/final --adapter runs/finetune/final/adapter --out merged/
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


def merge_lora(base: str | Path, adapter: str | Path, out: str | Path):
    """Merge a LoRA adapter into its base VoxLM and save a plain checkpoint (with the base's processor) to `out`;
    returns the merged model."""
    from peft import PeftModel
    from transformers import AutoModel, AutoProcessor

    import voxlm  # noqa: F401

    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), str(adapter)).merge_and_unload()
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(base).save_pretrained(out)
    for card in Path(adapter).glob("README.md"):
        shutil.copy(card, Path(out) / "ADAPTER_README.md")
    return model


def add_parser(subparsers) -> None:
    """Register `merge-lora` with the `voxlm` command."""
    parser = subparsers.add_parser(
        "merge-lora", help="merge a LoRA adapter into its base model",
        description="Example: voxlm merge-lora --base runs/align/final --adapter runs/finetune/final/adapter "
        "--out merged/", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the base VoxLM folder (the model the adapter was trained on)")
    parser.add_argument("--adapter", required=True, help="the PEFT adapter folder")
    parser.add_argument("--out", required=True, help="where the merged model goes")
    parser.set_defaults(func=lambda args: merge_lora(args.base, args.adapter, args.out) and logger.info(
        "Merged into %s", args.out))
