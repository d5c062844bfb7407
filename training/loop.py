"""The run machinery every training stage shares, over Accelerate: settings, optimizer and schedule, the step loop
with accumulation, logging, a progress bar, checkpoints, exact resumption, and the final `save_pretrained`.

A stage supplies a model, a function that yields batches for an epoch (this process's share of a deterministic
stream), and a `train_step(model, batch) -> (loss, logs)`. Resumption restores model, optimizer, schedule and RNG
state from the newest checkpoint that loads (`checkpoints.py`: no pickles) and skips the batches already consumed, so
the loss curve continues exactly. A run never writes into a folder that holds another run unless told to replace it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .checkpoints import resume, save_checkpoint
from voxlm.data.output_folders import replace_or_refuse

logger = logging.getLogger(__name__)


@dataclass
class RunSettings:
    """How a stage runs (not what it trains).

    Args:
        output_dir (`str`): checkpoints, logs and the final model go here.
        max_steps (`int`): optimizer steps.
        batch_size (`int`): samples per process per micro-batch.
        gradient_accumulation_steps (`int`): micro-batches per optimizer step.
        learning_rate (`float`), weight_decay (`float`), warmup_steps (`int`), max_grad_norm (`float`): AdamW with a
            cosine schedule after a linear warm-up, and gradient clipping.
        mixed_precision (`str`): `"no"`, `"bf16"` or `"fp16"`.
        checkpoint_every (`int`): save a resumable checkpoint every N steps (0: only at the end).
        log_every (`int`): log every N steps.
        seed (`int`): seeds model initialisation, shuffling and dropout.
        resume (`bool`): continue from the newest checkpoint in `output_dir` that loads.
        overwrite (`bool`): start afresh in an `output_dir` that holds a run, deleting its checkpoints, history and
            final model first; without it (or `resume`) such a folder is refused, so that no run is lost.
        tracker (`str`, *optional*): an Accelerate tracker (`"tensorboard"`, `"wandb"`, ...) or `None`.
        num_workers (`int`): DataLoader workers per process.
        find_unused_parameters (`bool`): DDP setting for models with parameters some batches do not use (VoxLM's
            segmentation head on batches without masks).
        gradient_checkpointing (`bool`): recompute each encoder / LLM block in the backward pass instead of keeping
            its activations (non-reentrant `torch.utils.checkpoint`): one more forward per block (up to a third more
            compute) for a fraction of the activation memory (`benchmarks/RESULTS.md`, training step memory).
        compile (`bool`): compile the model in place with `torch.compile` (`nn.Module.compile`, so checkpoints and
            `save_pretrained` see the same module and keys); the first steps pay the compilation.
        max_bad_fraction (`float`): stop with an error when more than this share of the rows seen (after the first
            `MIN_ROWS_FOR_BAD_FRACTION`) could not be used; fewer are skipped, counted by kind and reported.
        module_learning_rates (`dict[str, float]`): a learning rate of their own for the parameters under these
            modules, named as in the model (`{vision_tower: 2.0e-5}`: a pre-trained encoder fine-tuned more gently
            than the projector and the LLM, as LLaVA's `mm_vision_tower_lr`); the schedule scales them alike.
    """

    output_dir: str = "runs/voxlm"
    max_steps: int = 100
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    checkpoint_every: int = 0
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    tracker: str | None = "tensorboard"
    num_workers: int = 0
    find_unused_parameters: bool = False
    gradient_checkpointing: bool = False
    compile: bool = False
    max_bad_fraction: float = 0.25
    module_learning_rates: dict[str, float] = dataclasses.field(default_factory=dict)


class SettingsLoader(yaml.SafeLoader):
    """YAML with YAML 1.2's floats: PyYAML (YAML 1.1) reads `3e-4` or `1e-5`, written without a dot, as a string."""


SettingsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+)$"),
    list("-+0123456789"),
)


def read_yaml(text: str):
    return yaml.load(text, Loader=SettingsLoader)


