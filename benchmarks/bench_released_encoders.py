"""The released 3D encoders voxlm converts, side by side on one CT: size, embedding and the cost of embedding it.

Each converted model is built at its released configuration (the converters' defaults) with random weights, which
cost the same time and memory as the released ones. A synthetic chest-CT-sized volume in Hounsfield units (air,
soft tissue and bone, 512 x 512 x 320 voxels of 0.7 x 0.7 x 1.25 mm, written as NIfTI) goes through each model's own
preprocessing (the processor its conversion saves) and its image tower; each model is measured in a fresh process:
preprocessing time, the median time of `--repeats` image embeddings after one warm-up (`get_image_features`, fp32, no
gradients) and the peak RSS of that process. Parameters are counted for the image tower and the whole dual encoder.

Usage: python benchmarks/bench_released_encoders.py [--repeats 2] [--models colipri hlip dcformer-siglip merlin]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import common

# id -> (name, config class in voxlm.modeling, processor function in voxlm.processing, licences of code / weights)
MODELS = {
    "colipri": ("COLIPRI", "ColipriConfig", "colipri_volume_processor", "MIT / MIT"),
    "hlip": ("HLIP (chest CT)", "HLIPConfig", "hlip_volume_processor", "MIT / see its Hub card"),
    "dcformer-siglip": ("DCFormer-SigLIP", "DCFormerSiglipConfig", "dcformer_volume_processor",
                        "MIT, research only / see its Hub card"),
    "merlin": ("Merlin", "MerlinConfig", "merlin_volume_processor", "MIT / see its Hub card"),
}
VOLUME_SHAPE = (512, 512, 320)  # (x, y, z) voxels of the synthetic CT
VOLUME_SPACING = (0.7, 0.7, 1.25)  # mm


def synthetic_ct(path: Path) -> Path:
    """An ellipsoid body of soft tissue (40 HU) with a denser spine (700 HU) in air (-1000 HU), with noise."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in VOLUME_SHAPE), indexing="ij")
    volume = np.full(VOLUME_SHAPE, -1000.0, dtype=np.float32)
    volume[(x / 0.85) ** 2 + (y / 0.6) ** 2 < 1] = 40.0
    volume[(x / 0.08) ** 2 + ((y + 0.4) / 0.08) ** 2 < 1] = 700.0
    volume += rng.normal(0, 20, VOLUME_SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([*VOLUME_SPACING, 1.0])), path)
    return path


def measure(name: str, volume: str, args) -> dict:
    """In a fresh process: parameters, preprocessing time, embedding time and peak RSS of one model."""
    import time

    import torch

    import voxlm.modeling as modeling
    import voxlm.processing as processing
    from transformers import AutoModel

    _, config_class, processor_name, _ = MODELS[name]
    torch.manual_seed(0)
    model = AutoModel.from_config(getattr(modeling, config_class)()).eval()
    processor = getattr(processing, processor_name)()
    start = time.perf_counter()
    pixel_values = processor(volume, modality="CT")["pixel_values"]
    preprocess_seconds = time.perf_counter() - start
    common.reset_peak_memory("cpu")

    def embed():
        with torch.no_grad():
            return model.get_image_features(pixel_values)

    seconds = common.median_time(embed, args.repeats, "cpu")
    return {"input": list(pixel_values.shape[1:]), "embedding": int(embed().shape[-1]),
            "vision_parameters": sum(p.numel() for p in model.vision_model.parameters()),
            "parameters": sum(p.numel() for p in model.parameters()), "preprocess_seconds": preprocess_seconds,
            "seconds": seconds, "peak_gb": common.peak_memory_gb("cpu")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, repeats=2)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--measure", nargs=2, metavar=("MODEL", "VOLUME"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.measure:
        common.print_worker_result(measure(*args.measure, args))
        return
    import torch

    with tempfile.TemporaryDirectory() as folder:
        volume = synthetic_ct(Path(folder) / "ct.nii.gz")
        results = {name: common.run_worker(__file__, ["--repeats", str(args.repeats), "--measure", name, str(volume)])
                   for name in args.models}
    rows = [[MODELS[name][0], " x ".join(map(str, result["input"])), f"{result['vision_parameters'] / 1e6:.1f} M",
             f"{result['parameters'] / 1e6:.1f} M", str(result["embedding"]), common.fmt(result["preprocess_seconds"]),
             common.fmt(result["seconds"]), common.fmt(result["peak_gb"]), MODELS[name][3]]
            for name, result in results.items()]
    fastest = min(result["seconds"] for result in results.values())
    machine = common.machine_info()
    result = dict(
        name="released_encoders",
        title="The released 3D encoders, side by side",
        command=common.command_line("bench_released_encoders.py", argv),
        description=common.doc_description(__doc__) + f" Measured on {machine['date']}: {machine['cpu']}, "
        f"{torch.get_num_threads()} threads, one run.",
        tables=[dict(columns=["model", "input (C x D x H x W)", "image tower", "total", "embedding",
                              "preprocess s", "embed s", "peak RSS GiB", "licence (code / weights)"], rows=rows)],
        figures={f"{name}_over_fastest": results[name]["seconds"] / fastest for name in results},
        notes=["Speed differs mostly by token count: COLIPRI attends over 24^3 = 13,824 tokens of 864 channels in "
               "every layer; HLIP over 2,744 per scan; DCFormer and Merlin are convolutional."],
    )
    common.emit(result, args.json_out)


if __name__ == "__main__":
    main()
