"""Paper-size encoder benchmark: VoxViT against MONAI's ViT with the same weights, side by side in one run.

Measures, for a 1 x 1 x 32 x 256 x 256 volume (2,048 patch tokens + CLS, ViT-B): inference forward time, and a training
step (forward + backward) time, each the median of `--repeats` runs after one warm-up, plus the peak resident memory
of a process that runs only that measurement. Prints a Markdown table with voxlm / MONAI ratios.

Usage: python benchmarks/bench_encoder.py [--repeats 3] [--batch-size 1] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

IMPLEMENTATIONS = ("voxlm", "monai")
MODES = ("forward", "train_step", "train_step_checkpointed")


def build(implementation: str):
    import torch
    from monai.networks.nets import ViT

    from voxlm.modeling import VoxViTConfig, VoxViTModel
    from voxlm.modeling.convert_m3d import convert_monai_vit_state_dict

    torch.manual_seed(0)
    config = VoxViTConfig()
    reference = ViT(
        in_channels=1, img_size=tuple(config.image_size), patch_size=tuple(config.patch_size),
        proj_type="perceptron", classification=True,
    )
    if implementation == "monai":
        return reference, lambda volume: reference(volume)[0]
    model = VoxViTModel(config)
    model.load_state_dict(convert_monai_vit_state_dict(reference.state_dict()))
    return model, lambda volume: model(volume).last_hidden_state


def measure(implementation: str, mode: str, repeats: int, batch_size: int, dtype: str) -> dict:
    """Run in a fresh process: time `repeats` runs after a warm-up, report the median and the peak RSS."""
    import torch

    model, run = build(implementation)
    if mode == "train_step_checkpointed":
        if implementation == "monai":
            return {"seconds": None, "peak_rss_gb": None}
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train(mode != "forward")
    volume = torch.rand(batch_size, 1, 32, 256, 256)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step():
        with autocast:
            if mode == "forward":
                with torch.no_grad():
                    run(volume)
                return
            loss = run(volume).float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--measure", nargs=2, metavar=("IMPLEMENTATION", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.repeats, args.batch_size, args.dtype)))
        return
    results = {}
    for mode in MODES:
        for implementation in IMPLEMENTATIONS:
            command = [sys.executable, __file__, "--measure", implementation, mode, "--repeats", str(args.repeats),
                       "--batch-size", str(args.batch_size), "--dtype", args.dtype]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[implementation, mode] = json.loads(output.strip().splitlines()[-1])
    import torch

    print(f"Encoder, 1 x 32 x 256 x 256, batch {args.batch_size}, {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print("| measurement | voxlm s | MONAI s | speed-up | voxlm peak RSS GB | MONAI peak RSS GB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in MODES:
        ours, theirs = results["voxlm", mode], results["monai", mode]
        speedup = f"{theirs['seconds'] / ours['seconds']:.2f}x" if theirs["seconds"] else "-"
        monai_s = f"{theirs['seconds']:.2f}" if theirs["seconds"] else "-"
        monai_mem = f"{theirs['peak_rss_gb']:.2f}" if theirs["peak_rss_gb"] else "-"
        print(f"| {mode} | {ours['seconds']:.2f} | {monai_s} | {speedup} | {ours['peak_rss_gb']:.2f} | {monai_mem} |")


if __name__ == "__main__":
    main()
