"""Stage `pretrain-clip`: VoxCLIP on streamed volume-report pairs (M3D-CLIP, with MG-3D's inter-patient term).

    voxlm train pretrain-clip --config training/configs/clip_phantoms.yaml run.max_steps=200
    accelerate launch --num_processes 8 -m voxlm.training.train_clip --config my_clip.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from transformers import AutoTokenizer

from voxlm.modeling import VoxCLIPModel, VoxViTConfig
from voxlm.processing import VoxVolumeProcessor
from voxlm.training.data import ContrastiveCollator, PreprocessedStream, stream_rows
from voxlm.training.loop import RunSettings, build_accelerator, load_settings, parse_overrides, run_training, save_final



@dataclass
class ClipModelSettings:
    """What to build.

    Args:
        vision (`str`, *optional*): a VoxViT folder / Hub id; `None` builds a random encoder from `vision_config`.
        vision_config (`dict`): VoxViT settings when `vision` is `None` (`image_size` comes from below).
        image_size (`list[int]`): the volume size `(D, H, W)`.
        text (`str`, *optional*): a BERT-like folder / Hub id; `None` uses the packaged MiniLM (offline).
        text_dropout (`float`, *optional*): overrides the text encoder's dropout.
        projection_dim (`int`), text_pooling (`str`), contrastive_loss (`str`), inter_patient_loss_weight (`float`):
            see `VoxCLIPConfig`.
        ct_window (`str`): the processor's Hounsfield window.
    """

    vision: str | None = None
    vision_config: dict = field(default_factory=dict)
    image_size: list[int] = field(default_factory=lambda: [32, 256, 256])
    text: str | None = None
    text_dropout: float | None = None
    projection_dim: int = 512
    text_pooling: str = "mean"
    contrastive_loss: str = "infonce"
    inter_patient_loss_weight: float = 0.0
    ct_window: str = "brain"


@dataclass
class ClipDataSettings:
    """Where the pairs come from: a dataset folder or Hub id in voxlm's format (its `cap` config)."""

    path: str = ""
    split: str = "train"
    shuffle_buffer: int = 256
    max_text_length: int = 128


@dataclass
class ClipSettings:
    model: ClipModelSettings = field(default_factory=ClipModelSettings)
    data: ClipDataSettings = field(default_factory=ClipDataSettings)
    run: RunSettings = field(default_factory=lambda: RunSettings(output_dir="runs/clip", learning_rate=1e-4))


def build_clip(settings: ClipModelSettings):
    """`(model, volume_processor, tokenizer)` for a settings block."""
    from voxlm.training.backends import minilm_folder

    text = settings.text or str(minilm_folder())
    vision_config = VoxViTConfig(image_size=settings.image_size, **settings.vision_config)
    dropout = settings.text_dropout
    text_kwargs = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    model = VoxCLIPModel.from_vision_text_pretrained(
        settings.vision, text, vision_config=vision_config, text_kwargs=text_kwargs,
        projection_dim=settings.projection_dim, text_pooling=settings.text_pooling,
        contrastive_loss=settings.contrastive_loss, inter_patient_loss_weight=settings.inter_patient_loss_weight,
    )
    processor = VoxVolumeProcessor(image_size=tuple(model.config.vision_config.image_size), ct_window=settings.ct_window)
    return model, processor, AutoTokenizer.from_pretrained(text)


def clip_train_step(model, batch: dict) -> tuple[torch.Tensor, dict]:
    batch = {key: value for key, value in batch.items() if key != "has_text"}
    output = model(**batch, return_loss=True)
    logs = {"contrastive_loss": output.contrastive_loss.detach()}
    if output.inter_patient_loss is not None:
        logs["inter_patient_loss"] = output.inter_patient_loss.detach()
    return output.loss, logs


def train(settings: ClipSettings) -> Path:
    """Run the stage; return the folder of the final model (weights, config, code, processor, tokenizer)."""
    if not settings.data.path:
        raise ValueError("data.path is required: a dataset folder or Hub id in voxlm's format")
    set_seed(settings.run.seed)
    model, processor, tokenizer = build_clip(settings.model)
    accelerator = build_accelerator(settings.run)
    collator = ContrastiveCollator(tokenizer, settings.data.max_text_length)

    def batches_for_epoch(epoch: int):
        rows = stream_rows(settings.data.path, "cap", settings.data.split, accelerator.process_index,
                           accelerator.num_processes, settings.data.shuffle_buffer, seed=settings.run.seed + epoch)
        return torch.utils.data.DataLoader(PreprocessedStream(rows, processor), batch_size=settings.run.batch_size,
                                           num_workers=settings.run.num_workers, collate_fn=collator)

    model, _, accelerator = run_training(model, batches_for_epoch, clip_train_step, settings.run, accelerator,
                                         stage="pretrain-clip")
    final = save_final(model, accelerator, Path(settings.run.output_dir) / "final", processor)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(final)
    return final


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML settings (sections model, data, run)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in run.output_dir")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. run.max_steps=10")


def run_from_args(args) -> Path:
    overrides = parse_overrides(args.overrides)
    if args.resume:
        overrides["run.resume"] = "true"
    return train(load_settings(ClipSettings, args.config, overrides))


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain-clip",
        help="pre-train VoxCLIP on volume-report pairs",
        description="Example: voxlm train pretrain-clip --config training/configs/clip_phantoms.yaml "
        "data.path=data/phantoms run.max_steps=200",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_from_args)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="voxlm.training.train_clip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
