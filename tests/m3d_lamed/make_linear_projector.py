"""Writes `linear_projector.safetensors`: M3D's own `linear` projector (`FullLinear`), random weights at the tiny
test width, with an input and the output M3D's module gives for it.

    python tests/m3d_lamed/make_linear_projector.py --m3d M3D_GIT

M3D_GIT is a git directory of BAAI-DCAI/M3D (e.g. `/work/.mirror/BAAI-DCAI+M3D/repo`); its
`LaMed/src/model/multimodal_projector/` files are read from HEAD (the commit is saved in the file's metadata) into a
temporary package and run unchanged. The weights are saved under the keys a LaMed checkpoint holds them
(`model.mm_projector.*`).
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

HERE = Path(__file__).parent
WIDTH = 32  # tests/tiny_models.py: the tiny VoxViT and the tiny LLM are both 32 wide
TOKENS = 64  # the tiny volume's patch grid, 4 x 4 x 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m3d", required=True, help="git directory of BAAI-DCAI/M3D")
    args = parser.parse_args()
    git = ["git", f"--git-dir={args.m3d}"]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as scratch:
        package = Path(scratch) / "m3d_projector"
        package.mkdir()
        (package / "__init__.py").write_text("")
        for name in ("builder.py", "spatial_pooling_projector.py"):
            source = subprocess.run([*git, "show", f"HEAD:LaMed/src/model/multimodal_projector/{name}"],
                                    check=True, capture_output=True).stdout
            (package / name).write_bytes(source)
        sys.path.insert(0, scratch)
        builder = importlib.import_module("m3d_projector.builder")
        torch.manual_seed(0)
        projector = builder.build_mm_projector(
            SimpleNamespace(mm_projector_type="linear", mm_hidden_size=WIDTH, hidden_size=WIDTH)).eval()
        features = torch.randn(1, TOKENS, WIDTH)
        with torch.no_grad():
            output = projector(features)
    tensors = {f"model.mm_projector.{key}": value for key, value in projector.state_dict().items()}
    tensors.update({"input": features, "output": output})
    save_file(tensors, HERE / "linear_projector.safetensors",
              metadata={"made_by": "tests/m3d_lamed/make_linear_projector.py", "BAAI-DCAI/M3D": commit})


if __name__ == "__main__":
    main()
