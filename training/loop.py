"""The run machinery every training stage shares, over Accelerate (its settings: `settings.py`): optimizer and
schedule, the step loop with accumulation, logging, a progress bar, checkpoints, exact resumption, and the final
`save_pretrained`.

A stage supplies a model, a function that yields batches for an epoch (this process's share of a deterministic
stream), and a `train_step(model, batch) -> (loss, logs)`. Resumption restores model, optimizer, schedule and RNG
state from the newest checkpoint that loads (`checkpoints.py`: no pickles) and skips the batches already consumed, so
the loss curve continues exactly. A run never writes into a folder that holds another run unless told to replace it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_cosine_schedule_with_warmup

from voxlm.data.output_folders import replace_or_refuse
from voxlm.modeling.losses import num_label_tokens

from .checkpoints import resume, save_checkpoint
from .settings import RunSettings, check_run_settings

logger = logging.getLogger(__name__)


def declared_no_weight_decay(model: torch.nn.Module) -> set[torch.nn.Parameter]:
    """The matrices that the models within `model` declare exempt from weight decay (their `no_weight_decay()`:
    learned position embeddings, CLS and mask tokens), found by identity, so through a PEFT wrapper too (its
    `modules_to_save` copies answer for the modules they wrap)."""
    exempt = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and hasattr(module, "no_weight_decay"):
            exempt.update(module.get_parameter(name) for name in module.no_weight_decay())
    return exempt


def parameter_groups(model: torch.nn.Module, weight_decay: float,
                     module_learning_rates: dict[str, float] | None = None,
                     no_decay: Iterable[torch.nn.Parameter] = ()) -> list[dict]:
    """Trainable parameters in AdamW groups.

    Weight decay goes to every matrix (`dim() >= 2`: linear and convolution weights, token embeddings, as nanoGPT and
    the HF Trainer decay them) and to no vector (biases, norm weights); the exceptions are the matrices the models
    declare (`declared_no_weight_decay`) and `no_decay`, a stage's own (the align stage's embedding matrix, whose
    frozen rows AdamW's decoupled decay would shrink too). Parameters under a module of `module_learning_rates` get
    its learning rate (a name or dotted path found whole within the parameter's name, so under a PEFT wrapper too;
    the first that matches wins). A module there that holds no trainable parameter raises `ValueError`: the rate
    would silently apply to nothing."""
    rates = module_learning_rates or {}
    exempt = declared_no_weight_decay(model) | set(no_decay)
    grouped = {(module, decays): [] for module in [None, *rates] for decays in (True, False)}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        module = next((module for module in rates if f".{module}." in f".{name}."), None)
        grouped[module, parameter.dim() >= 2 and parameter not in exempt].append(parameter)
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

    @staticmethod
    def rows_of(bad_rows: dict, good: int) -> int:
        """The stream's rows a batch took: its good rows and the bad ones it left out (truncated rows are good)."""
        return good + sum(count for kind, count in bad_rows.items() if kind != "truncated")

    def add(self, bad_rows: dict, good: int) -> None:
        self.counts.update(bad_rows)
        self.seen += self.rows_of(bad_rows, good)
        if self.seen >= MIN_ROWS_FOR_BAD_FRACTION and self.bad > self.max_fraction * self.seen:
            raise ValueError(f"{self.bad} of the {self.seen} rows seen could not be used ({self.describe()}), more "
                             f"than run.max_bad_fraction={self.max_fraction}; fix the data or raise the setting")

    def describe(self) -> str:
        return ", ".join(f"{kind} {count}" for kind, count in sorted(self.counts.items())) or "none"


