"""Output folders that never mix one run's or dataset's files with another's."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


def replace_or_refuse(folder: str | Path, owned: list[str], overwrite: bool, hint: str) -> None:
    """Delete what an earlier run or dataset left in `folder` (the entries named in `owned`) when `overwrite`, else
    refuse with a `ValueError` that names them and `hint` (how to go on). Other files in the folder are kept."""
    folder = Path(folder)
    existing = [folder / name for name in owned if (folder / name).exists() or (folder / name).is_symlink()]
    if not existing:
        return
    names = ", ".join(path.name for path in existing)
    if not overwrite:
        raise ValueError(f"{folder} already holds {names}; {hint}")
    logger.warning("Replacing %s in %s", names, folder)
    for path in existing:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
