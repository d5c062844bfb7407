"""The training loop's optimizer step under gradient accumulation: every labelled token of a step weighs the same,
however the answers fall into micro-batches."""

import copy

import torch

from voxlm.training.assemble import PretrainedParts, build_voxlm
from voxlm.training.loop import run_training
from voxlm.training.mllm import lm_train_step
from voxlm.training.settings import RunSettings

TINY_VISION = dict(image_size=[8, 32, 32], patch_size=[2, 8, 8], hidden_size=32, intermediate_size=64,
                   num_hidden_layers=1, num_attention_heads=4)
QUESTIONS = ["Is there a hemorrhage?", "Describe the findings.", "Is the midline shifted?", "Any fracture?"]
# Answers of very different lengths: averaging per micro-batch would give the one-word answers 10x the weight.
ANSWERS = ["No.", "A large acute epidural hematoma over the right convexity with mass effect and a midline shift of "
           "six millimetres toward the left, and a nondisplaced fracture of the right temporal bone.", "Yes.", "No."]


def one_step(model, batches: list[dict], accumulation: int, output_dir) -> dict[str, torch.Tensor]:
    """The parameters after one optimizer step over `batches` (the step's micro-batches)."""
    settings = RunSettings(output_dir=str(output_dir), max_steps=1, gradient_accumulation_steps=accumulation,
                           learning_rate=1.0, weight_decay=0.0, max_grad_norm=0.0, tracker=None)
    trained, _, accelerator = run_training(copy.deepcopy(model), lambda epoch, skip_rows: [dict(b) for b in batches],
                                           lm_train_step, settings, stage="step")
    return {name: p.detach().clone() for name, p in accelerator.unwrap_model(trained).named_parameters()}


def test_accumulating_four_micro_batches_equals_one_step_over_their_concatenation(tmp_path, monkeypatch):
    model, processor = build_voxlm(PretrainedParts(llm="tiny-llama"), {"vision_config": TINY_VISION}, seed=0)
    torch.manual_seed(1)
    volumes = [torch.rand(16, 32, 32) * 80 for _ in QUESTIONS]
    singles = [dict(processor(images=[volume], text=[question], answers=[answer]))
               for volume, question, answer in zip(volumes, QUESTIONS, ANSWERS)]
    together = dict(processor(images=volumes, text=QUESTIONS, answers=ANSWERS))
    lengths = [int((batch["labels"] != -100).sum()) for batch in singles]
    assert max(lengths) > 10 * min(lengths), lengths
    # SGD makes the update the gradient itself (Adam's first step is only its sign, blind to how tokens are weighed).
    monkeypatch.setattr(torch.optim, "AdamW", torch.optim.SGD)
    accumulated = one_step(model, singles, 4, tmp_path / "accumulated")
    concatenated = one_step(model, [together], 1, tmp_path / "concatenated")
    initial = dict(model.named_parameters())
    moved = {name for name, p in concatenated.items() if not torch.equal(p, initial[name])}
    assert {"multi_modal_projector.linear_1.weight", "language_model.model.embed_tokens.weight"} <= moved
    for name in concatenated:
        torch.testing.assert_close(accumulated[name], concatenated[name], rtol=1e-4, atol=1e-6, msg=name)
