"""Streaming input throughput: phantom rows from local Parquet, decoded and preprocessed in DataLoader workers.

Writes a phantom dataset, streams `--samples` VQA samples through `VoxVolumeProcessor` with `--workers` workers
and reports samples per second (after the first batch, so worker start-up is not counted).

Usage: python benchmarks/bench_streaming.py [--samples 1000] [--workers 2] [--size 32 256 256] [--phantom 32 96 96]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from voxlm.processing import VoxVolumeProcessor
from voxlm.training.data import PreprocessedStream, stream_rows, write_phantom_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=3, default=(32, 256, 256), help="processor output (D, H, W)")
    parser.add_argument("--phantom", type=int, nargs=3, default=(32, 96, 96), help="stored phantom (D, H, W)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        cases = args.samples // 7 + 8  # 9 VQA rows per case, about 80% of cases in the train split
        write_phantom_dataset(folder, cases, shape=tuple(args.phantom), rows_per_shard=64)
        stream = PreprocessedStream(stream_rows(folder, "vqa", "train"), VoxVolumeProcessor(image_size=args.size))
        loader = torch.utils.data.DataLoader(
            stream, batch_size=args.batch_size, num_workers=args.workers,
            collate_fn=lambda samples: {"pixel_values": torch.stack([s["pixel_values"] for s in samples])},
        )
        iterator = iter(loader)
        first = next(iterator)
        count, start = 0, time.perf_counter()
        for batch in iterator:
            count += len(batch["pixel_values"])
            if count + len(first["pixel_values"]) >= args.samples:
                break
        elapsed = time.perf_counter() - start
    print(f"Streaming {count + len(first['pixel_values'])} phantom VQA samples ({' x '.join(map(str, args.phantom))} "
          f"int16 .npy in Parquet) -> {' x '.join(map(str, args.size))}, {args.workers} workers, batch {args.batch_size}")
    print("| samples/s | s per batch |")
    print("| --- | --- |")
    print(f"| {count / elapsed:.1f} | {elapsed / max(1, count / args.batch_size):.3f} |")


if __name__ == "__main__":
    main()
