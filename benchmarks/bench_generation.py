"""Generation benchmark: a VoxLM over SmolLM2-135M-Instruct (loaded offline) answering about one volume.

Reports time to first token (encoder + prefill), per-token time at `--new-tokens` new tokens with the KV cache against
the same model without it, and batched throughput; medians of `--repeats` runs, all in one run on one machine. Inputs
are preprocessed once per batch size, outside the timed calls.

Usage: python benchmarks/bench_generation.py [--new-tokens 64] [--repeats 3] [--batch-sizes 1 4 8] [--device cuda]
       [--json-out FILE]
"""

from __future__ import annotations

import argparse
import sys

import torch

import common
from voxlm.training.assemble import PretrainedParts, build_voxlm

QUESTION = "Describe the findings of this head CT."


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args(argv)
    device = common.resolve_device(args.device)
    model, processor = build_voxlm(PretrainedParts(llm="smollm2"), dict(
        # A small encoder keeps the uncached run short on a CPU: without a cache the encoder runs again at every
        # step, so with the ViT-B encoder the cache's advantage is larger still.
        vision_config=dict(image_size=[32, 256, 256], patch_size=[4, 16, 16], hidden_size=192, intermediate_size=768,
                           num_hidden_layers=4, num_attention_heads=4),
    ))
    model.to(device).eval()
    volume = torch.rand(32, 256, 256) * 80
    inputs = {size: processor(images=[volume] * size, text=[QUESTION] * size).to(device)
              for size in sorted({1, *args.batch_sizes})}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def generate(batch_size: int, tokens: int, use_cache: bool):
        with torch.no_grad(), autocast:
            return model.generate(**inputs[batch_size], max_new_tokens=tokens, min_new_tokens=tokens,
                                  do_sample=False, use_cache=use_cache)

    first_token = common.median_time(lambda: generate(1, 1, True), args.repeats, device)
    cached = common.median_time(lambda: generate(1, args.new_tokens, True), args.repeats, device)
    uncached = common.median_time(lambda: generate(1, args.new_tokens, False), args.repeats, device)
    per_token_cached = (cached - first_token) / (args.new_tokens - 1)
    per_token_uncached = (uncached - first_token) / (args.new_tokens - 1)
    speedup = per_token_uncached / per_token_cached
    rows = [
        ["time to first token (encoder + prefill)", common.fmt(first_token, 2, " s")],
        ["per new token, KV cache", common.fmt(per_token_cached * 1000, 1, " ms")],
        ["per new token, no cache", common.fmt(per_token_uncached * 1000, 1, " ms")],
        [f"cache speed-up per token at {args.new_tokens} new tokens", common.fmt(speedup, 1, "x")],
    ]
    figures = {"time_to_first_token_s": first_token, "cache_speedup": speedup, "new_tokens": args.new_tokens}
    for batch_size in args.batch_sizes:
        seconds = common.median_time(lambda: generate(batch_size, args.new_tokens, True), 1, device)
        throughput = batch_size * args.new_tokens / seconds
        rows.append([f"batch {batch_size}: generated tokens / s", common.fmt(throughput, 1)])
        figures[f"batch_{batch_size}_tokens_per_s"] = throughput
    prompt = inputs[1]["input_ids"].shape[1]
    precision = "bf16 autocast" if device.startswith("cuda") else "fp32"
    result = dict(
        name="generation",
        title="Generation",
        command=common.command_line("bench_generation.py", argv),
        description=(
            f"Greedy generation with and without the KV cache, same model, same run (target: cached at least 3x "
            f"faster per token at 64 new tokens). VoxLM with a 4-layer width-192 encoder at 32 x 256 x 256 (256 image "
            f"tokens) and SmolLM2-135M, prompt {prompt} tokens, {device} {precision}, {torch.get_num_threads()} "
            f"threads, median of {args.repeats}. Without a cache the encoder and the whole prompt run again at every "
            f"step."
        ),
        tables=[dict(columns=["measurement", "value"], rows=rows)],
        figures=figures,
    )
    common.emit(result, args.json_out)


if __name__ == "__main__":
    main()
