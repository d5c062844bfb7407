"""Generation benchmark: a VoxLM over SmolLM2-135M-Instruct (loaded offline) answering about one volume.

Reports time to first token, per-token time at `--new-tokens` new tokens with the KV cache against the same model
without it, and batched throughput; medians of `--repeats` runs, all in one run on one machine.

Usage: python benchmarks/bench_generation.py [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from voxlm.training.assemble import ModelSettings, build_voxlm

QUESTION = "Describe the findings of this head CT."


def timed(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    model, processor = build_voxlm(ModelSettings(
        # A small encoder keeps the uncached run short on a CPU: without a cache the encoder runs again at every
        # step, so with the ViT-B encoder the cache's advantage is larger still.
        llm="smollm2", image_size=[32, 256, 256], seg=False,
        vision_config=dict(patch_size=[4, 16, 16], hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                           num_attention_heads=4),
    ))
    model.eval()
    volume = torch.rand(32, 256, 256) * 80

    def generate(batch_size: int, tokens: int, use_cache: bool):
        inputs = processor(images=[volume] * batch_size, text=[QUESTION] * batch_size)
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                  use_cache=use_cache)

    first_token = timed(lambda: generate(1, 1, True), args.repeats)
    cached = timed(lambda: generate(1, args.new_tokens, True), args.repeats)
    uncached = timed(lambda: generate(1, args.new_tokens, False), args.repeats)
    per_token_cached = (cached - first_token) / (args.new_tokens - 1)
    per_token_uncached = (uncached - first_token) / (args.new_tokens - 1)
    print(f"VoxLM (4-layer width-192 encoder at 32x256x256, 256 image tokens, SmolLM2-135M), "
          f"{torch.get_num_threads()} threads, "
          f"CPU, median of {args.repeats}; prompt {processor(text=[QUESTION])['input_ids'].shape[1]} tokens")
    print("| measurement | value |")
    print("| --- | --- |")
    print(f"| time to first token (encoder + prefill) | {first_token:.2f} s |")
    print(f"| per new token, KV cache | {per_token_cached * 1000:.1f} ms |")
    print(f"| per new token, no cache | {per_token_uncached * 1000:.1f} ms |")
    print(f"| cache speed-up per token at {args.new_tokens} new tokens | {per_token_uncached / per_token_cached:.1f}x |")
    for batch_size in args.batch_sizes:
        seconds = timed(lambda: generate(batch_size, args.new_tokens, True), 1)
        print(f"| batch {batch_size}: generated tokens / s | {batch_size * args.new_tokens / seconds:.1f} |")


if __name__ == "__main__":
    main()
