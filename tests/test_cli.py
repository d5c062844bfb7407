"""The `voxlm` command: the console script lists every command without importing torch, a command imports only the
module that registers it (and, through it, the package and its Auto class registration), and the table of commands
says what the modules register."""

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from voxlm import cli

LAUNCHER = Path(__file__).resolve().parents[1] / "launcher" / "voxlm_launcher.py"
HEAVY_MODULES = ("torch", "transformers", "voxlm")


def imported_modules(importtime_log: str) -> set[str]:
    """The modules that `python -X importtime` reported importing (its stderr)."""
    return {line.rsplit("|", 1)[-1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}


def subcommands(parser: argparse.ArgumentParser) -> tuple[dict[str, str], dict[str, argparse.ArgumentParser]]:
    """`({name: help line}, {name: parser})` of the sub-commands of `parser`."""
    action = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return {choice.dest: choice.help for choice in action._choices_actions}, action.choices


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["env"]])
def test_the_console_script_lists_commands_without_importing_torch(argv):
    result = subprocess.run([sys.executable, "-X", "importtime", str(LAUNCHER), *argv], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    heavy = {name for name in imported_modules(result.stderr) if name.split(".")[0] in HEAVY_MODULES}
    assert not heavy, sorted(heavy)
    if argv[0] == "--help":
        assert all(name in result.stdout for name in [*cli.COMMANDS, "train", "env"]), result.stdout
    elif argv[0] == "train":
        assert all(name in result.stdout for name in cli.TRAINING_STAGES), result.stdout
    else:
        assert "torch: " in result.stdout and "voxlm: " in result.stdout


def test_a_command_imports_its_module_and_registers_the_auto_classes():
    check = textwrap.dedent(
        f"""
        import runpy, sys
        sys.argv = ["voxlm", "predict", "--help"]
        try:
            runpy.run_path({str(LAUNCHER)!r}, run_name="__main__")
        except SystemExit as stop:
            assert stop.code == 0, stop.code
        from transformers import CONFIG_MAPPING
        assert "voxlm.commands.predict" in sys.modules
        assert not [name for name in sys.modules if name.startswith(("voxlm.training", "voxlm.evaluation"))]
        assert "voxlm" in CONFIG_MAPPING and "voxclip" in CONFIG_MAPPING  # what `import voxlm` registers
        """
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Example:\n  voxlm predict " in result.stdout


def test_the_tables_list_what_each_module_registers():
    help_lines, parsers = subcommands(cli.build_parser())  # every command, each registered by its module
    assert {name: line for name, line in help_lines.items() if name not in ("train", "env")} == {
        name: command.help for name, command in cli.COMMANDS.items()}
    assert subcommands(parsers["train"])[0] == {name: stage.help for name, stage in cli.TRAINING_STAGES.items()}


@pytest.mark.parametrize("argv", [["predict", "--help"], ["train", "finetune", "--help"], ["merge-lora", "--help"],
                                  ["data", "phantoms", "--help"], ["evaluate", "--help"], ["quickstart", "--help"]])
def test_each_command_answers_help_with_its_own_options(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: voxlm {' '.join(argv[:-1])} ") and "Example" in text


def test_an_unknown_command_lists_the_known_ones(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["predcit", "x.nii.gz"])
    assert stop.value.code == 2
    assert "invalid choice: 'predcit'" in capsys.readouterr().err
