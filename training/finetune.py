"""Stage `finetune` (seed 002, stage 2): LoRA on the LLM plus the projector, the segmentation head and optionally the
encoder; samples with masks add Dice + BCE. Saves the adapter (PEFT format) and the merged model, both loadable.
With `lora.enabled=false` the LLM trains fully and only the model is saved. `voxlm merge-lora`
(`training/merge_lora.py`) merges a saved adapter into its base later on.

    voxlm train finetune --config training/configs/finetune_phantoms.yaml init_from=runs/align/final
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from voxlm.model_cards import adapter_card_for_run, voxlm_card_for_run
from voxlm.training.merge_lora import merge_lora
from voxlm.training.mllm import MLLMSettings, add_stage_parser, stage_main, train_stage
from voxlm.training.trainable import prepare_finetune


def train(settings: MLLMSettings) -> Path:
    """Run the stage; return the folder holding `model/` (merged, loads with `AutoModel`) and, with LoRA, `adapter/`
    (PEFT)."""
    if settings.lora.enabled and not settings.init_from and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise ValueError("Under DeepSpeed ZeRO-3, LoRA fine-tuning starts from a saved model (init_from, e.g. the "
                         "align stage's output): the adapter is merged into that folder's weights, since the trained "
                         "model in memory holds only this process's shards of its own")
    model, processor, accelerator = train_stage(settings, lambda model: (prepare_finetune(model, settings.lora), []),
                                                "finetune")
    final = Path(settings.run.output_dir) / "final"
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathered across ZeRO-3 shards
    trained = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        if settings.lora.enabled:
            trained.save_pretrained(final / "adapter", state_dict=state_dict)
            adapter_card_for_run(settings, trained, processor, final / "adapter").save(final / "adapter" / "README.md")
            if settings.init_from:
                # From the saved files, as `voxlm merge-lora` does: under ZeRO-3 the model in memory is sharded.
                merged = merge_lora(settings.init_from, final / "adapter", final / "model")
            else:
                merged = trained.merge_and_unload()
                merged.save_pretrained(final / "model")
        else:
            merged = trained
            merged.save_pretrained(final / "model", state_dict=state_dict)
        processor.save_pretrained(final / "model")
        voxlm_card_for_run(settings, merged, processor, final / "model", "finetune").save(final / "model" / "README.md")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def add_parser(subparsers) -> None:
    add_stage_parser(subparsers, "finetune", "fine-tune with LoRA (and segmentation)",
                     "voxlm train finetune --config training/configs/finetune_phantoms.yaml init_from=runs/align/final",
                     train)


if __name__ == "__main__":
    stage_main("finetune", add_parser, sys.argv[1:])
