"""What every benchmark shares: the result format, Markdown rendering, timing, peak memory, the machine description,
fresh-process workers, and the measured bf16 matmul peak that model FLOPs utilisation (MFU) is computed against.

A benchmark builds one result dict and hands it to [`emit`], which prints the Markdown and, with `--json-out`, writes
the JSON that `run_all.py` collects. The Markdown is rendered here only, so every table in `RESULTS.md` looks the same:

    {"name": "encoder", "title": "...", "command": "python benchmarks/...", "description": "...",
     "tables": [{"caption": "...", "columns": ["...", ...], "rows": [[...], ...]}],
     "figures": {"train_step_fp32_speedup": 1.7, ...},   # the key ratios, for the summary table
     "notes": ["...", ...]}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------------- results
def add_common_arguments(parser: argparse.ArgumentParser, repeats: int = 3) -> None:
    """`--repeats`, `--device` and `--json-out`, the flags `run_all.py` passes to every benchmark."""
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs after one warm-up; the median counts")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the result as JSON here")


def resolve_device(name: str | None) -> str:
    """`cuda` when asked for or available (and asked for nothing), else `cpu`."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return name


def fmt(value, digits: int = 2, suffix: str = "") -> str:
    """A table cell: numbers rounded, `None` as `-`."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def ratio(reference: float | None, ours: float | None) -> float | None:
    """`reference / ours` (a speed-up when both are times), `None` when either is missing."""
    if not reference or not ours:
        return None
    return reference / ours


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """A Markdown table; cells are formatted with [`fmt`] unless they are strings already."""
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell if isinstance(cell, str) else fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render(result: dict, level: int = 2) -> str:
    """One benchmark's Markdown section: heading, command, description, tables, notes."""
    parts = [f"{'#' * level} {result['title']} (`{result['command']}`)"]
    if result.get("description"):
        parts.append(result["description"])
    for table in result.get("tables", []):
        caption = f"{table['caption']}\n\n" if table.get("caption") else ""
        parts.append(caption + markdown_table(table["columns"], table["rows"]))
    for note in result.get("notes", []):
        parts.append(note)
    return "\n\n".join(parts)


def emit(result: dict, json_out: Path | None) -> None:
    """Print the Markdown of a result and, when asked, write its JSON (with the machine it ran on)."""
    result = {**result, "machine": machine_info()}
    if json_out is not None:
        Path(json_out).write_text(json.dumps(result, indent=1))
    sys.stdout.write(render(result) + "\n")


def without_flags(argv: list[str], flags=("--json-out", "--device")) -> list[str]:
    """`argv` without the given one-value flags (and their values)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif not any(arg.startswith(flag + "=") for flag in flags):
            kept.append(arg)
    return kept


def command_line(script: str, argv: list[str]) -> str:
    """The command that reproduces a run, for the section heading (`--json-out` and `--device` left out)."""
    return " ".join(["python", f"benchmarks/{script}", *without_flags(argv)])


def doc_description(doc: str) -> str:
    """A benchmark module docstring's second paragraph (what it measures) on one line, for its RESULTS.md section."""
    return doc.split("\n\n")[1].replace("\n", " ")


# ----------------------------------------------------------------------------------------------------------- timing
def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_runs(function: Callable[[], object], repeats: int, device: str = "cpu", warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls after `warmup` calls, the device synchronised around each."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median_time(function: Callable[[], object], repeats: int, device: str = "cpu", warmup: int = 1) -> float:
    """The median of [`time_runs`]."""
    return statistics.median(time_runs(function, repeats, device, warmup))


# ----------------------------------------------------------------------------------------------------------- memory
def current_rss_gb() -> float:
    """Resident memory of this process now (GB, 2**30 bytes)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def reset_peak_memory(device: str) -> None:
    """Start a new peak: CUDA's allocator peak, or the process's peak RSS (Linux `clear_refs`; a no-op elsewhere)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_gb(device: str) -> float:
    """Peak since the last [`reset_peak_memory`]: `torch.cuda.max_memory_allocated` on CUDA, peak RSS on the CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---------------------------------------------------------------------------------------------------------- workers
def run_worker(script: str | Path, argv: list[str], timeout: float | None = None, env: dict | None = None) -> dict:
    """Run `python script argv...` in a fresh process (clean allocator and peak memory), with `env` added to the
    environment, and parse the JSON it prints as its last stdout line; a failure raises with the worker's stderr."""
    command = [sys.executable, str(script), *argv]
    environment = {**os.environ, **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_worker_result(values: dict) -> None:
    """A worker's answer: one JSON line on stdout, the last one."""
    sys.stdout.write("\n" + json.dumps(values) + "\n")


# ------------------------------------------------------------------------------------------------------ machine, MFU
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU model, cores, RAM, GPU (name, memory) if any, library versions and the date."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "monai", "accelerate", "datasets", "peft"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = None
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        gpu = f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB"
    return dict(
        cpu=cpu_model(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(), ram_gb=round(ram, 1), gpu=gpu,
        versions=versions, date=datetime.date.today().isoformat(),
    )


def measured_matmul_tflops(device: str, dtype: str = "bf16", size: int | None = None, repeats: int = 5) -> float:
    """The measured throughput of a square `dtype` matmul: the peak that MFU is computed against (TFLOP/s).

    Args:
        device (`str`): `cpu` or `cuda`.
        dtype (`str`): `bf16` or `fp32`.
        size (`int`, *optional*): the matrix side (8192 on CUDA, 2048 on the CPU by default).
    """
    import torch

    size = size or (8192 if device.startswith("cuda") else 2048)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=torch_dtype)
    b = torch.randn(size, size, device=device, dtype=torch_dtype)
    seconds = min(time_runs(lambda: a @ b, repeats, device, warmup=2))
    return 2 * size**3 / seconds / 1e12


def vit_train_flops(config, batch_size: int) -> float:
    """Model FLOPs of one VoxViT training step (forward + backward = 3 x forward; recomputation not counted).

    Forward per block: `2 * T * (4 E^2 + 2 E I)` for the projections and MLP, `4 * T^2 * E` for `Q K^T` and the
    weighted values (T = 1 + N tokens, two FLOPs per multiply-add), plus the patch embedding `2 * N * P * E`.
    """
    tokens, width = 1 + config.num_patches, config.hidden_size
    per_block = 2 * tokens * (4 * width**2 + 2 * width * config.intermediate_size) + 4 * tokens**2 * width
    forward = config.num_hidden_layers * per_block + 2 * config.num_patches * config.patch_dim * width
    return 3.0 * forward * batch_size