def load_settings(cls, path: str | Path | None, overrides: dict | None = None):
    """A (nested) settings dataclass from a YAML file plus `key=value` overrides (`run.max_steps=10`)."""
    values = read_yaml(Path(path).read_text()) if path else {}
    for dotted, value in (overrides or {}).items():
        target = values
        *parents, last = dotted.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[last] = read_yaml(value) if isinstance(value, str) else value
    return build_dataclass(cls, values or {})


def build_dataclass(cls, values: dict, base=None):
    """Instantiate a dataclass from a dict (over `base`, or the defaults), recursing into dataclass-typed fields, so a
    nested section keeps the defaults its parent gives it; unknown keys raise `ValueError` naming them."""
    base = base if base is not None else cls()
    known = {field.name: field for field in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"Unknown settings for {cls.__name__}: {sorted(unknown)}; known: {sorted(known)}")
    changes = {}
    for name, value in values.items():
        default = getattr(base, name)
        if dataclasses.is_dataclass(default):
            value = build_dataclass(type(default), value, base=default)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # `learning_rate: 1`
        changes[name] = value
    return dataclasses.replace(base, **changes)


def add_run_arguments(parser) -> None:
    """A stage command's `--resume`, `--overwrite` and `section.key=value` overrides."""
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in run.output_dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run that run.output_dir holds (its checkpoints, history and final model)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. run.max_steps=10")


def overrides_from_args(args) -> dict:
    """The overrides `add_run_arguments` parsed, with `--resume` / `--overwrite` as `run.resume` / `run.overwrite`."""
    overrides = parse_overrides(args.overrides)
    for flag in ("resume", "overwrite"):
        if getattr(args, flag):
            overrides[f"run.{flag}"] = "true"
    return overrides


def parse_overrides(pairs: list[str]) -> dict:
    """`["run.max_steps=10", ...]` -> `{"run.max_steps": "10", ...}`."""
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"Override {pair!r} is not of the form key=value")
        key, value = pair.split("=", 1)
        overrides[key] = value
    return overrides


def parameter_groups(model: torch.nn.Module, weight_decay: float,
                     module_learning_rates: dict[str, float] | None = None) -> list[dict]:
    """Trainable parameters in AdamW groups: without weight decay on biases, norms and embeddings (AdamW convention),
    and with the learning rate of `module_learning_rates` for those under one of its modules (a name or dotted path
    found whole within the parameter's name, so under a PEFT wrapper too; the first that matches wins). A module
    there that holds no trainable parameter raises `ValueError`: the rate would silently apply to nothing."""
    rates = module_learning_rates or {}
    grouped = {(module, decays): [] for module in [None, *rates] for decays in (True, False)}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        module = next((module for module in rates if f".{module}." in f".{name}."), None)
        is_vector = parameter.dim() < 2 or "embed" in name or "norm" in name or "token" in name
        grouped[module, not is_vector].append(parameter)
    empty = [module for module in rates if not grouped[module, True] and not grouped[module, False]]
    if empty:
        raise ValueError(f"run.module_learning_rates names modules with no trainable parameter: {empty}")
    groups = []
    for (module, decays), parameters in grouped.items():
        if module is None or parameters:  # the two default groups always exist, as checkpoints expect
            group = {"params": parameters, "weight_decay": weight_decay if decays else 0.0}
            groups.append(group if module is None else {**group, "lr": rates[module]})
    return groups


def build_accelerator(settings: RunSettings) -> Accelerator:
    project = ProjectConfiguration(
        project_dir=settings.output_dir, automatic_checkpoint_naming=True, total_limit=2
    )
    return Accelerator(
        # Without CUDA, a torchrun / `accelerate launch --multi_gpu` job must be told it is a multi-CPU (gloo) job.
        cpu=not torch.cuda.is_available(),
        mixed_precision=settings.mixed_precision,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        project_config=project,
        log_with=settings.tracker,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=settings.find_unused_parameters)],
    )


