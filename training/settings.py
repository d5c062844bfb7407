"""The settings of a training stage: YAML files (with YAML 1.2's floats) read into nested dataclasses,
`section.key=value` overrides from the command line, `RunSettings` (how a stage runs), and the `model` section checked against the model
config it is made of.

A stage's YAML has a `model:` section that holds the model config's own keyword arguments (`VoxLMConfig`,
`VoxCLIPConfig`: the config validates them, so no field is declared twice) beside a `pretrained:` section that says
where pretrained parts come from (`llm`, `vision`, `text`), as lerobot's training config holds the policy config.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from voxlm.modeling.vision_towers import VISION_TOWERS


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


def check_run_settings(settings: RunSettings) -> None:
    """Refuse settings that cannot train, naming the setting."""
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
        if getattr(settings, name) < 1:
            raise ValueError(f"run.{name} must be at least 1, got {getattr(settings, name)}")
    if not 0.0 <= settings.max_bad_fraction <= 1.0:
        raise ValueError(f"run.max_bad_fraction must be in [0, 1], got {settings.max_bad_fraction}")
    if settings.resume and settings.overwrite:
        raise ValueError("run.resume and run.overwrite exclude each other: continue the run or replace it")


def model_keyword_arguments(config_class, model: dict, set_elsewhere: dict[str, str]) -> dict:
    """The `model` section as keyword arguments of `config_class`: a key the config does not take, or one that another
    section already sets (`set_elsewhere`: key -> what sets it), raises `ValueError` naming both places.

    A key of the vision config given at the top (`model.image_size`) is pointed to its place
    (`model.vision_config.image_size`), since `PretrainedConfig` would otherwise keep it silently as an attribute that
    nothing reads.
    """
    accepted = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    # The fields of every vision tower's config (`vision_config` may be any of them).
    vision_fields = set().union(*(inspect.signature(tower_config.__init__).parameters
                                  for tower_config, _ in VISION_TOWERS.values())) - {"self", "kwargs"}
    problems = []
    for key in sorted(model):
        if key in set_elsewhere:
            problems.append(f"model.{key} is set by {set_elsewhere[key]}; remove it from the model section")
        elif key not in accepted and key in vision_fields:
            problems.append(f"model.{key} is not a {config_class.__name__} field: the encoder's {key} is "
                            f"model.vision_config.{key}")
        elif key not in accepted:
            problems.append(f"model.{key} is not a {config_class.__name__} field (fields: {sorted(accepted)})")
    if problems:
        raise ValueError("; ".join(problems))
    return dict(model)