@dataclass
class DataPosition:
    """Where a process is in its training stream, saved with each checkpoint so that a resumed run skips the rows it
    trained on without decoding, preprocessing or collating them.

    The DataLoader's workers (`run.num_workers`, one stream when 0) take turns, one batch each. `rows` holds the rows
    each worker's stream gave to the batches of the complete turns so far (good and bad rows alike), which the
    resumed stream skips; the `partial` batches of an unfinished turn cannot be skipped that way (the resumed
    DataLoader starts its turns at worker 0), so they are drawn again and dropped: at most `num_workers - 1`.

    Args:
        epoch (`int`): the epoch.
        rows (`list[int]`): rows per worker in the complete turns of this epoch.
        partial (`int`): batches drawn since the last complete turn.
        bad_rows (`dict[str, int]`), rows_seen (`int`): the run's `BadRowTally` so far.
    """

    epoch: int = 0
    rows: list[int] = field(default_factory=list)
    partial: int = 0
    bad_rows: dict = field(default_factory=dict)
    rows_seen: int = 0


def epoch_loader(samples, settings: RunSettings, collate_fn, seed: int) -> torch.utils.data.DataLoader:
    """A DataLoader over one epoch's samples with its own generator, seeded per epoch. Iterating a loader draws the
    workers' base seed. Drawn from the process-wide RNG, it would shift the dropout masks of a resumed run (which
    starts its loader after restoring the RNG state) away from those of the run that went straight through."""
    return torch.utils.data.DataLoader(samples, batch_size=settings.batch_size, num_workers=settings.num_workers,
                                       collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed))


def with_label_token_counts(window: list[tuple[dict, float]], accelerator: Accelerator) -> list[tuple[dict, float]]:
    """The micro-batches of one optimizer step, each given `num_items_in_batch` when they carry `labels` (the causal
    LM stages): the step's labelled tokens, over all processes, per micro-batch and process. The LM loss sums its
    tokens and divides by it, so that after Accelerate's division by the accumulation steps and DDP's mean over
    processes every token of the step weighs the same (transformers' convention), instead of every micro-batch."""
    if not all("labels" in batch for batch, _ in window):
        return window
    tokens = sum(num_label_tokens(batch["labels"]) * (loss_weight > 0) for batch, loss_weight in window)
    tokens = torch.as_tensor(tokens, dtype=torch.float32, device=accelerator.device)
    if accelerator.num_processes > 1:
        tokens = accelerator.reduce(tokens, reduction="sum")
    per_micro_batch = tokens.clamp(min=1) / (len(window) * accelerator.num_processes)
    return [({**batch, "num_items_in_batch": per_micro_batch}, loss_weight) for batch, loss_weight in window]


def move_to(batch: dict, device) -> dict:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def keep_frozen_batch_norms_in_eval(model: torch.nn.Module) -> None:
    """Put every BatchNorm whose affine parameters are all frozen in eval mode: in train mode it would still update
    its running statistics, so a frozen tower (the DCFormer under `align`) would change after all. (A BatchNorm
    without affine parameters says nothing about being frozen, and keeps training mode.)"""
    for module in model.modules():
        if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            continue
        parameters = list(module.parameters())
        if parameters and not any(parameter.requires_grad for parameter in parameters):
            module.eval()