def apply_speed_settings(model: torch.nn.Module, settings: RunSettings) -> None:
    """Gradient checkpointing and `torch.compile`, in place, as `settings` ask (a PEFT wrapper passes the call on)."""
    if settings.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", True) or not hasattr(
            model, "activation_checkpointing_enable"
        ):
            raise ValueError(f"run.gradient_checkpointing: {type(model).__name__} does not support it")
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if settings.compile:
        model.compile()


def tracker_config(settings: RunSettings) -> dict:
    """The settings as the flat scalars a tracker takes (TensorBoard's hyperparameters refuse `None` and dicts):
    `module_learning_rates` becomes `module_learning_rates.vision_tower` and the like."""
    config = {}
    for key, value in dataclasses.asdict(settings).items():
        if isinstance(value, dict):
            config.update({f"{key}.{inner}": inner_value for inner, inner_value in value.items()})
        elif value is not None:
            config[key] = value
    return config


# A few bad rows at the start of a run are no verdict on the data.
MIN_ROWS_FOR_BAD_FRACTION = 40


class BadRowTally:
    """The rows a run could not use, by kind (`truncated` rows are kept, and counted apart), against all it has seen;
    too large a share of bad rows stops the run with a `ValueError` that names the counts."""

    def __init__(self, max_fraction: float):
        self.max_fraction = max_fraction
        self.counts = Counter()
        self.seen = 0

    @property
    def bad(self) -> int:
        return sum(count for kind, count in self.counts.items() if kind != "truncated")

    def add(self, bad_rows: dict, good: int) -> None:
        self.counts.update(bad_rows)
        self.seen += good + sum(count for kind, count in bad_rows.items() if kind != "truncated")
        if self.seen >= MIN_ROWS_FOR_BAD_FRACTION and self.bad > self.max_fraction * self.seen:
            raise ValueError(f"{self.bad} of the {self.seen} rows seen could not be used ({self.describe()}), more "
                             f"than run.max_bad_fraction={self.max_fraction}; fix the data or raise the setting")

    def describe(self) -> str:
        return ", ".join(f"{kind} {count}" for kind, count in sorted(self.counts.items())) or "none"


def check_run_settings(settings: RunSettings) -> None:
    """Refuse settings that cannot train, naming the setting."""
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
        if getattr(settings, name) < 1:
            raise ValueError(f"run.{name} must be at least 1, got {getattr(settings, name)}")
    if not 0.0 <= settings.max_bad_fraction <= 1.0:
        raise ValueError(f"run.max_bad_fraction must be in [0, 1], got {settings.max_bad_fraction}")
    if settings.resume and settings.overwrite:
        raise ValueError("run.resume and run.overwrite exclude each other: continue the run or replace it")


def epoch_loader(samples, settings: RunSettings, collate_fn, seed: int) -> torch.utils.data.DataLoader:
    """A DataLoader over one epoch's samples with its own generator, seeded per epoch. Iterating a loader draws the
    workers' base seed. Drawn from the process-wide RNG, it would shift the dropout masks of a resumed run (which
    starts its loader after restoring the RNG state) away from those of the run that went straight through."""
    return torch.utils.data.DataLoader(samples, batch_size=settings.batch_size, num_workers=settings.num_workers,
                                       collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed))


