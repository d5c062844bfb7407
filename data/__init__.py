"""Data: the head-CT phantom generator, voxlm's Hub dataset format, streaming and collators."""

from .collators import ContrastiveCollator, InstructionCollator
from .hub_format import CONFIGS, decode_array, encode_array, write_dataset
from .phantom_dataset import write_phantom_dataset
from .phantoms import FINDING_TYPES, HEMORRHAGE_TYPES, PhantomCase, generate_case
from .streaming import PreprocessedStream, preprocess_row, stream_rows

__all__ = [
    "CONFIGS",
    "FINDING_TYPES",
    "HEMORRHAGE_TYPES",
    "ContrastiveCollator",
    "InstructionCollator",
    "PhantomCase",
    "PreprocessedStream",
    "decode_array",
    "encode_array",
    "generate_case",
    "preprocess_row",
    "stream_rows",
    "write_dataset",
    "write_phantom_dataset",
]
