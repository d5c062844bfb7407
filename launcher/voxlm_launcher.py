"""The `voxlm` console script: runs `voxlm/cli.py` without first importing the `voxlm` package.

Why a module outside the package: `import voxlm` imports torch and transformers and registers every voxlm class with
the transformers Auto classes, the promise that `import voxlm; AutoModel.from_pretrained(folder)` rests on. Python
runs a package's `__init__.py` before any module inside it, so a console script pointing at `voxlm.cli:main` paid
that import (about 10 s on 2 cores) before argparse saw `--help`. Making `__init__.py` lazy would break the promise;
moving the command table out here would leave `voxlm.cli` (`python -m voxlm.cli`, the tests) without it. So the
table stays in `voxlm/cli.py`, which imports only the standard library at module level, and this module, installed
beside the package (pyproject.toml's `py-modules`), locates the package without importing it (`find_spec` of a
top-level name does not run it) and executes `cli.py` as a module of its own. A listing of commands then costs an
interpreter start; a command that runs imports its own module inside `voxlm`, which imports the package, and its
registration, the usual way.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def main() -> int:
    package = importlib.util.find_spec("voxlm")
    if package is None:
        raise SystemExit(f"voxlm: the voxlm package is not installed for {sys.executable}")
    spec = importlib.util.spec_from_file_location("voxlm_cli", Path(package.submodule_search_locations[0]) / "cli.py")
    cli = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = cli  # as `import` does, for anything that looks the module up by name
    spec.loader.exec_module(cli)
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