def move_to(batch: dict, device) -> dict:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def run_training(
    model: torch.nn.Module,
    batches_for_epoch: Callable[[int], Iterable[dict]],
    train_step: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    settings: RunSettings,
    accelerator: Accelerator | None = None,
    stage: str = "train",
) -> tuple[torch.nn.Module, list[dict], Accelerator]:
    """Train until `settings.max_steps` optimizer steps.

    Args:
        model (`torch.nn.Module`): what to train (its `requires_grad` flags say which parameters).
        batches_for_epoch (`Callable[[int], Iterable[dict]]`): this process's batches for an epoch, deterministic per
            epoch (so a resumed run sees the same batches).
        train_step (`Callable`): `(model, batch) -> (loss, logs)`, the stage's own step.
        settings (`RunSettings`): how to run.
        accelerator (`Accelerator`, *optional*): reuse one (the data split needs its process index first).
        stage (`str`): the name used for the tracker run and the progress bar.

    Returns:
        `(model, history, accelerator)`: the prepared model, the logged loss per optimizer step, and the accelerator.
    """
    check_run_settings(settings)
    accelerator = accelerator or build_accelerator(settings)
    if accelerator.is_main_process and not settings.resume:
        # Another run's checkpoints would be resumed by mistake, or rotated away by this run's.
        owned = ["checkpoints", f"{stage}_history.jsonl", f"{stage}_bad_rows.json", "final"]
        replace_or_refuse(settings.output_dir, owned, settings.overwrite,
                          "pass --resume to continue that run or --overwrite to replace it")
    accelerator.wait_for_everyone()
    set_seed(settings.seed)
    apply_speed_settings(model, settings)
    groups = parameter_groups(model, settings.weight_decay, settings.module_learning_rates)
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate)
    scheduler = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    step = resume(accelerator, settings.output_dir) if settings.resume else 0
    if settings.tracker:
        accelerator.init_trackers(stage, config=tracker_config(settings))
    history_path = Path(settings.output_dir) / f"{stage}_history.jsonl"
    history_path.parent.mkdir(parents=True, exist_ok=True)
    history = []
    consumed = step * settings.gradient_accumulation_steps  # micro-batches already trained on
    bad_rows = BadRowTally(settings.max_bad_fraction)
    progress = tqdm(total=settings.max_steps, initial=step, desc=stage, disable=not accelerator.is_main_process)
    model.train()
    micro_batch = 0
    last_batch = None
    for epoch in count():
        if step >= settings.max_steps:
            break
        seen_in_epoch = 0
        for batch in batches_for_epoch(epoch):
            good_rows = len(batch["input_ids"]) if "input_ids" in batch else 0
            bad_rows.add(batch.pop("bad_rows", {}), good_rows)
            loss_weight = 1.0
            if good_rows == 0:  # every row of this batch was bad
                if accelerator.num_processes == 1 or last_batch is None:
                    continue
                # The other processes step on this micro-batch: keep DDP's collectives in step with a weightless one.
                batch, loss_weight = last_batch, 0.0
            last_batch = batch
            if micro_batch < consumed:  # resuming: these batches were trained on before the checkpoint
                micro_batch += 1
                seen_in_epoch += 1
                continue
            micro_batch += 1
            seen_in_epoch += 1
            with accelerator.accumulate(model):
                loss, logs = train_step(model, move_to(batch, accelerator.device))
                accelerator.backward(loss * loss_weight)
                if accelerator.sync_gradients and settings.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            record = {"step": step, "loss": loss.detach().float().item(), "lr": scheduler.get_last_lr()[0]}
            record.update({key: float(value) for key, value in logs.items()})
            history.append(record)
            if accelerator.is_main_process:
                with open(history_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            if settings.tracker and (step % settings.log_every == 0 or step == 1):
                accelerator.log(record, step=step)
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            if settings.checkpoint_every and step % settings.checkpoint_every == 0:
                save_checkpoint(accelerator, step)
            if step >= settings.max_steps:
                break
        if seen_in_epoch == 0:
            raise ValueError(f"{stage}: the training data of this process is empty; nothing to train on")
    progress.close()
    if bad_rows.counts:
        logger.warning("%s: %d of the %d rows seen could not be used and were skipped (%s)", stage, bad_rows.bad,
                       bad_rows.seen, bad_rows.describe())
    if accelerator.is_main_process:
        (Path(settings.output_dir) / f"{stage}_bad_rows.json").write_text(
            json.dumps({"seen": bad_rows.seen, "bad": bad_rows.bad, "by_kind": dict(bad_rows.counts)}))
    return model, history, accelerator


def save_final(model, accelerator: Accelerator, folder: str | Path, processor=None) -> Path:
    """Save the trained model (weights gathered first, as DeepSpeed ZeRO-3 needs) and its processor, then close the
    trackers and the process group."""
    folder = Path(folder)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(folder, state_dict=state_dict, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save)
    if processor is not None and accelerator.is_main_process:
        processor.save_pretrained(folder)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return folder

