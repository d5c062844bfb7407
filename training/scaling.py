"""Scaling study (MG-3D explores scaling laws): a grid of paired-data sizes x encoder widths, each cell a short
`pretrain-clip` run through `train_clip.train`, scored by its held-out loss, and the fit

    loss = a * N^(-b) + c

over data size N for each width (and over encoder parameters for each data size), saved as JSON and a PNG plot.

    voxlm train scaling --config training/configs/clip_phantoms.yaml --phantoms 400 --widths 64 128 192
    voxlm train scaling --config my_clip.yaml --data-sizes 1000 3000 10000 30000 run.max_steps=2000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from voxlm.training import train_clip
from voxlm.data import ContrastiveCollator, PreprocessedStream, stream_rows, write_phantom_dataset
from voxlm.training.settings import load_settings, parse_overrides

logger = logging.getLogger(__name__)


@dataclass
class ScalingSettings:
    """The grid and what each cell shares.

    Args:
        clip (`ClipSettings`): the base `pretrain-clip` settings of every run (steps, batch size, loss terms, data).
        data_sizes (`list[int]`): paired training rows per run (`data.max_samples`).
        widths (`list[int]`): VoxViT widths; depth and patch size stay those of `clip.model.vision_config`.
        head_dim (`int`): width per attention head (heads = width / head_dim).
        mlp_ratio (`int`): MLP width = `mlp_ratio` x width.
        eval_split (`str`), eval_batches (`int`): the held-out loss is the mean training loss over this many batches
            of this split (same batches for every run).
        phantoms (`int`): above 0, write this many phantom cases (a quarter held out) to `<output_dir>/data` and
            use them instead of `clip.data.path`.
        phantom_shape (`list[int]`): their voxels `(D, H, W)`.
        output_dir (`str`): runs in `<output_dir>/runs/n<N>-w<W>`, the fit in `scaling.json`, the plot in `scaling.png`.
    """

    clip: train_clip.ClipSettings = field(default_factory=train_clip.ClipSettings)
    data_sizes: list[int] = field(default_factory=lambda: [25, 50, 100, 200])
    widths: list[int] = field(default_factory=lambda: [64, 128, 192])
    head_dim: int = 32
    mlp_ratio: int = 2
    eval_split: str = "test"
    eval_batches: int = 4
    phantoms: int = 0
    phantom_shape: list[int] = field(default_factory=lambda: [32, 64, 64])
    output_dir: str = "runs/scaling"


def power_law(n: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """`a * n^(-b) + c`."""
    return a * np.power(n, -b) + c


def fit_power_law(sizes, losses) -> dict[str, float]:
    """Fit `loss = a * N^(-b) + c` with `scipy.optimize.curve_fit` (a, b, c >= 0).

    The sizes are divided by the smallest one for the fit (better conditioned), and `a` scaled back.

    Args:
        sizes (`Sequence[float]`): N, positive.
        losses (`Sequence[float]`): the loss at each N.

    Returns:
        `{"a", "b", "c"}`.

    Raises:
        `ValueError`: fewer than 3 distinct sizes (three parameters), or a size that is not positive.
    """
    from scipy.optimize import curve_fit

    sizes, losses = np.asarray(sizes, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if len(np.unique(sizes)) < 3:
        raise ValueError(f"fitting a, b and c needs at least 3 distinct sizes, got {sorted(set(sizes.tolist()))}")
    if np.any(sizes <= 0):
        raise ValueError(f"sizes must be positive, got {sizes.tolist()}")
    scale = sizes.min()
    start = (max(losses.max() - losses.min(), 1e-8), 0.5, max(losses.min() * 0.5, 0.0))
    (a, b, c), _ = curve_fit(power_law, sizes / scale, losses, p0=start, bounds=([0, 0, 0], [np.inf, 10, np.inf]),
                             maxfev=20000)
    return {"a": float(a * scale**b), "b": float(b), "c": float(c)}


def cell_settings(settings: ScalingSettings, data_size: int, width: int, data_path: str) -> train_clip.ClipSettings:
    """The `pretrain-clip` settings of one grid cell."""
    if width % settings.head_dim:
        raise ValueError(f"width {width} in `widths` is not a multiple of `head_dim` {settings.head_dim}")
    base = settings.clip
    vision = dict(base.model.get("vision_config", {}), hidden_size=width, intermediate_size=settings.mlp_ratio * width,
                  num_attention_heads=width // settings.head_dim)
    output_dir = Path(settings.output_dir) / "runs" / f"n{data_size}-w{width}"
    return dataclasses.replace(
        base,
        model={**base.model, "vision_config": vision},
        data=dataclasses.replace(base.data, path=data_path, max_samples=data_size),
        run=dataclasses.replace(base.run, output_dir=str(output_dir)),
    )


@torch.no_grad()
def score_run(model_dir: Path, settings: ScalingSettings, data_path: str) -> dict:
    """A saved VoxCLIP's `eval_loss`, the mean training loss (all active terms, weighted) over the first
    `eval_batches` batches of the held-out split (the same masks for every run), and its encoder's
    `vision_parameters`."""
    from transformers import AutoModel, AutoTokenizer

    from voxlm.processing import VoxVolumeProcessor

    model = AutoModel.from_pretrained(model_dir).eval()
    batch_size = settings.clip.run.batch_size
    rows = stream_rows(data_path, "cap", settings.eval_split, limit=settings.eval_batches * batch_size)
    mlm_probability = settings.clip.data.mlm_probability if model.config.mlm_loss_weight > 0 else 0.0
    num_patches = model.config.vision_config.num_patches if model.config.builds_volume_decoder else None
    collator = ContrastiveCollator(AutoTokenizer.from_pretrained(model_dir), settings.clip.data.max_text_length,
                                   mlm_probability, num_patches, seed=0)
    loader = torch.utils.data.DataLoader(PreprocessedStream(rows, VoxVolumeProcessor.from_pretrained(model_dir)),
                                         batch_size=batch_size, collate_fn=collator)
    losses = [model(**batch, return_loss=True).loss.item() for batch in loader]
    if not losses:
        raise ValueError(f"the {settings.eval_split!r} split of {data_path} is empty: no held-out loss")
    vision_parameters = sum(parameter.numel() for parameter in model.vision_model.parameters())
    return {"eval_loss": float(np.mean(losses)), "vision_parameters": vision_parameters}


def count_rows(path: str, split: str) -> int:
    from datasets import load_dataset

    return sum(1 for _ in load_dataset(path, "cap", split=split, streaming=True).select_columns(["id"]))


def prepare_data(settings: ScalingSettings) -> str:
    """The dataset of the study (phantoms written first when `phantoms` > 0); checks that its training split holds the
    largest data size, so every cell trains on the number of rows it claims."""
    path = settings.clip.data.path
    if settings.phantoms > 0:
        path = str(write_phantom_dataset(Path(settings.output_dir) / "data", settings.phantoms,
                                         shape=tuple(settings.phantom_shape), test_fraction=0.25,
                                         seed=settings.clip.run.seed))
    elif not path:
        raise ValueError("give `clip.data.path` (a dataset in voxlm's format) or `phantoms` > 0 to write one")
    available = count_rows(path, settings.clip.data.split)
    if max(settings.data_sizes) > available:
        raise ValueError(f"`data_sizes` goes up to {max(settings.data_sizes)} rows but the "
                         f"{settings.clip.data.split!r} split of {path} holds {available}")
    return path


def fit_axes(runs: list[dict]) -> dict[str, dict]:
    """Power-law fits per width over data sizes and per data size over encoder parameters; an axis with fewer than 3
    points records why it was not fitted instead."""
    fits = {"data": {}, "parameters": {}}
    for axis, group_key, x_key in (("data", "width", "data_size"), ("parameters", "data_size", "vision_parameters")):
        for group in sorted({run[group_key] for run in runs}):
            points = sorted((run[x_key], run["eval_loss"]) for run in runs if run[group_key] == group)
            try:
                fits[axis][str(group)] = fit_power_law(*zip(*points))
            except (ValueError, RuntimeError) as error:  # RuntimeError: curve_fit did not converge
                fits[axis][str(group)] = {"skipped": str(error)}
    return fits


def plot(runs: list[dict], fits: dict, path: Path) -> None:
    """Loss against data size (one line per width) and against encoder parameters (one per data size), with the
    fitted curves dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (("data", "width", "data_size", "paired training rows N"),
              ("parameters", "data_size", "vision_parameters", "encoder parameters"))
    for axis, (name, group_key, x_key, label) in zip(axes, panels):
        for group in sorted({run[group_key] for run in runs}):
            points = sorted((run[x_key], run["eval_loss"]) for run in runs if run[group_key] == group)
            x, y = map(np.asarray, zip(*points))
            line = axis.plot(x, y, "o-", label=f"{group_key} {group}")[0]
            fit = fits[name][str(group)]
            if "a" in fit:
                grid = np.geomspace(x.min(), x.max(), 50)
                axis.plot(grid, power_law(grid, fit["a"], fit["b"], fit["c"]), "--", color=line.get_color())
        axis.set(xscale="log", xlabel=label, ylabel="held-out loss")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_scaling(settings: ScalingSettings) -> dict:
    """Run the grid, fit, and write `scaling.json` and `scaling.png` to `settings.output_dir`; return the JSON."""
    out = Path(settings.output_dir)
    data_path = prepare_data(settings)
    runs = []
    for data_size in settings.data_sizes:
        for width in settings.widths:
            logger.info("Scaling run: %d paired rows, width %d", data_size, width)
            cell = cell_settings(settings, data_size, width, data_path)
            final = train_clip.train(cell)
            runs.append(dict(data_size=data_size, width=width, model=str(final),
                             **score_run(final, settings, data_path)))
    fits = fit_axes(runs)
    result = {"law": "loss = a * N^(-b) + c", "runs": runs, "fits": fits,
              "settings": dataclasses.asdict(settings)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(result, indent=2))
    plot(runs, fits, out / "scaling.png")
    return result


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "scaling",
        help="scaling study: pretrain-clip over data sizes x encoder widths, fit loss = a N^-b + c",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = ScalingSettings()
    parser.add_argument("--config", type=Path, help="base pretrain-clip YAML (sections model, data, run)")
    parser.add_argument("--data-sizes", type=int, nargs="+", default=defaults.data_sizes)
    parser.add_argument("--widths", type=int, nargs="+", default=defaults.widths)
    parser.add_argument("--head-dim", type=int, default=defaults.head_dim)
    parser.add_argument("--eval-batches", type=int, default=defaults.eval_batches)
    parser.add_argument("--phantoms", type=int, default=defaults.phantoms,
                        help="write this many phantom cases and train on them instead of data.path")
    parser.add_argument("--output-dir", default=defaults.output_dir)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the base config")
    parser.set_defaults(func=run_from_args)


def run_from_args(args) -> dict:
    clip = load_settings(train_clip.ClipSettings, args.config, parse_overrides(args.overrides))
    return run_scaling(ScalingSettings(clip=clip, data_sizes=args.data_sizes, widths=args.widths,
                                       head_dim=args.head_dim, eval_batches=args.eval_batches,
                                       phantoms=args.phantoms, output_dir=args.output_dir))


__all__ = ["ScalingSettings", "fit_power_law", "power_law", "run_scaling"]
