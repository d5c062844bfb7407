"""Stage `align` (seed 002, stage 1): train the projector and the new token embeddings; encoder and LLM frozen.

    voxlm train align --config training/configs/align_phantoms.yaml
    accelerate launch --config_file training/configs/accelerate/multi_gpu_ddp.yaml \
        -m voxlm.training.pretrain_projector --config ...
"""

from __future__ import annotations

import sys
from pathlib import Path

from voxlm.model_cards import voxlm_card_for_run
from voxlm.training.loop import save_final
from voxlm.training.mllm import MLLMSettings, add_stage_parser, stage_main, train_stage
from voxlm.training.trainable import freeze_for_align


def prepare_for_align(model):
    """The model with only the projector and the new token rows trainable, and the embedding matrix that must not
    decay."""
    return model, freeze_for_align(model)


def train(settings: MLLMSettings) -> Path:
    """Run the stage; return the folder of the aligned model (weights, code, processor)."""
    model, processor, accelerator = train_stage(settings, prepare_for_align, stage="align")
    final = save_final(model, accelerator, Path(settings.run.output_dir) / "final", processor)
    if accelerator.is_main_process:
        card = voxlm_card_for_run(settings, accelerator.unwrap_model(model), processor, final, "align")
        card.save(final / "README.md")
    return final


def add_parser(subparsers) -> None:
    add_stage_parser(subparsers, "align", "align the projector and new tokens (encoder and LLM frozen)",
                     "voxlm train align --config training/configs/align_phantoms.yaml data.path=data/phantoms", train)


if __name__ == "__main__":
    stage_main("align", add_parser, sys.argv[1:])
