"""Run every benchmark and rewrite `benchmarks/RESULTS.md`: one command, one machine, one run.

    python benchmarks/run_all.py            # the full suite at the paper size (tens of minutes on a 2-core CPU)
    python benchmarks/run_all.py --quick    # smaller inputs and single repeats, to check that everything runs
    python benchmarks/run_all.py --only encoder memory   # a subset; the other sections keep their last results

Each benchmark runs as its own process (and each of its measurements in a fresh one where memory is measured) and
writes its result as JSON into `benchmarks/results/`; the runner renders every section with `common.render` and
replaces the part of `RESULTS.md` between the `run_all` markers. Everything outside the markers (the quickstart's
results, sections other people add) is kept as it is. The streaming benchmark compares the input rate with the training
step that the memory benchmark measured in the same run. The 7B memory plan also goes into the README's
"Memory to train the 7B model" section, and the released encoders' table into "Use the field's released 3D encoders",
each between its own markers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import common

RESULTS = common.BENCHMARKS / "RESULTS.md"
README = common.BENCHMARKS.parent / "README.md"
JSON_FOLDER = common.BENCHMARKS / "results"
BEGIN, END = "<!-- run_all: begin -->", "<!-- run_all: end -->"
PLAN_BEGIN, PLAN_END = "<!-- memory_plan: begin -->", "<!-- memory_plan: end -->"
ENCODERS_BEGIN, ENCODERS_END = "<!-- released_encoders: begin -->", "<!-- released_encoders: end -->"

# name -> (script, full arguments, quick arguments); run in this order (memory before streaming, which uses it)
SUITE = {
    "preprocessing": ("bench_preprocessing.py", ["--repeats", "3"], ["--repeats", "1", "--shape", "256", "256", "100"]),
    "encoder": ("bench_encoder.py", ["--repeats", "2"], ["--repeats", "1", "--image-size", "16", "128", "128"]),
    "generation": ("bench_generation.py", ["--repeats", "2", "--batch-sizes", "1", "4"],
                   ["--repeats", "1", "--new-tokens", "16", "--batch-sizes", "2"]),
    "memory": ("bench_memory.py", ["--repeats", "1"], ["--repeats", "1", "--configs", "fp32_ckpt"]),
    "streaming": ("bench_streaming.py", ["--samples", "1000"], ["--samples", "200"]),
    "memory_plan": ("memory_plan.py", [], []),
    "hlip": ("bench_hlip.py", ["--repeats", "3"], ["--repeats", "1", "--scans", "1", "4", "--image-size", "16", "64",
                                                "64", "--hidden-size", "192", "--heads", "3", "--layers", "2"]),
    "study_zero_shot": ("bench_study_zero_shot.py", [], ["--studies", "60", "--test-studies", "30", "--steps", "5"]),
    "cli": ("bench_cli.py", ["--repeats", "5"], ["--repeats", "1"]),
    "released_encoders": ("bench_released_encoders.py", ["--repeats", "2"],
                          ["--repeats", "1", "--models", "dcformer-siglip", "hlip"]),
}
# benchmarks that run on the CPU only (no --device flag)
CPU_ONLY = ("memory_plan", "hlip", "study_zero_shot", "cli", "released_encoders")


def run_benchmark(name: str, quick: bool, device: str | None) -> dict:
    """Run one benchmark script and return its JSON result (with the wall-clock time it took)."""
    script, full, quick_args = SUITE[name]
    arguments = list(quick_args if quick else full)
    if device and name not in CPU_ONLY:
        arguments += ["--device", device]
    if name == "streaming":
        memory = load_result("memory")
        if memory is not None and memory["figures"].get("fastest_step_seconds"):
            arguments += ["--step-seconds", f"{memory['figures']['fastest_step_seconds']:.4f}", "--step-source",
                          "the fastest paper-size VoxLM fine-tuning step of the memory benchmark, batch 1"]
    out = JSON_FOLDER / f"{name}.json"
    command = [sys.executable, str(common.BENCHMARKS / script), *arguments, "--json-out", str(out)]
    print(f"[run_all] {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    completed = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        # One broken benchmark must not lose the others' results: report it and keep its last result, if any.
        print(f"[run_all] {name} FAILED:\n{completed.stderr[-3000:]}", flush=True)
        return load_result(name)
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - start
    out.write_text(json.dumps(result, indent=1))
    print(f"[run_all] {name}: done in {result['wall_s']:.0f} s", flush=True)
    return result


def load_result(name: str) -> dict | None:
    path = JSON_FOLDER / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def header(machine: dict, quick: bool) -> str:
    versions = ", ".join(f"{key} {value}" for key, value in machine["versions"].items() if value)
    gpu = machine["gpu"] or "none (GPU figures are not measured here)"
    mode = "`--quick` (reduced sizes, single repeats: for checking, not for quoting)" if quick else "full"
    return "\n".join([
        "_Everything between the `run_all` markers is written by `python benchmarks/run_all.py`; edit outside them._",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
        f"{machine['ram_gb']:.0f} GiB RAM; GPU: {gpu}.",
        f"Versions: {versions}. Date: {machine['date']}. Run: {mode}.",
        "Every ratio compares two measurements taken side by side in the same run on this machine, which other jobs "
        "share, so absolute times are noisy; the ratios are what count.",
    ])


def summary(results: dict, machine: dict) -> str:
    """The issue's targets against this run's figures."""
    on_gpu = bool(machine["gpu"])

    def figure(name, key):
        return (results.get(name) or {}).get("figures", {}).get(key)

    rows = []
    encoder_target = "2x (bf16, GPU)" if on_gpu else "1.3x (CPU)"
    encoder_key = "train_step_bf16_speedup" if on_gpu else "train_step_fp32_speedup"
    value = figure("encoder", encoder_key)
    rows.append(["encoder training step vs MONAI ViT", encoder_target, common.fmt(value, suffix="x"),
                 verdict(value, 2.0 if on_gpu else 1.3)])
    value = figure("encoder", "train_step_bf16_speedup")
    if not on_gpu:
        rows.append(["encoder training step vs MONAI ViT, bf16 autocast", "2x on a GPU",
                     common.fmt(value, suffix="x") + " (CPU)", "not measured on a GPU"])
    value = figure("generation", "cache_speedup")
    tokens = figure("generation", "new_tokens") or 64
    rows.append([f"KV cache, per token at {tokens} new tokens", "3x at 64", common.fmt(value, 1, "x"),
                 verdict(value, 3.0)])
    value = figure("preprocessing", "speedup")
    difference = figure("preprocessing", "max_abs_difference")
    rows.append(["preprocessing vs MONAI Compose", "2x, equal output",
                 f"{common.fmt(value, suffix='x')}, max diff {common.fmt(difference, 1) if difference is None else f'{difference:.1e}'}",
                 verdict(value, 2.0)])
    value = figure("streaming", "ratio_four_workers")
    rows.append(["input rate / step consumption, 4 workers", "> 1 (never the bottleneck)",
                 common.fmt(value, 1, "x"), verdict(value, 1.0) + ("" if on_gpu else " (CPU step)")])
    study, single = figure("study_zero_shot", "study_auc"), figure("study_zero_shot", "one_series_auc")
    low = figure("study_zero_shot", "difference_low")
    if study is None or single is None:
        holds = "not measured"
    elif study > single:
        holds = "yes" if low > 0 else f"higher, but the 95% interval of the difference reaches {low:+.3f}"
    else:
        holds = "no"
    rows.append(["zero-shot hemorrhage AUC, finding in one series: study-mode VoxCLIP vs one random series",
                 "study > one series", f"{common.fmt(study, 3)} vs {common.fmt(single, 3)}", holds])
    rows.append(hlip_target(figure("hlip", "growth") or {}, figure("hlip", "scans")))
    after, before = figure("cli", "help_after_s"), figure("cli", "help_before_s")
    if after is None:
        rows.append(["`voxlm --help`, warm", "well under 1.5 s on 2 cores", "not measured", "not measured"])
    else:
        rows.append(["`voxlm --help`, warm", "well under 1.5 s on 2 cores", f"{after:.2f} s (before: {before:.1f} s)",
                     "yes" if after < 1.5 else "no"])
    return "## Targets\n\n" + common.markdown_table(["target", "wanted", "this run", "holds"], rows)


def hlip_target(growth: dict, scans: int | None) -> list[str]:
    """HLIP's scan/study schedule from S=1 to the most scans: close to linear means its FLOPs growth lies nearer the
    linear one (S) than that of full study attention."""
    target = ["HLIP scan/study encoder forward, S=1 to the most scans", "close to linear in S"]
    hierarchical, full = growth.get("scan_study"), growth.get("study")
    if hierarchical is None or full is None:
        return [*target, "not measured", "not measured"]
    nearer_linear = hierarchical["flops"] - scans < full["flops"] - hierarchical["flops"]
    return [*target, f"S={scans}: {hierarchical['time']:.1f}x time, {hierarchical['flops']:.1f}x FLOPs "
            f"(linear {scans}x; full study {full['time']:.1f}x, {full['flops']:.1f}x)",
            "yes (nearer linear than full study)" if nearer_linear else "no"]


def verdict(value, threshold: float) -> str:
    if value is None:
        return "not measured"
    return "yes" if value >= threshold else "no"


def replace_between(text: str, begin: str, end: str, body: str, append_heading: str | None = None) -> str:
    """`text` with the part between the markers replaced by `body` (markers appended, under a heading, if absent)."""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        return text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    if append_heading is not None:
        return text.rstrip("\n") + f"\n\n{append_heading}\n\n{block}\n"
    return block + "\n\n" + text


def write_results(results: dict, quick: bool) -> None:
    machine = next(iter(results.values()))["machine"]
    sections = [header(machine, quick), summary(results, machine)]
    sections += [common.render(result) for name in SUITE if (result := results.get(name))]
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    generated = "\n\n".join(sections)
    if BEGIN not in text:
        title, _, rest = text.partition("\n")
        text = f"{title}\n\n{BEGIN}\n{END}\n{rest}"
    RESULTS.write_text(replace_between(text, BEGIN, END, generated))
    encoders = results.get("released_encoders")
    if encoders is not None and README.exists():
        body = "\n\n".join([encoders["description"], common.markdown_table(**encoders["tables"][0])])
        README.write_text(replace_between(README.read_text(), ENCODERS_BEGIN, ENCODERS_END, body))
    plan = results.get("memory_plan")
    if plan is not None and README.exists():
        notes = list(plan.get("notes", []))
        memory = results.get("memory")
        if memory is not None:
            checks = "; ".join(
                f"{row[0]}: formula {row[3]} GiB, measured {row[4]} GiB" for row in memory["tables"][1]["rows"])
            notes.append(
                "Cross-check, measured on this machine's CPU (ViT-B at 32 x 256 x 256 + SmolLM2-135M with LoRA, the "
                f"same formula; `bench_memory.py`), activations + gradients of one step: {checks}. The formula counts "
                "every gradient as alive at the activation peak, so it is an upper bound, tight without checkpointing "
                "and loose with it: the plan errs on the safe side.")
        body = "\n\n".join([plan["description"], common.markdown_table(**plan["tables"][0]), *notes])
        README.write_text(replace_between(README.read_text(), PLAN_BEGIN, PLAN_END, body,
                                          append_heading="## Memory to train the 7B model"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced sizes and single repeats")
    parser.add_argument("--only", nargs="+", choices=tuple(SUITE), help="run these; keep the others' last results")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    JSON_FOLDER.mkdir(exist_ok=True)
    results = {}
    for name in SUITE:
        if args.only and name not in args.only:
            results[name] = load_result(name)
            continue
        results[name] = run_benchmark(name, args.quick, args.device)
    write_results({name: result for name, result in results.items() if result is not None}, args.quick)
    print(f"[run_all] wrote {RESULTS}", flush=True)


if __name__ == "__main__":
    main()
