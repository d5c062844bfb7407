"""Resumable checkpoints that hold no pickles voxlm would have to trust, and resumption that survives a broken one.

A checkpoint is Accelerate's `save_state` folder (`checkpoints/checkpoint_<n>`: the model as safetensors, the optimizer
and schedule as torch tensor files, which Accelerate reads with `weights_only=True`) with two changes:

- the random states are JSON (`rng_state_<rank>.json`) instead of Accelerate's pickled `random_states_<rank>.pkl`;
- `data_position_<rank>.json` says where each process is in its training stream (the loop's `DataPosition`), so a
  resumed run skips the rows already trained on without decoding them;
- `voxlm_state.json` holds the optimizer step and is written last, once every process has saved, so a folder without
  it is a save that was interrupted.

Resuming refuses any `.pkl` file in a checkpoint (voxlm writes none, and Accelerate would unpickle some of them),
skips incomplete folders, and falls back from a checkpoint that cannot be loaded (a truncated file, a planted pickle)
to the previous one.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)

STATE_FILE = "voxlm_state.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)$")


class CheckpointError(ValueError):
    """No checkpoint of a run can be resumed from; the message names each one and why."""


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The `checkpoint_<n>` folders of a run, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(match[1]), path) for path in folder.iterdir() if (match := CHECKPOINT_PATTERN.match(path.name))]
    return [path for _, path in sorted(found)]


def rng_state() -> dict:
    """Python's, numpy's and torch's random states as JSON-ready lists."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(accelerator: Accelerator, step: int, data_position: dict) -> Path:
    """Save a resumable checkpoint of the prepared objects at optimizer step `step`, with this process's position in
    its data (a JSON-ready dict); returns its folder."""
    folder = Path(accelerator.save_state())
    rank = accelerator.process_index
    (folder / f"random_states_{rank}.pkl").unlink(missing_ok=True)
    (folder / f"rng_state_{rank}.json").write_text(json.dumps(rng_state()))
    (folder / f"data_position_{rank}.json").write_text(json.dumps(data_position))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / STATE_FILE).write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()
    return folder


def _load(accelerator: Accelerator, folder: Path) -> tuple[int, dict]:
    pickles = sorted(path.name for path in folder.glob("*.pkl"))
    if pickles:
        raise CheckpointError(f"it holds {', '.join(pickles)}: pickles, which voxlm never writes and never loads")
    try:
        step = int(json.loads((folder / STATE_FILE).read_text())["step"])
        rng = json.loads((folder / f"rng_state_{accelerator.process_index}.json").read_text())
        data_position = json.loads((folder / f"data_position_{accelerator.process_index}.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"its {STATE_FILE}, random state or data position cannot be read ({error})") from error
    try:
        accelerator.load_state(str(folder))
    except pickle.UnpicklingError as error:
        raise CheckpointError("a tensor file holds other Python objects, refused by torch's weights-only loader "
                              "(nothing of it ran)") from error
    except Exception as error:  # safetensors, a missing file and shape checks raise many types
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{type(error).__name__}: {first_line}") from error
    set_rng_state(rng)
    return step, data_position


def resume(accelerator: Accelerator, output_dir: str | Path) -> tuple[int, dict | None]:
    """Load the newest checkpoint of `output_dir` that loads, falling back over broken ones; returns its step and this
    process's data position (`(0, None)` when the run has no checkpoint yet). New checkpoints are numbered after every
    existing folder, so none is overwritten.

    Raises:
        `CheckpointError`: checkpoints exist but none can be loaded.
    """
    folders = checkpoint_folders(output_dir)
    if not folders:
        return 0, None
    accelerator.project_configuration.iteration = int(CHECKPOINT_PATTERN.match(folders[-1].name)[1]) + 1
    problems = []
    for folder in reversed(folders):
        if not (folder / STATE_FILE).is_file():
            problems.append(f"{folder.name}: incomplete (its save was interrupted)")
            continue
        try:
            step, data_position = _load(accelerator, folder)
        except CheckpointError as error:
            problems.append(f"{folder.name}: {error}")
            logger.warning("Cannot resume from %s: %s; trying an older checkpoint", folder, error)
            continue
        logger.info("Resumed from %s at step %d", folder, step)
        return step, data_position
    raise CheckpointError(f"{output_dir}: no checkpoint can be resumed from: {'; '.join(problems)}")
