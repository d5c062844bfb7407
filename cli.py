"""The `voxlm` command: each sub-command lives beside the code it runs and registers itself with `add_parser`."""

from __future__ import annotations

import argparse
import logging
import sys

from voxlm import inference
from voxlm.evaluation import cli as evaluation_cli
from voxlm.training import finetune, pretrain_projector, quickstart, scaling, train_clip
from voxlm.training.data import phantom_dataset


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
    finetune.add_merge_parser(subparsers)
    inference.add_parsers(subparsers)
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
