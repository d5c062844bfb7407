"""Command-line start-up: how long `voxlm --help` and a few other commands take, before and after the console script
stopped importing the package.

Each command runs as a fresh process, the way a shell runs it. `before` is the tree of `--before` (default d072748,
the last commit whose console script was `voxlm.cli:main`, which imports torch, transformers and every command module
before argparse reads `--help`); `after` is this working tree, run through `launcher/voxlm_launcher.py`, which the
`voxlm` console script calls. `import voxlm` is the floor that any console script inside the package pays. Both trees
are copied into a temporary folder first, so the first run of each command is cold for voxlm's own files (no bytecode
compiled yet, as after a fresh checkout or editable install; torch and the other libraries keep theirs); the warm
figure is the median of `--repeats` runs after it.

Usage: python benchmarks/bench_cli.py [--repeats 5] [--before d072748] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

REPOSITORY = common.BENCHMARKS.parent
OLD_CONSOLE_SCRIPT = "import sys; from voxlm.cli import main; sys.argv[0] = 'voxlm'; sys.exit(main(sys.argv[1:]))"


def before_tree(revision: str, folder: Path) -> Path:
    """`folder/voxlm`: the repository (the `voxlm` package) at `revision`."""
    archive = subprocess.run(["git", "-C", str(REPOSITORY), "archive", revision], capture_output=True, check=True)
    (folder / "voxlm").mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(folder / "voxlm")], input=archive.stdout, check=True)
    return folder


def after_tree(folder: Path) -> Path:
    """`folder/voxlm`: a copy of this working tree's package, without compiled bytecode."""
    shutil.copytree(REPOSITORY, folder / "voxlm",
                    ignore=shutil.ignore_patterns("__pycache__", ".git", "tests", "benchmarks", "spaces", "build"))
    return folder


def timed_runs(command: list[str], path: Path, repeats: int) -> tuple[float, float]:
    """`(first, warm)`: seconds of the first run of `command` with `path` first on `PYTHONPATH`, and the median of
    `repeats` runs after it."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")])),
                   "HF_HUB_OFFLINE": "1"}
    times = []
    for _ in range(1 + repeats):
        start = time.perf_counter()
        subprocess.run(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def machine_note(machine: dict) -> str:
    """Where and when the section was measured (`common.machine_info`), for its own line in `RESULTS.md`."""
    return (f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['versions']['python']}, torch "
            f"{machine['versions']['torch']}; {machine['date']}. Before and after measured side by side in this run.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="warm runs after the first; the median counts")
    parser.add_argument("--before", default="d072748", help="the revision to compare with (a voxlm.cli:main script)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the result as JSON here")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    forwarded = list(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as scratch:
        before = before_tree(args.before, Path(scratch) / "before")
        after = after_tree(Path(scratch) / "after")
        launcher = [sys.executable, str(after / "voxlm" / "launcher" / "voxlm_launcher.py")]
        cases = [
            (f"before ({args.before}): voxlm --help", [sys.executable, "-c", OLD_CONSOLE_SCRIPT, "--help"], before),
            ("after: import voxlm (any script inside the package)", [sys.executable, "-c", "import voxlm"], after),
            ("after: voxlm --help", [*launcher, "--help"], after),
            ("after: voxlm train --help", [*launcher, "train", "--help"], after),
            ("after: voxlm env", [*launcher, "env"], after),
            ("after: voxlm predict --help", [*launcher, "predict", "--help"], after),
        ]
        measured = {name: timed_runs(command, path, args.repeats) for name, command, path in cases}
    before_help, after_help = measured[cases[0][0]][1], measured[cases[2][0]][1]
    result = dict(
        name="cli",
        title="Command-line start-up",
        command=common.command_line("bench_cli.py", forwarded),
        description=common.doc_description(__doc__),
        tables=[dict(
            caption=f"Seconds per command, each a fresh process; warm: median of {args.repeats} runs after the first",
            columns=["command", "first run (cold) s", "warm s", "warm, before / this"],
            rows=[[name, first, warm, common.fmt(common.ratio(before_help, warm), 1, "x")]
                  for name, (first, warm) in measured.items()],
        )],
        figures={"help_before_s": before_help, "help_after_s": after_help,
                 "help_speedup": common.ratio(before_help, after_help)},
        notes=[machine_note(common.machine_info())],
    )
    common.emit(result, args.json_out)


if __name__ == "__main__":
    main()
