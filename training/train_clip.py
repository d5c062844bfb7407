"""Stage `pretrain-clip`: VoxCLIP on streamed volume-report pairs (M3D-CLIP), with MG-3D's terms (inter-patient,
text-guided masked-volume reconstruction, image-guided MLM) and COLIPRI's (report generation, masked-image modelling on
image-only volumes mixed in from a second dataset) as options; every extra term is off by default. With
`data.config=study` it pre-trains on whole studies instead (HLIP, seed 001): each step sees a random subset of at most
`data.max_series` series of each study, in random order, and the report's sentences shuffled.

    voxlm train pretrain-clip --config training/configs/clip_phantoms.yaml run.max_steps=200
    voxlm train pretrain-clip --config training/configs/clip_phantoms.yaml data.config=study data.max_series=4 \
        model.vision_config.max_scans=4 model.vision_config.attention_levels=scan_study
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
from datasets import interleave_datasets
from transformers import AutoTokenizer

from voxlm.model_cards import voxclip_card_for_run
from voxlm.modeling import VoxCLIPConfig, VoxCLIPModel
from voxlm.processing import VoxCLIPProcessor, VoxVolumeProcessor
from voxlm.data import ContrastiveCollator, PreprocessedStream, stream_rows
from voxlm.data.study_sampling import StudyCollator, StudySampling
from voxlm.training.assemble import load_vision_encoder, tower_processor
from voxlm.training.loop import build_accelerator, epoch_loader, run_training, save_final
from voxlm.training.settings import (
    RunSettings, add_run_arguments, load_settings, model_keyword_arguments, overrides_from_args,
)
from voxlm.training.trainable import freeze_text_layers

logger = logging.getLogger(__name__)


@dataclass
class ClipPretrainedParts:
    """Where the pretrained parts of a VoxCLIP come from (the `pretrained` section of the stage's config).

    Args:
        vision (`str`, *optional*): a vision tower's folder / Hub id (a VoxViT), or a dual encoder's (a VoxCLIP, or
            a converted COLIPRI, HLIP, DCFormer-SigLIP or Merlin), whose image tower is used, with the preprocessing
            saved beside it; its config is the VoxCLIP's `vision_config`. `None` builds a random tower from
            `model.vision_config` (`model_type` chooses it; a VoxViT by default).
        text (`str`, *optional*): a BERT-like folder / Hub id; `None` uses the packaged MiniLM (offline).
        text_dropout (`float`, *optional*): overrides the text encoder's dropout.
        text_trainable_layers (`int`, *optional*): train only the top N layers of the text encoder (0: lock it, only
            the text projection trains); `None` trains all of it.
    """

    vision: str | None = None
    text: str | None = None
    text_dropout: float | None = None
    text_trainable_layers: int | None = None


@dataclass
class ClipDataSettings:
    """Where the pairs come from: a dataset folder or Hub id in voxlm's format.

    Args:
        path (`str`), split (`str`): the paired data; rows whose report is empty count as image-only.
        config (`str`): `"cap"` (one volume per report) or `"study"` (whole studies, `voxlm.data.study_sampling`:
            the model's `vision_config` needs `max_scans >= max_series`).
        max_series (`int`): with `config="study"`, the most series per study and step.
        random_series (`bool`): with `config="study"`, HLIP's sampling: a random number (1 .. `max_series`) of
            random series in random order each step; `False` keeps the first `max_series` series in stored order
            (whole studies when they have no more).
        shuffle_buffer (`int`), max_text_length (`int`): shuffling and report truncation.
        max_samples (`int`, *optional*): train on the first `max_samples` paired rows only (data-scaling studies).
        mlm_probability (`float`): share of report tokens masked when `model.mlm_loss_weight > 0` (BERT's 15%).
        image_only_path (`str`): a dataset whose volumes are mixed in without their reports (COLIPRI's vision-only
            data, for `model.mim_loss_weight`); empty: none.
        image_only_config (`str`): its config (`cap`, `seg`, ...).
        image_only_probability (`float`): the share of rows drawn from it.
    """

    path: str = ""
    split: str = "train"
    config: str = "cap"
    max_series: int = 4
    random_series: bool = True
    shuffle_buffer: int = 256
    max_text_length: int = 128
    max_samples: int | None = None
    mlm_probability: float = 0.15
    image_only_path: str = ""
    image_only_config: str = "cap"
    image_only_probability: float = 0.5


@dataclass
class ClipSettings:
    """The stage's settings: `pretrained` (where the encoders come from), `model` (`VoxCLIPConfig` keywords:
    `vision_config`, `projection_dim`, `text_pooling`, the loss weights (0 turns a term off), `mask_ratio`, ...; the
    config validates them), `processor` (`VoxVolumeProcessor` keywords; its `image_size` is the encoder's), `data` and
    `run`."""

    pretrained: ClipPretrainedParts = field(default_factory=ClipPretrainedParts)
    model: dict = field(default_factory=dict)
    processor: dict = field(default_factory=dict)
    data: ClipDataSettings = field(default_factory=ClipDataSettings)
    run: RunSettings = field(default_factory=lambda: RunSettings(output_dir="runs/clip", learning_rate=1e-4))


def build_clip(pretrained: ClipPretrainedParts, model: dict | None = None, processor: dict | None = None):
    """`(model, volume_processor, tokenizer)` from the stage's `pretrained`, `model` and `processor` sections."""
    from voxlm.training.backends import minilm_folder

    text = pretrained.text or str(minilm_folder())
    set_elsewhere = {"text_config": f"pretrained.text={text!r} (its own config)"}
    if pretrained.vision is not None:
        set_elsewhere["vision_config"] = f"pretrained.vision={pretrained.vision!r} (its own config)"
    config_arguments = model_keyword_arguments(VoxCLIPConfig, model or {}, set_elsewhere)
    vision_model = load_vision_encoder(pretrained.vision, config_arguments.pop("vision_config", None))
    dropout = pretrained.text_dropout
    text_kwargs = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    clip = VoxCLIPModel.from_vision_text_pretrained(vision_model, text, text_kwargs=text_kwargs, **config_arguments)
    freeze_text_layers(clip, pretrained.text_trainable_layers)
    saved = tower_processor(pretrained.vision)
    if saved is not None:  # a converted encoder's own preprocessing, with the `processor` section's changes
        volume_processor = VoxVolumeProcessor.from_dict({**saved.to_dict(), **(processor or {})})
    else:
        volume_processor = VoxVolumeProcessor(image_size=tuple(clip.config.vision_config.image_size),
                                              **(processor or {}))
    return clip, volume_processor, AutoTokenizer.from_pretrained(text)


def clip_train_step(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """One forward with the loss; logs every active loss component of the output (`contrastive_loss`, `mvr_loss`, ...)
    and the share of paired rows."""
    output = model(**batch, return_loss=True)
    logs = {name: value.detach() for name, value in output.items() if name.endswith("_loss")}
    logs["paired_fraction"] = batch["has_report"].float().mean()
    return output.loss, logs


def clip_rows(data: ClipDataSettings, rank: int, world_size: int, seed: int):
    """This process's rows: the paired data (volume rows or study rows, `data.config`), interleaved with image-only
    rows (reports dropped) when `data.image_only_path` is set."""
    rows = stream_rows(data.path, data.config, data.split, rank, world_size, data.shuffle_buffer, seed=seed,
                       limit=data.max_samples)
    if not data.image_only_path:
        return rows
    if not 0.0 < data.image_only_probability < 1.0:
        raise ValueError(f"data.image_only_probability must be in (0, 1), got {data.image_only_probability}")
    images = stream_rows(data.image_only_path, data.image_only_config, data.split, rank, world_size,
                         data.shuffle_buffer, seed=seed)
    images = images.map(lambda row: {"report": None}, features=images.features)
    probabilities = [1.0 - data.image_only_probability, data.image_only_probability]
    return interleave_datasets([rows, images], probabilities=probabilities, seed=seed,
                               stopping_strategy="first_exhausted")


def check_study_settings(settings: ClipSettings, model: VoxCLIPModel) -> None:
    """Raise `ValueError` naming the setting when `data.config` cannot train this model."""
    data = settings.data
    if data.config not in ("cap", "study"):
        raise ValueError(f"data.config must be 'cap' (volume-report pairs) or 'study' (whole studies), got "
                         f"{data.config!r}")
    if data.config != "study":
        return
    max_scans = getattr(model.config.vision_config, "max_scans", 1)  # towers without a study mode take one scan
    if not 1 <= data.max_series <= max_scans:
        raise ValueError(f"data.max_series ({data.max_series}) must lie in [1, model.vision_config.max_scans = "
                         f"{max_scans}]; raise max_scans to train on more series per study")
    if model.config.builds_volume_decoder:
        raise ValueError("data.config=study: model.mvr_loss_weight and model.mim_loss_weight reconstruct single "
                         "volumes; set them to 0 for studies")
    if data.image_only_path:
        raise ValueError("data.config=study: data.image_only_path mixes in single volumes, which a batch of studies "
                         "cannot hold; leave it empty")


def clip_collator(data: ClipDataSettings, processor, tokenizer, mlm_probability: float, num_patches: int | None,
                  seed: int) -> ContrastiveCollator:
    """The batch builder of one epoch and process, seeded so that a resumed run draws the same MLM and patch masks
    (and study samples) again; with `data.config="study"` it samples each study's series as `data.max_series` and
    `data.random_series` say (HLIP)."""
    studies = None
    if data.config == "study":
        sampling = StudySampling(max_series=data.max_series, random_subset=data.random_series)
        studies = StudyCollator(processor, sampling, seed=seed)
    return ContrastiveCollator(tokenizer, data.max_text_length, mlm_probability, num_patches, seed=seed,
                               studies=studies)


def train(settings: ClipSettings) -> Path:
    """Run the stage; return the folder of the final model (weights, config, code, processor, tokenizer)."""
    if not settings.data.path:
        raise ValueError("data.path is required: a dataset folder or Hub id in voxlm's format")
    set_seed(settings.run.seed)
    model, processor, tokenizer = build_clip(settings.pretrained, settings.model, settings.processor)
    check_study_settings(settings, model)
    accelerator = build_accelerator(settings.run)
    data = settings.data
    if model.config.mim_loss_weight > 0 and not data.image_only_path:
        logger.warning("model.mim_loss_weight > 0 trains on rows without a report only; data.image_only_path is "
                       "empty, so only rows of data.path with an empty report feed it")
    if data.image_only_path and model.config.mim_loss_weight == 0:
        logger.warning("data.image_only_path is set but model.mim_loss_weight is 0: its volumes train nothing")
    mlm_probability = data.mlm_probability if model.config.mlm_loss_weight > 0 else 0.0
    num_patches = model.config.vision_config.num_patches if model.config.builds_volume_decoder else None

    def batches_for_epoch(epoch: int, skip_rows: list[int]):
        seed = settings.run.seed + epoch
        rows = clip_rows(data, accelerator.process_index, accelerator.num_processes, seed)
        # A collator per epoch and process: its masks (and study samples) depend only on the batches of this epoch.
        collator = clip_collator(data, processor, tokenizer, mlm_probability, num_patches,
                                 seed=seed * accelerator.num_processes + accelerator.process_index)
        # Study rows go to the collator whole: it samples their series and preprocesses each with its window.
        samples = PreprocessedStream(rows, None if data.config == "study" else processor, skip_rows=skip_rows)
        return epoch_loader(samples, settings.run, collator, seed)

    model, _, accelerator = run_training(model, batches_for_epoch, clip_train_step, settings.run, accelerator,
                                         stage="pretrain-clip")
    # One processor holds the volume processor, the tokenizer and the report length trained on.
    final = save_final(model, accelerator, Path(settings.run.output_dir) / "final",
                       VoxCLIPProcessor(processor, tokenizer, max_length=data.max_text_length))
    if accelerator.is_main_process:
        voxclip_card_for_run(settings, accelerator.unwrap_model(model), processor, final).save(final / "README.md")
    return final


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML settings (sections pretrained, model, processor, data, run)")
    add_run_arguments(parser)


def run_from_args(args) -> Path:
    overrides = overrides_from_args(args)
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
