"""The MLLM stages on phantoms: align then LoRA fine-tuning with segmentation, saved folders that load and generate,
merge-lora, a 2-process fine-tuning run, resuming fine-tuning, and SmolLM2 (a real LLM, loaded offline) with LoRA."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoProcessor

import voxlm  # noqa: F401
from voxlm.training import finetune
from voxlm.training.assemble import PretrainedParts, build_voxlm
from voxlm.training.merge_lora import merge_lora
from voxlm.training.mllm import lm_train_step
from voxlm.training.trainable import LoraSettings, apply_lora

from tiny_models import mllm_settings, run_mllm_stages

TINY_MODEL = [
    "pretrained.llm=tiny-llama",
    "model.vision_config={image_size: [8,32,32], patch_size: [2,8,8], hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
    "num_attention_heads: 4}",
    "model.seg_config={hidden_size: 32, num_attention_heads: 4, intermediate_size: 64}",
]


settings = mllm_settings


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("mllm")
    aligned, tuned = run_mllm_stages(root, TINY_MODEL, num_cases=10, finetune_pairs=("data.tasks={seg: 1.0}",))
    return root, aligned, tuned


def test_align_changes_only_the_projector_and_new_tokens(stages):
    root, aligned, _ = stages
    tiny = settings([*TINY_MODEL])
    before, _ = build_voxlm(tiny.pretrained, tiny.model, seed=0)
    after = AutoModel.from_pretrained(aligned)
    changed = {name for name, p in after.state_dict().items() if not torch.equal(p, before.state_dict()[name])}
    # The tiny Llama ties its output head to the input embeddings, so both names show the same rows.
    allowed = ("multi_modal_projector", "language_model.model.embed_tokens", "language_model.lm_head")
    assert any(n.startswith("multi_modal_projector") for n in changed)
    assert all(n.startswith(allowed) for n in changed), changed
    rows_changed = (after.get_input_embeddings().weight != before.get_input_embeddings().weight).any(dim=1)
    new_ids = {after.config.image_token_id, after.config.seg_token_id, after.config.box_start_token_id,
               after.config.box_end_token_id}
    assert set(rows_changed.nonzero().flatten().tolist()) <= new_ids


def test_finetuned_folder_loads_and_answers_with_masks(stages):
    _, _, tuned = stages
    model = AutoModel.from_pretrained(tuned / "model").eval()
    processor = AutoProcessor.from_pretrained(tuned / "model")
    assert (tuned / "adapter" / "adapter_config.json").is_file()
    adapter_card = (tuned / "adapter" / "README.md").read_text()
    assert "library_name: peft" in adapter_card and "r=4" in adapter_card and "## How to load" in adapter_card
    volume = torch.rand(16, 32, 32) * 80
    inputs = processor(images=[volume], text=["Segment the hemorrhage in this CT."])
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_masks=True)
    answers = processor.post_process_generation(output.sequences[:, inputs["input_ids"].shape[1] :])
    assert len(answers) == 1 and isinstance(answers[0]["text"], str)
    assert (output.masks[0] is not None) == answers[0]["has_seg"]


def test_merged_model_answers_as_the_adapter_on_its_base(stages, tmp_path):
    """The stage's merged model (merged from the saved files, as under ZeRO-3) and `voxlm merge-lora`'s give the
    logits of the adapter applied to its base with PEFT."""
    from peft import PeftModel

    root, aligned, tuned = stages
    merge_lora(aligned, tuned / "adapter", tmp_path / "merged")
    adapted = PeftModel.from_pretrained(AutoModel.from_pretrained(aligned), str(tuned / "adapter")).eval()
    processor = AutoProcessor.from_pretrained(tuned / "model")
    batch = processor(images=[torch.rand(16, 32, 32) * 80], text=["Is there a bleed?"], answers=["No."])
    # The tiny Llama ties its output head to the input embeddings. PEFT's trainable token rows change only the input
    # lookup before merging, and both after it (one shared matrix), so the logits of voxlm's added tokens differ by
    # design; every other column must agree.
    config = AutoModel.from_pretrained(aligned).config
    added = [config.image_token_id, config.seg_token_id, config.box_start_token_id, config.box_end_token_id]
    with torch.no_grad():
        expected = adapted(**batch).logits
        kept = torch.ones(expected.shape[-1], dtype=torch.bool)
        kept[added] = False
        for folder in (tuned / "model", tmp_path / "merged"):
            merged = AutoModel.from_pretrained(folder).eval()
            torch.testing.assert_close(merged(**batch).logits[..., kept], expected[..., kept], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(AutoModel.from_pretrained(aligned).eval()(**batch).logits, expected)  # it learnt


def test_lora_under_zero3_without_a_saved_base_is_refused_before_training(monkeypatch):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ValueError, match="ZeRO-3, LoRA fine-tuning starts from a saved model"):
        finetune.train(settings([*TINY_MODEL, "data.path=unused"]))


def test_full_finetune_trains_the_llm_not_the_encoder_and_saves_a_plain_model(stages, tmp_path):
    root, aligned, _ = stages
    tuned = finetune.train(settings([f"data.path={root / 'data'}", "run.batch_size=2", "run.tracker=null",
                                     "run.max_steps=2", f"init_from={aligned}", "lora.enabled=false",
                                     f"run.output_dir={tmp_path}"]))
    assert not (tuned / "adapter").exists()
    before, after = AutoModel.from_pretrained(aligned).state_dict(), AutoModel.from_pretrained(tuned / "model")
    changed = {name for name, p in after.state_dict().items() if not torch.equal(p, before[name])}
    # Every LLM weight moved (not only new token rows or LoRA deltas); the encoder stayed as it was.
    llm_weights = [name for name in before if name.startswith("language_model.model.layers.")]
    assert llm_weights and set(llm_weights) <= changed
    assert not any(name.startswith("vision_tower.") for name in changed)
    assert any(name.startswith("seg_head.") for name in changed)


def test_settings_read_exponent_floats_without_a_dot_as_numbers():
    run = settings(["run.learning_rate=3e-4", "run.module_learning_rates={vision_tower: 1e-5}"]).run
    assert run.learning_rate == 3e-4 and run.module_learning_rates == {"vision_tower": 1e-5}
    assert isinstance(run.module_learning_rates["vision_tower"], float)


def test_a_trained_encoder_at_learning_rate_zero_stays_while_the_rest_trains(stages, tmp_path):
    """`run.module_learning_rates` reaches the optimizer: the encoder trains (`lora.train_vision`) at its own rate,
    0 here, so it keeps its weights while the projector moves; the settings reach TensorBoard flattened."""
    root, aligned, _ = stages
    tuned = finetune.train(settings([f"data.path={root / 'data'}", "run.batch_size=2", "run.max_steps=2",
                                     f"init_from={aligned}", "lora.r=4", "lora.alpha=8", "lora.train_vision=true",
                                     "run.module_learning_rates={vision_tower: 0.0}", "run.tracker=tensorboard",
                                     f"run.output_dir={tmp_path}"]))
    before, after = AutoModel.from_pretrained(aligned).state_dict(), AutoModel.from_pretrained(tuned / "model")
    changed = {name for name, p in after.state_dict().items() if not torch.equal(p, before[name])}
    assert any(name.startswith("multi_modal_projector.") for name in changed)
    assert not any(name.startswith("vision_tower.") for name in changed), changed
    hparams = next(tmp_path.rglob("hparams.yml")).read_text()
    assert "module_learning_rates.vision_tower: 0.0" in hparams


def test_two_process_finetune_saves_a_checkpoint_that_loads(stages, tmp_path):
    root, aligned, _ = stages
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
               "voxlm.training.finetune", f"init_from={aligned}", f"data.path={root / 'data'}", "run.batch_size=1",
               "run.tracker=null", "run.max_steps=2", "lora.r=4", "lora.alpha=8", f"run.output_dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert type(AutoModel.from_pretrained(tmp_path / "final" / "model")).__name__ == "VoxLMForConditionalGeneration"


def test_resumed_finetune_continues_the_same_loss_curve(stages, tmp_path, monkeypatch):
    """A LoRA fine-tuning run with a task mix and segmentation, stopped after step 2 (its checkpoint at step 2 without
    the later one), resumes on the losses of the run that went straight through: model, optimizer, schedule, the
    mix's draws, the stream's position and the RNG of LoRA's dropout (on, at its default) all come back. The resumed
    run decodes only the rows it trains on: those before the checkpoint are skipped undecoded."""
    from voxlm.data import streaming

    root, aligned, _ = stages
    common = [f"init_from={aligned}", f"data.path={root / 'data'}", "run.batch_size=2", "run.tracker=null",
              "run.max_steps=4", "run.checkpoint_every=2", "lora.r=4", "lora.alpha=8",
              "data.tasks={vqa: 0.5, seg: 0.5}"]
    decoded = []
    preprocess_row = streaming.preprocess_row
    monkeypatch.setattr(streaming, "preprocess_row", lambda row, processor: decoded.append(row["id"]) or
                        preprocess_row(row, processor))
    finetune.train(settings([*common, f"run.output_dir={tmp_path / 'straight'}"]))
    straight_rows, decoded[:] = list(decoded), []
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "straight" / "checkpoints", stopped / "checkpoints")
    shutil.rmtree(stopped / "checkpoints" / "checkpoint_1")
    finetune.train(settings([*common, f"run.output_dir={stopped}", "run.resume=true"]))
    # The rows of steps 3 and 4 (2 per step) and no others: the straight run's last four.
    assert len(straight_rows) == 8 and decoded == straight_rows[4:], (decoded, straight_rows)

    def losses(folder):
        return {(record := json.loads(line))["step"]: record["loss"]
                for line in (folder / "finetune_history.jsonl").read_text().splitlines()}

    straight, after_resume = losses(tmp_path / "straight"), losses(stopped)
    assert sorted(after_resume) == [3, 4]
    for step, loss in after_resume.items():
        assert loss == pytest.approx(straight[step], abs=1e-6), step


def test_smollm2_offline_in_a_voxlm_trains_with_lora_and_generates():
    model, processor = build_voxlm(PretrainedParts(llm="smollm2"), dict(
        vision_config=dict(image_size=[8, 32, 32], patch_size=[2, 8, 8], hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=4),
    ))
    assert model.config.text_config.model_type == "llama" and model.config.text_config.hidden_size == 576
    model = apply_lora(model, LoraSettings(r=4, alpha=8))
    volume = torch.rand(16, 32, 32) * 80
    batch = dict(processor(images=[volume], text=["Is there a bleed?"], answers=["No."]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss, logs = lm_train_step(model, batch)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and "lm_loss" in logs
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n and p.grad is not None]
    assert lora_grads and any(g.abs().sum() > 0 for g in lora_grads)
    model.eval()
    inputs = processor(images=[volume], text=["Describe this head CT."])
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_text_config_resizes_the_random_llm_and_is_refused_for_other_backends():
    sized = settings([*TINY_MODEL, "model.text_config={hidden_size: 32, num_hidden_layers: 1}"])
    model, _ = build_voxlm(sized.pretrained, sized.model)
    assert model.config.text_config.hidden_size == 32 and model.config.text_config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="model.text_config is set by pretrained.llm='smollm2'.*tiny-llama only"):
        build_voxlm(PretrainedParts(llm="smollm2"), {"text_config": {"hidden_size": 32}})
