"""Paper-size encoder benchmark: VoxViT against MONAI's ViT with the same weights, side by side in one run.

For a 1 x 1 x 32 x 256 x 256 volume (2,048 patch tokens + CLS, ViT-B) it measures the inference forward and the
training step (forward + backward), in fp32 and under bf16 autocast, each the median of `--repeats` runs after one
warm-up in a fresh process, with the peak memory of that process's timed runs (peak RSS on the CPU,
`torch.cuda.max_memory_allocated` on a GPU). VoxViT's step with gradient checkpointing is measured too (MONAI's ViT
has no such switch). Model FLOPs utilisation (MFU) of the training step is computed against the measured bf16 (and
fp32) matmul throughput of the same device in the same run.

Usage: python benchmarks/bench_encoder.py [--repeats 3] [--dtypes fp32 bf16] [--device cuda] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import sys

import common

IMPLEMENTATIONS = ("voxlm", "monai")
MODES = ("forward", "train_step", "train_step_checkpointed")


def vit_config(image_size):
    from voxlm.modeling import VoxViTConfig

    return VoxViTConfig(image_size=tuple(image_size))


def build(implementation: str, image_size, device: str):
    """The encoder and a function `volume -> tokens (B, 1 + N, E)`; MONAI's weights are copied into VoxViT."""
    import torch
    from monai.networks.nets import ViT

    from voxlm.modeling import VoxViTModel
    from voxlm.modeling.convert_m3d import convert_monai_vit_state_dict

    torch.manual_seed(0)
    config = vit_config(image_size)
    reference = ViT(
        in_channels=1, img_size=tuple(config.image_size), patch_size=tuple(config.patch_size),
        proj_type="perceptron", classification=True,
    )
    if implementation == "monai":
        reference.to(device)
        return reference, lambda volume: reference(volume)[0]
    model = VoxViTModel(config)
    model.load_state_dict(convert_monai_vit_state_dict(reference.state_dict()))
    model.to(device)
    return model, lambda volume: model(volume).last_hidden_state


def measure(implementation: str, mode: str, dtype: str, args) -> dict:
    """Run in a fresh process: the median time of `repeats` runs after a warm-up and the peak memory of the runs."""
    import torch

    device = args.device
    model, run = build(implementation, args.image_size, device)
    if mode == "train_step_checkpointed":
        if implementation == "monai":
            return {"seconds": None, "peak_gb": None}
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train(mode != "forward")
    volume = torch.rand(args.batch_size, 1, *args.image_size, device=device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"

    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            if mode == "forward":
                with torch.no_grad():
                    run(volume)
                return
            loss = run(volume).float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    common.reset_peak_memory(device)
    seconds = common.median_time(step, args.repeats, device, warmup=0)
    return {"seconds": seconds, "peak_gb": common.peak_memory_gb(device)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--image-size", type=int, nargs=3, default=[32, 256, 256], help="(D, H, W); the paper's size")
    parser.add_argument("--measure", nargs=3, metavar=("IMPLEMENTATION", "MODE", "DTYPE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.device = common.resolve_device(args.device)
    if args.measure:
        common.print_worker_result(measure(*args.measure, args))
        return
    import torch

    worker_args = ["--repeats", str(args.repeats), "--batch-size", str(args.batch_size), "--device", args.device,
                   "--image-size", *map(str, args.image_size)]
    results = {}
    for dtype in args.dtypes:
        for mode in MODES:
            for implementation in IMPLEMENTATIONS:
                results[dtype, mode, implementation] = common.run_worker(
                    __file__, [*worker_args, "--measure", implementation, mode, dtype]
                )
    peaks = {dtype: common.measured_matmul_tflops(args.device, dtype) for dtype in ("bf16", "fp32")}
    step_flops = common.vit_train_flops(vit_config(args.image_size), args.batch_size)
    rows, figures = [], {}
    for dtype in args.dtypes:
        for mode in MODES:
            ours, theirs = results[dtype, mode, "voxlm"], results[dtype, mode, "monai"]
            speedup = common.ratio(theirs["seconds"], ours["seconds"])
            mfu = step_flops / ours["seconds"] / 1e12 / peaks[dtype] if mode.startswith("train") else None
            rows.append([mode, dtype, common.fmt(ours["seconds"]), common.fmt(theirs["seconds"]),
                         common.fmt(speedup, suffix="x"), common.fmt(ours["peak_gb"]), common.fmt(theirs["peak_gb"]),
                         common.fmt(None if mfu is None else 100 * mfu, 1, "%")])
            figures[f"{mode}_{dtype}_speedup"] = speedup
    figures["train_step_fp32_s"] = results.get(("fp32", "train_step", "voxlm"), {}).get("seconds")
    figures["train_step_bf16_s"] = results.get(("bf16", "train_step", "voxlm"), {}).get("seconds")
    size = " x ".join(map(str, args.image_size))
    memory = "peak allocated GiB" if args.device.startswith("cuda") else "peak RSS GiB"
    target = "2x with bf16 on a GPU" if args.device.startswith("cuda") else "1.3x on the CPU"
    result = dict(
        name="encoder",
        title="Encoder forward and training step against MONAI",
        command=common.command_line("bench_encoder.py", argv),
        description=(
            f"VoxViT against MONAI's `ViT` (M3D-CLIP settings, `perceptron` patches) with the same weights on a "
            f"1 x {size} volume, batch {args.batch_size}, on {args.device} ({torch.get_num_threads()} threads); each "
            f"row is a fresh process, median of {args.repeats} after a warm-up. Speed-up = MONAI time / voxlm time "
            f"(target: training step at least {target}). MFU = model FLOPs of the step ({step_flops / 1e12:.2f} "
            f"TFLOP: 3 x forward, recomputation not counted) / time / the matmul peak measured here in the same "
            f"dtype: bf16 {peaks['bf16']:.2f} TFLOP/s, fp32 {peaks['fp32']:.2f} TFLOP/s."
        ),
        tables=[dict(columns=["measurement", "dtype", "voxlm s", "MONAI s", "speed-up", f"voxlm {memory}",
                              f"MONAI {memory}", "voxlm MFU"], rows=rows)],
        figures=figures,
        notes=[],
        peaks_tflops=peaks,
    )
    common.emit(result, args.json_out)


if __name__ == "__main__":
    main()
