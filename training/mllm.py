"""What the two MLLM stages (`align`, `finetune`) share: settings, the model they start from, the task mix of streamed
instruction data, and the step (LM loss, plus Dice + BCE for samples with masks)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from datasets import interleave_datasets

from voxlm.data import InstructionCollator, PreprocessedStream, stream_rows
from voxlm.modeling.losses import label_positions
from voxlm.training.assemble import PretrainedParts, build_voxlm
from voxlm.training.loop import build_accelerator, epoch_loader, run_training
from voxlm.training.settings import RunSettings, add_run_arguments, load_settings, overrides_from_args
from voxlm.training.trainable import LoraSettings


@dataclass
class InstructionDataSettings:
    """Streamed instruction data and its task mix.

    Args:
        path (`str`): a dataset folder or Hub id in voxlm's format.
        split (`str`): the split to train on.
        tasks (`dict[str, float]`): configs and their sampling probabilities (normalised), e.g.
            `{vqa: 0.6, seg: 0.2, pos: 0.1, cap: 0.1}`.
        shuffle_buffer (`int`): rows in the shuffle buffer.
    """

    path: str = ""
    split: str = "train"
    tasks: dict = field(default_factory=lambda: {"vqa": 0.6, "seg": 0.2, "pos": 0.1, "cap": 0.1})
    shuffle_buffer: int = 256


@dataclass
class MLLMSettings:
    """A stage's settings: `init_from` (a saved VoxLM folder: the previous stage's output) or the sections that
    assemble one (`pretrained`: where the LLM and the encoder come from; `model`: `VoxLMConfig` keywords;
    `processor`: `VoxVolumeProcessor` keywords; see `voxlm.training.assemble.build_voxlm`), `lora` (fine-tuning
    only), `data` and `run`."""

    init_from: str | None = None
    pretrained: PretrainedParts = field(default_factory=PretrainedParts)
    model: dict = field(default_factory=dict)
    processor: dict = field(default_factory=dict)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: InstructionDataSettings = field(default_factory=InstructionDataSettings)
    run: RunSettings = field(default_factory=lambda: RunSettings(find_unused_parameters=True))


def load_model(settings: MLLMSettings):
    """`(model, processor)`: loaded from `init_from`, or assembled from `pretrained`, `model` and `processor`."""
    if settings.init_from:
        if settings.model or settings.processor or settings.pretrained != PretrainedParts():
            raise ValueError(f"init_from={settings.init_from!r} loads a saved VoxLM, which the pretrained, model and "
                             "processor sections would assemble anew: set init_from or those sections, not both")
        from transformers import AutoModel, AutoProcessor

        import voxlm  # noqa: F401  (registers the Auto classes)

        return AutoModel.from_pretrained(settings.init_from), AutoProcessor.from_pretrained(settings.init_from)
    return build_voxlm(settings.pretrained, settings.model, settings.processor, seed=settings.run.seed)


def mixed_rows(data: InstructionDataSettings, rank: int, world_size: int, seed: int):
    """Rows of several configs interleaved with the task-mix probabilities (each config split across processes)."""
    if not data.path:
        raise ValueError("data.path is required: a dataset folder or Hub id in voxlm's format")
    total = sum(data.tasks.values())
    if total <= 0:
        raise ValueError(f"data.tasks needs positive probabilities, got {data.tasks}")
    streams = [stream_rows(data.path, config, data.split, rank, world_size, data.shuffle_buffer, seed)
               for config in data.tasks]
    probabilities = [weight / total for weight in data.tasks.values()]
    if len(streams) == 1:
        return streams[0]
    return interleave_datasets(streams, probabilities=probabilities, seed=seed, stopping_strategy="first_exhausted")


def lm_train_step(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """One step of either stage: the model's own loss, with its components for logging. Logits are computed only where
    an answer token is predicted."""
    output = model(**batch, logits_to_keep=label_positions(batch["labels"]))
    logs = {"lm_loss": output.lm_loss.detach()}
    if output.seg_dice_loss is not None:
        logs["seg_dice_loss"] = output.seg_dice_loss.detach()
        logs["seg_bce_loss"] = output.seg_bce_loss.detach()
    return output.loss, logs


def train_stage(settings: MLLMSettings, prepare_trainable, stage: str):
    """Build or load the model, let `prepare_trainable(model) -> (model, no_decay)` choose what trains (and which
    trained matrices must not decay, `parameter_groups`), and run the stage.

    Returns:
        `(model, processor, accelerator)`: the trained (prepared) model, its processor and the accelerator.
    """
    set_seed(settings.run.seed)
    model, processor = load_model(settings)
    # Longer samples are cut to the LLM's context (positions beyond it have no embedding, and memory grows with it).
    context = getattr(model.config.text_config, "max_position_embeddings", None)
    collator = InstructionCollator(processor, report_bad_rows=True)
    model, no_decay = prepare_trainable(model)
    accelerator = build_accelerator(settings.run)

    def batches_for_epoch(epoch: int, skip_rows: list[int]):
        seed = settings.run.seed + epoch
        rows = mixed_rows(settings.data, accelerator.process_index, accelerator.num_processes, seed)
        samples = PreprocessedStream(rows, processor, skip_rows=skip_rows, max_length=context)
        return epoch_loader(samples, settings.run, collator, seed)

    model, _, accelerator = run_training(model, batches_for_epoch, lm_train_step, settings.run, accelerator, stage,
                                         no_decay)
    return model, processor, accelerator


def add_stage_parser(subparsers, name: str, help_text: str, example: str, run) -> None:
    """The command of a stage: `--config FILE`, `--resume` and `section.key=value` overrides."""
    parser = subparsers.add_parser(name, help=help_text, description=f"{help_text}.\nExample: {example}",
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path,
                        help="YAML settings (sections init_from, pretrained, model, processor, lora, data, run)")
    add_run_arguments(parser)
    parser.set_defaults(func=lambda args: run(settings_from_args(args)))


def stage_main(stage: str, add_parser, argv: list[str]) -> None:
    """`python -m voxlm.training.<module> ...`, what `accelerate launch -m` runs: the stage's command without `voxlm
    train` in front."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog=f"voxlm train {stage}")
    add_parser(parser.add_subparsers(dest="stage", required=True))
    args = parser.parse_args([stage, *argv])
    args.func(args)


def settings_from_args(args) -> MLLMSettings:
    overrides = overrides_from_args(args)
    return load_settings(MLLMSettings, args.config, overrides)
