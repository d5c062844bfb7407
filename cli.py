"""The `voxlm` command: each sub-command lives beside the code it runs and registers itself with `add_parser`."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import platform
import sys

from voxlm.evaluation import cli as evaluation_cli
from voxlm import quickstart
from voxlm.commands import classify, predict, retrieve
from voxlm.training import finetune, merge_lora, pretrain_projector, scaling, train_clip
from voxlm.data import phantom_dataset


# What `voxlm env` reports: the releases a bug report needs (pyproject.toml's dependencies that break most often).
REPORTED_PACKAGES = (
    "voxlm", "torch", "transformers", "accelerate", "datasets", "peft", "safetensors", "huggingface_hub", "tokenizers",
    "monai", "numpy", "nibabel", "pydicom", "SimpleITK", "gradio",
)


def print_environment(args=None) -> None:
    """Print Python's and the installed releases' versions, to paste into a bug report."""
    print(f"python: {platform.python_version()} ({platform.platform()})")
    for package in REPORTED_PACKAGES:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{package}: {version}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voxlm",
        description="3D medical vision-language models: data, training, evaluation and inference.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (quickstart, phantom_dataset, evaluation_cli):
        module.add_parser(subparsers)
    train = subparsers.add_parser("train", help="run a training stage (pretrain-clip, ...)")
    stages = train.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in (train_clip, pretrain_projector, finetune, scaling):
        stage.add_parser(stages)
    merge_lora.add_parser(subparsers)
    for module in (predict, retrieve, classify):
        module.add_parser(subparsers)
    subparsers.add_parser("env", help="print the versions of Python and the installed releases, for a bug report"
                          ).set_defaults(func=print_environment)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    # A command returns its result (a folder, a results table) or raises SystemExit with a message; neither return
    # value is an exit status, or `sys.exit` would print the result and exit 1.
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