def run_training(
    model: torch.nn.Module,
    batches_for_epoch: Callable[[int, list[int]], Iterable[dict]],
    train_step: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    settings: RunSettings,
    accelerator: Accelerator | None = None,
    stage: str = "train",
    no_decay: Iterable[torch.nn.Parameter] = (),
) -> tuple[torch.nn.Module, list[dict], Accelerator]:
    """Train until `settings.max_steps` optimizer steps.

    Args:
        model (`torch.nn.Module`): what to train (its `requires_grad` flags say which parameters).
        batches_for_epoch (`Callable[[int, list[int]], Iterable[dict]]`): `(epoch, skip_rows)` -> this process's
            batches for an epoch, deterministic per epoch (so a resumed run sees the same batches), after skipping the
            first `skip_rows[w]` rows of DataLoader worker `w`'s stream undecoded (`PreprocessedStream(skip_rows=)`).
        train_step (`Callable`): `(model, batch) -> (loss, logs)`, the stage's own step.
        settings (`RunSettings`): how to run.
        accelerator (`Accelerator`, *optional*): reuse one (the data split needs its process index first).
        stage (`str`): the name used for the tracker run and the progress bar.
        no_decay (`Iterable[torch.nn.Parameter]`): trained matrices that get no weight decay (`parameter_groups`).

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
    groups = parameter_groups(model, settings.weight_decay, settings.module_learning_rates, no_decay)
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate)
    scheduler = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    step, saved_position = resume(accelerator, settings.output_dir) if settings.resume else (0, None)
    if settings.tracker:
        accelerator.init_trackers(stage, config=tracker_config(settings))
    history_path = Path(settings.output_dir) / f"{stage}_history.jsonl"
    history_path.parent.mkdir(parents=True, exist_ok=True)
    history = []
    workers = max(1, settings.num_workers)
    start = DataPosition(**saved_position) if saved_position else DataPosition(rows=[0] * workers)
    if len(start.rows) != workers:
        raise ValueError(f"run.num_workers={settings.num_workers}, but the checkpoint's stream position is for "
                         f"{len(start.rows)} DataLoader stream(s): resume with the run's own run.num_workers")
    bad_rows = BadRowTally(settings.max_bad_fraction)
    bad_rows.counts.update(start.bad_rows)
    bad_rows.seen = start.rows_seen
    position = start  # updated as batches are drawn: what the next checkpoint saves
    progress = tqdm(total=settings.max_steps, initial=step, desc=stage, disable=not accelerator.is_main_process)
    model.train()
    keep_frozen_batch_norms_in_eval(model)

    def micro_batches():
        """`(batch, loss_weight)` over epochs, from `start` on; keeps `position` at the last batch yielded."""
        nonlocal position
        last_batch = None
        for epoch in count(start.epoch):
            resumed = start if epoch == start.epoch else DataPosition(epoch=epoch, rows=[0] * workers)
            done, turn, drawn = list(resumed.rows), [0] * workers, 0
            for batch in batches_for_epoch(epoch, list(resumed.rows)):
                batch_bad_rows = batch.pop("bad_rows", {})
                good_rows = next((len(batch[key]) for key in ("input_ids", "pixel_values") if key in batch), 0)
                turn[drawn % workers] += BadRowTally.rows_of(batch_bad_rows, good_rows)
                drawn += 1
                if drawn % workers == 0:
                    done, turn = [d + t for d, t in zip(done, turn)], [0] * workers
                if drawn <= resumed.partial:  # trained on before the checkpoint: drawn again only to keep the turns
                    continue
                bad_rows.add(batch_bad_rows, good_rows)
                loss_weight = 1.0
                if good_rows == 0:  # every row of this batch was bad
                    if accelerator.num_processes == 1 or last_batch is None:
                        continue
                    # The other processes step on this micro-batch: a weightless one keeps DDP's collectives in step.
                    batch, loss_weight = last_batch, 0.0
                last_batch = batch
                position = DataPosition(epoch, done, drawn % workers, dict(bad_rows.counts), bad_rows.seen)
                yield batch, loss_weight
            if drawn == 0 and not any(resumed.rows):
                raise ValueError(f"{stage}: the training data of this process is empty; nothing to train on")

    stream = micro_batches()
    while step < settings.max_steps:
        window = [next(stream) for _ in range(settings.gradient_accumulation_steps)]  # one optimizer step's
        for batch, loss_weight in with_label_token_counts(window, accelerator):
            with accelerator.accumulate(model):
                loss, logs = train_step(model, move_to(batch, accelerator.device))
                accelerator.backward(loss * loss_weight)
                if accelerator.sync_gradients and settings.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
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
            save_checkpoint(accelerator, step, dataclasses.asdict(position))
    stream.close()
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

