"""Streaming input throughput against the training step's consumption: is the model ever waiting for data?

Writes a phantom dataset, streams `--samples` VQA samples from its local Parquet shards (`datasets`, streaming) through
`PreprocessedStream` (decode + `VoxVolumeProcessor` to the paper size) with each of `--workers` DataLoader worker
counts, and reports samples per second after the first batch (worker start-up not counted). The consumption side is
one training step's samples per second: given with `--step-seconds` (`run_all.py` passes the paper-size VoxLM step it
measured in the same run), or else measured here as a paper-size VoxViT training step.

Usage: python benchmarks/bench_streaming.py [--samples 1000] [--workers 1 2] [--step-seconds S] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

import common
from voxlm.processing import VoxVolumeProcessor
from voxlm.data import PreprocessedStream, stream_rows, write_phantom_dataset


def stream_rate(folder: str, args, workers: int) -> float:
    """Samples per second of `PreprocessedStream` over the phantom shards with `workers` DataLoader workers."""
    stream = PreprocessedStream(stream_rows(folder, "vqa", "train"), VoxVolumeProcessor(image_size=tuple(args.size)))
    loader = torch.utils.data.DataLoader(
        stream, batch_size=args.batch_size, num_workers=workers,
        collate_fn=lambda samples: {"pixel_values": torch.stack([s["pixel_values"] for s in samples])},
    )
    iterator = iter(loader)
    next(iterator)
    count, start = 0, time.perf_counter()
    for batch in iterator:
        count += len(batch["pixel_values"])
        if count + args.batch_size >= args.samples:
            break
    return count / (time.perf_counter() - start)


def encoder_step_seconds(args) -> float:
    """A paper-size VoxViT training step (fp32 on the CPU, bf16 autocast on a GPU), median of `--repeats`."""
    from voxlm.modeling import VoxViTConfig, VoxViTModel

    model = VoxViTModel(VoxViTConfig(image_size=tuple(args.size))).to(args.device).train()
    volume = torch.rand(1, 1, *args.size, device=args.device)
    on_gpu = args.device.startswith("cuda")

    def step():
        with torch.autocast("cuda" if on_gpu else "cpu", dtype=torch.bfloat16, enabled=on_gpu):
            loss = model(volume).last_hidden_state.float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return common.median_time(step, args.repeats, args.device)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, repeats=2)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=3, default=(32, 256, 256), help="processor output (D, H, W)")
    parser.add_argument("--phantom", type=int, nargs=3, default=(32, 96, 96), help="stored phantom (D, H, W)")
    parser.add_argument("--step-seconds", type=float, default=None, help="seconds per training sample consumed")
    parser.add_argument("--step-source", default=None, help="what --step-seconds measured, for the table")
    args = parser.parse_args(argv)
    args.device = common.resolve_device(args.device)
    workers = sorted(set(args.workers))
    with tempfile.TemporaryDirectory() as folder:
        cases = args.samples // 7 + 8  # 9 VQA rows per case, about 80% of cases in the train split
        write_phantom_dataset(folder, cases, shape=tuple(args.phantom), rows_per_shard=64)
        rates = {count: stream_rate(folder, args, count) for count in workers}
    if args.step_seconds is None:
        args.step_seconds = encoder_step_seconds(args)
        args.step_source = f"VoxViT training step at {' x '.join(map(str, args.size))}, batch 1, {args.device}"
    consumption = 1 / args.step_seconds
    per_worker = rates[workers[-1]] / max(workers[-1], 1)
    four = 4 * per_worker
    rows = [[f"{count} workers" if count else "main process", common.fmt(rate, 1), common.fmt(rate / consumption, 1, "x")]
            for count, rate in rates.items()]
    rows.append(["4 workers per GPU (extrapolated: 4 x the per-worker rate above)", common.fmt(four, 1),
                 common.fmt(four / consumption, 1, "x")])
    size = " x ".join(map(str, args.size))
    result = dict(
        name="streaming",
        title="Streaming input against the training step",
        command=common.command_line("bench_streaming.py", argv),
        description=(
            f"{args.samples} phantom VQA samples ({' x '.join(map(str, args.phantom))} int16 `.npy` in local Parquet, "
            f"`datasets` streaming) decoded and preprocessed to {size} in DataLoader workers, batch "
            f"{args.batch_size}, on a machine with {os.cpu_count()} cores. Consumption: {args.step_source}, "
            f"{args.step_seconds:.2f} s per sample = {consumption:.3f} samples/s. Ratio > 1: the input pipeline "
            f"outruns the model, which never waits for data."
        ),
        tables=[dict(columns=["input pipeline", "samples / s", "input rate / consumption"], rows=rows)],
        figures={"rates": {str(k): v for k, v in rates.items()}, "per_worker": per_worker, "four_workers": four,
                 "consumption": consumption, "ratio_max_workers": rates[workers[-1]] / consumption,
                 "ratio_four_workers": four / consumption},
        notes=[
            "The extrapolation assumes one free core per worker, as on a GPU node. A step that consumes faster than "
            "the table's rates (a paper-size encoder step in bf16 on a GPU may take well under 0.1 s per sample; not "
            "measured here) would need proportionally more workers, or volumes stored already at the model size."
        ],
    )
    common.emit(result, args.json_out)


if __name__ == "__main__":
    main()
