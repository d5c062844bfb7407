"""`pip install .` (not editable) gives the same `voxlm` namespace and a `voxlm` console script, and the Auto classes
load a saved VoxLM."""

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from tiny_models import tiny_voxlm_config

from voxlm.modeling import VoxLMForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent(
    """
    import sys, torch, voxlm
    from transformers import AutoConfig, AutoModel
    assert voxlm.__file__.startswith(sys.argv[2]), voxlm.__file__
    import voxlm.modeling, voxlm.processing, voxlm.training
    config = AutoConfig.from_pretrained(sys.argv[1])
    model = AutoModel.from_pretrained(sys.argv[1])
    assert type(config).__module__ == "voxlm.modeling.configuration_voxlm", type(config).__module__
    assert type(model).__name__ == "VoxLMForConditionalGeneration"
    print(model.config.num_image_tokens)
    """
)


def test_plain_pip_install_gives_the_voxlm_namespace(tmp_path):
    torch.manual_seed(0)
    VoxLMForConditionalGeneration(tiny_voxlm_config()).save_pretrained(tmp_path / "model")
    venv = tmp_path / "venv"
    # System site-packages provide torch, pip and setuptools; voxlm itself is installed into the venv, non-editable.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    result = subprocess.run(
        [str(python), str(script), str(tmp_path / "model"), site],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "8"
    # The console script (a top-level module beside the package) lists the commands without importing torch.
    listing = subprocess.run(
        [str(python), "-X", "importtime", str(venv / "bin" / "voxlm"), "--help"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"},
    )
    assert listing.returncode == 0, listing.stderr[-3000:]
    assert "predict" in listing.stdout and "merge-lora" in listing.stdout
    assert not [line for line in listing.stderr.splitlines() if line.rstrip().endswith(("| torch", "| voxlm"))]


def test_voxlm_env_prints_the_installed_releases(capsys):
    """`voxlm env` (the README's first step when a release breaks something) reports what is installed."""
    import importlib.metadata
    import platform

    from voxlm.cli import main

    assert main(["env"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["python"].startswith(platform.python_version())
    for package in ("torch", "transformers", "accelerate", "datasets", "peft", "voxlm"):
        assert lines[package] == importlib.metadata.version(package), package
