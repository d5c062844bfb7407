"""HLIP benchmark: one VoxViT forward over a study of S = 1, 4, 8 scans, hierarchical attention against full study attention.

For each attention schedule and scan count it reports the fastest of `--repeats` forward times after one warm-up
(the minimum, because the machine is shared and interference only ever adds time), the extra peak
resident memory of the forward (measured in a fresh process per row, so rows do not share allocator state), and the
attention FLOPs counted analytically from the token groups each block attends over: `4 * groups * n^2 * E` per block
(`Q K^T` and `softmax(.) V`, two FLOPs per multiply-add), beside the projection / MLP FLOPs that every schedule shares.
Prints a Markdown table.

Schedules: `study` (every block attends across the whole study: a plain ViT over all S (1 + N) tokens),
`scan_study` and `slice_scan_study` (HLIP presets), and `scan` (scans never meet: the linear floor). The encoder is
VoxViT's default ViT-B (width 768, 12 blocks, 12 heads) on 32 x 128 x 128 scans (513 tokens each), so that the
attention / MLP balance is the real one; the notes add the same FLOP count at M3D's 32 x 256 x 256 input.

Usage: python benchmarks/bench_hlip.py [--scans 1 4 8] [--repeats 3] [--hidden-size 768] [--layers 12]
       [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import common

SCHEDULES = ("study", "scan_study", "slice_scan_study", "scan")
M3D_IMAGE_SIZE = [32, 256, 256]


def build_config(schedule: str, args):
    from voxlm.modeling import VoxViTConfig

    levels = [schedule] * args.layers if schedule in ("study", "scan") else schedule
    return VoxViTConfig(
        image_size=tuple(args.image_size),
        patch_size=tuple(args.patch_size),
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        attention_levels=levels,
        position_embedding_type="sincos",
        max_scans=max(args.scans),
    )


def flop_counts(config, num_scans: int) -> tuple[float, float]:
    """Attention-matrix FLOPs and projection + MLP FLOPs of one forward over one study of `num_scans` scans.

    Args:
        config (`VoxViTConfig`): the encoder.
        num_scans (`int`): S.

    Returns:
        `(attention_flops, linear_flops)`; attention counts `Q K^T` and the weighted sum of values over each group.
    """
    width = config.hidden_size
    depth, height, width_patches = config.grid_size
    tokens_per_scan = 1 + config.num_patches
    # (number of groups, tokens per group) of each level for one study
    groups = {
        "slice": (num_scans * depth, 1 + height * width_patches),
        "scan": (num_scans, tokens_per_scan),
        "study": (1, num_scans * tokens_per_scan),
    }
    attention = sum(4 * count * length**2 * width for count, length in map(groups.get, config.block_attention_levels))
    # Token counts differ only through the slice level's CLS copies; count linear work on the real tokens.
    per_token = 2 * (4 * width**2 + 2 * width * config.intermediate_size)
    linear = config.num_hidden_layers * num_scans * tokens_per_scan * per_token
    return float(attention), float(linear)


def measure(schedule: str, num_scans: int, args) -> dict:
    """Run in a fresh process: time the forward and record how much it raised the peak resident memory."""
    import torch

    from voxlm.modeling import VoxViTModel

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = build_config(schedule, args)
    model = VoxViTModel(config).eval()
    study = torch.rand(1, num_scans, 1, *config.image_size)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with torch.inference_mode():
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            model(study)
            times.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    attention, linear = flop_counts(config, num_scans)
    return dict(
        seconds=min(times[1:]),
        memory_mib=(peak_kib - baseline_kib) / 1024,
        attention_gflops=attention / 1e9,
        linear_gflops=linear / 1e9,
    )


def flop_growth(schedule: str, args, image_size) -> float:
    """All FLOPs of a study of the most scans over those of one scan, counted for `image_size` scans."""
    config = build_config(schedule, argparse.Namespace(**{**vars(args), "image_size": image_size}))
    return sum(flop_counts(config, max(args.scans))) / sum(flop_counts(config, 1))


def total(row: dict) -> float:
    """Attention plus projection / MLP GFLOPs of one measured row."""
    return row["attention_gflops"] + row["linear_gflops"]


def table_rows(rows: list[dict]) -> list[list[str]]:
    """One row per (schedule, S), growth columns relative to the smallest S of the same schedule."""
    first = {row["schedule"]: row for row in rows if row["scans"] == min(r["scans"] for r in rows)}
    cells = []
    for row in rows:
        base = first[row["schedule"]]
        cells.append([
            row["schedule"], str(row["scans"]), str(row["tokens"]), f"{row['seconds']:.3f}",
            f"{row['seconds'] / base['seconds']:.1f}x", f"{row['memory_mib']:.0f}", f"{row['attention_gflops']:.2f}",
            f"{row['attention_gflops'] / base['attention_gflops']:.1f}x", f"{total(row):.2f}",
            f"{total(row) / total(base):.1f}x",
        ])
    return cells


def growth(rows: list[dict], schedule: str) -> dict:
    """Time and all-FLOPs of the most scans over those of the fewest, for one schedule."""
    mine = sorted((row for row in rows if row["schedule"] == schedule), key=lambda row: row["scans"])
    first, last = mine[0], mine[-1]
    return {"time": last["seconds"] / first["seconds"], "flops": total(last) / total(first)}


COLUMNS = ["schedule", "S", "tokens", "forward (s)", "time / S=1", "extra peak RSS (MiB)", "attention GFLOPs",
           "attention / S=1", "all GFLOPs", "all / S=1"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--image-size", type=int, nargs=3, default=[32, 128, 128])
    parser.add_argument("--patch-size", type=int, nargs=3, default=[4, 16, 16])
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", type=Path, default=None, help="also write the result as JSON here")
    parser.add_argument("--worker", nargs=2, metavar=("SCHEDULE", "SCANS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        schedule, num_scans = args.worker[0], int(args.worker[1])
        sys.stdout.write(json.dumps(measure(schedule, num_scans, args)) + "\n")
        return
    forwarded = list(argv if argv is not None else sys.argv[1:])
    worker_args = common.without_flags(forwarded, ("--json-out",))
    def tokens_per_scan_at(image_size) -> int:
        return 1 + math.prod(size // patch for size, patch in zip(image_size, args.patch_size))

    tokens_per_scan = tokens_per_scan_at(args.image_size)
    rows = []
    for schedule in args.schedules:
        for num_scans in sorted(args.scans):
            measured = common.run_worker(__file__, [*worker_args, "--worker", schedule, str(num_scans)])
            rows.append(dict(schedule=schedule, scans=num_scans, tokens=num_scans * tokens_per_scan, **measured))
    result = dict(
        name="hlip",
        title="HLIP study attention",
        command=common.command_line("bench_hlip.py", forwarded),
        description=(
            f"VoxViT forward, one study, scans {tuple(args.image_size)} patch {tuple(args.patch_size)} "
            f"({tokens_per_scan} tokens per scan), width {args.hidden_size}, {args.layers} blocks, "
            f"{args.threads} CPU threads, fastest of {args.repeats}; hierarchical schedules against full study "
            f"attention (`study`)."
        ),
        tables=[dict(columns=COLUMNS, rows=table_rows(rows))],
        figures={"rows": rows, "scans": max(args.scans),
                 "growth": {schedule: growth(rows, schedule) for schedule in args.schedules}},
        notes=[f"The same count at M3D's 32 x 256 x 256 input ({tokens_per_scan_at(M3D_IMAGE_SIZE)} tokens per scan), "
               f"all FLOPs at S={max(args.scans)} over S=1: " + ", ".join(
                   f"{schedule} {flop_growth(schedule, args, M3D_IMAGE_SIZE):.1f}x" for schedule in args.schedules)
               + "."],
    )
    common.emit(result, args.json_out)


if __name__ == "__main__":
    main()
