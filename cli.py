"""The `voxlm` command: a table of its commands, each registered by the module that runs it with `add_parser`, and
imported only when that command runs.

Every voxlm module imports torch and transformers through `voxlm/__init__.py` (seconds on a small machine), so
`voxlm --help` and `voxlm train --help` list the commands from the tables below without importing any of them, and
`voxlm predict ...` imports the one module that registers `predict`. This file imports nothing of voxlm at module
level: the console script (`launcher/voxlm_launcher.py`) runs it without the package's `__init__`, which the first
command module imported then runs as usual.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import platform
import sys
from typing import NamedTuple


class Command(NamedTuple):
    """A `voxlm` command (or training stage) that another module registers.

    Args:
        module (`str`): the module whose `add_parser(subparsers)` registers it.
        help (`str`): the line that the listing of commands shows; the module registers the same line.
    """

    module: str
    help: str


COMMANDS = {
    "quickstart": Command("voxlm.quickstart", "run the main job: phantoms -> VoxCLIP -> align -> finetune -> evaluate"),
    "data": Command("voxlm.data.phantom_dataset", "write or upload datasets in voxlm's Hub format"),
    "evaluate": Command("voxlm.evaluation.cli", "score a saved model with M3D-Bench metrics"),
    "merge-lora": Command("voxlm.training.merge_lora", "merge a LoRA adapter into its base model"),
    "predict": Command("voxlm.commands.predict",
                       "answer a question about a volume or a study; write the mask when the answer holds [SEG]"),
    "retrieve": Command("voxlm.commands.retrieve", "rank reports by similarity to a volume (VoxCLIP)"),
    "classify": Command("voxlm.commands.classify",
                        "zero-shot classification of a volume over free-text labels (VoxCLIP)"),
    "convert": Command("voxlm.conversion.cli", "convert a released checkpoint (M3D-LaMed, M3D-CLIP, COLIPRI, HLIP, "
                       "DCFormer-SigLIP, Med3DVLM, Merlin) into a voxlm folder"),
}
# `voxlm train STAGE`
TRAINING_STAGES = {
    "pretrain-clip": Command("voxlm.training.train_clip", "pre-train VoxCLIP on volume-report pairs"),
    "align": Command("voxlm.training.pretrain_projector",
                     "align the projector and new tokens (encoder and LLM frozen)"),
    "finetune": Command("voxlm.training.finetune", "fine-tune with LoRA (and segmentation)"),
    "scaling": Command("voxlm.training.scaling",
                       "scaling study: pretrain-clip over data sizes x encoder widths, fit loss = a N^-b + c"),
}

# What `voxlm env` reports: the releases a bug report needs (pyproject.toml's dependencies that break most often).
REPORTED_PACKAGES = (
    "voxlm", "torch", "transformers", "accelerate", "datasets", "peft", "safetensors", "huggingface_hub", "tokenizers",
    "monai", "numpy", "nibabel", "pydicom", "SimpleITK", "gradio", "highdicom", "dicomweb-client",
)


def print_environment(args=None) -> None:
    """Print Python's and the installed releases' versions, to paste into a bug report."""
    # Read from the installed metadata, never by importing: `voxlm env` must answer when importing torch is what broke.
    import importlib.metadata

    print(f"python: {platform.python_version()} ({platform.platform()})")
    for package in REPORTED_PACKAGES:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{package}: {version}")


def add_commands(subparsers, commands: dict[str, Command], selected: str | None, import_all: bool) -> None:
    """Register `commands`: the `selected` one (every one with `import_all`) by its module, in full; the others by
    name and help line only, which is all a listing of them needs."""
    for name, command in commands.items():
        if import_all or name == selected:
            importlib.import_module(command.module).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=command.help)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `voxlm` parser.

    Args:
        argv (`list[str]`, *optional*): the command line it is built for: only the command (and training stage) that
            it names is imported and registered with its arguments. `None` imports and registers every command.
    """
    parser = argparse.ArgumentParser(
        prog="voxlm",
        description="3D medical vision-language models: data, training, evaluation and inference.",
    )
    # No option of `voxlm` or `voxlm train` takes a value, so the first words that are not options name the command
    # and the stage.
    words = [arg for arg in argv or [] if not arg.startswith("-")]
    command = words[0] if words else None
    stage = words[1] if command == "train" and len(words) > 1 else None
    import_all = argv is None
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(subparsers, COMMANDS, command, import_all)
    train = subparsers.add_parser("train", help="run a training stage (pretrain-clip, ...)")
    add_commands(train.add_subparsers(dest="stage", required=True, metavar="STAGE"), TRAINING_STAGES, stage,
                 import_all)
    subparsers.add_parser("env", help="print the versions of Python and the installed releases, for a bug report"
                          ).set_defaults(func=print_environment)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    # A command returns its result (a folder, a results table) or raises SystemExit with a message; neither return
    # value is an exit status, or `sys.exit` would print the result and exit 1.
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
