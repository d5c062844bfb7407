"""The benchmark suite's pieces that must be right without running it: the memory plan's parameter counting and
formula, the shared Markdown rendering, the runner's preservation of other sections, and the run loop's speed
settings (gradient checkpointing, `torch.compile`, bf16 frozen weights)."""

import importlib
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_text_config, tiny_vision_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def bench(monkeypatch):
    """Import a module of `benchmarks/` (they import each other as top-level modules, as scripts do)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


TINY_TEXT = {key: value for key, value in tiny_text_config().items() if key not in ("pad_token_id",)}
TINY_SEG = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64)


@pytest.mark.parametrize("train_encoder", [True, False])
def test_meta_parameter_count_equals_the_built_model(bench, train_encoder):
    plan = bench("memory_plan")
    setting = plan.TrainSetting("tiny", train_encoder=train_encoder)
    meta = plan.build_meta_model(TINY_TEXT, setting, tiny_vision_config(), TINY_SEG)
    counts = plan.count_parameters(meta)
    # the same classes and wrapping with real tensors on the CPU
    from voxlm.modeling import VoxLMConfig, VoxLMForConditionalGeneration
    from voxlm.training.trainable import LoraSettings, apply_lora

    vocab = TINY_TEXT["vocab_size"]
    config = VoxLMConfig(
        vision_config=tiny_vision_config(), text_config={**TINY_TEXT, "vocab_size": vocab + plan.NEW_TOKENS},
        seg_config=TINY_SEG, image_token_id=vocab, box_start_token_id=vocab + 1, box_end_token_id=vocab + 2,
        seg_token_id=vocab + 3,
    )
    real = apply_lora(VoxLMForConditionalGeneration(config),
                      LoraSettings(r=16, alpha=32, dropout=0.05, train_vision=train_encoder))
    assert counts["total"] == sum(p.numel() for p in real.parameters())
    assert counts["trained"] == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_llama2_7b_counts_match_the_known_numbers(bench):
    plan = bench("memory_plan")
    model = plan.build_meta_model(plan.LLAMA2_7B, plan.TrainSetting("7b"))
    named = dict(model.named_parameters())
    lora = sum(p.numel() for name, p in named.items() if "lora_" in name)
    # 32 layers x r=16 x (in + out) of q, k, v, o (4096 + 4096), gate, up (4096 + 11008) and down (11008 + 4096)
    assert lora == 32 * 16 * (4 * 8192 + 3 * 15104) == 39_976_960
    base = sum(p.numel() for name, p in named.items()
               if "language_model" in name and "lora_" not in name and "trainable_tokens" not in name)
    assert base == 6_738_415_616 + 2 * plan.NEW_TOKENS * 4096  # Llama-2-7B, embeddings and lm_head grown by 4 rows


def test_llm_activation_formula_known_values(bench):
    plan = bench("memory_plan")
    text = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=10)
    setting = plan.TrainSetting("x", compute="bf16", checkpointing=False, lora_dropout=0.1)
    # per layer: norms 2 (4 + 2) 8 = 96, attention 2 (16 + 16) = 64, o_proj copy 16, MLP 4 * 2 * 16 = 128,
    # LoRA dropout 3 (48 + 16) = 192 -> 496; once: 16 + 48 + 10 (vocab 10 + 4 tokens) -> 16 + 48 + 140 = 204
    assert plan.llm_activation_bytes(text, 3, setting) == 3 * (2 * 496 + 204)
    checkpointed = replace(setting, checkpointing=True)
    assert plan.llm_activation_bytes(text, 3, checkpointed) == 3 * (2 * 2 * 8 + 496 + 204)
    assert plan.llm_activation_bytes(text, 3, replace(setting, lora_dropout=0.0)) == 3 * (2 * (496 - 192) + 204)


@pytest.mark.parametrize(
    "smaller, larger",
    [
        (dict(checkpointing=True), dict(checkpointing=False)),
        (dict(micro_batch=1), dict(micro_batch=2)),
        (dict(text_tokens=128), dict(text_tokens=512)),
        (dict(train_encoder=False), dict(train_encoder=True)),
        (dict(compute="bf16", frozen_dtype="bf16"), dict(compute="fp32", frozen_dtype="fp32")),
        (dict(frozen_dtype="nf4"), dict(frozen_dtype="bf16")),
    ],
)
def test_plan_total_grows_with_each_knob(bench, smaller, larger):
    plan = bench("memory_plan")
    base = plan.TrainSetting("tiny")
    small = plan.plan(replace(base, **smaller), TINY_TEXT, tiny_vision_config(), TINY_SEG)["bytes"]["total"]
    large = plan.plan(replace(base, **larger), TINY_TEXT, tiny_vision_config(), TINY_SEG)["bytes"]["total"]
    assert small < large


def test_shipped_7b_setting_fits_24_gb(bench):
    plan = bench("memory_plan")
    shipped = next(s for s in plan.SEED_002_SETTINGS if "shipped" in s.name)
    assert plan.plan(shipped)["bytes"]["total"] / plan.GIB + plan.OVERHEAD_GIB < 23.5
    default = plan.SEED_002_SETTINGS[0]
    assert plan.plan(default)["bytes"]["total"] / plan.GIB > 24


def test_render_and_flags(bench):
    common = bench("common")
    table = common.markdown_table(["a", "b"], [["x", 1.234], ["y", None]])
    assert table.splitlines() == ["| a | b |", "| --- | --- |", "| x | 1.23 |", "| y | - |"]
    assert common.without_flags(["--repeats", "2", "--json-out", "f.json", "--device=cuda", "--x"]) == [
        "--repeats", "2", "--x"]
    section = common.render(dict(title="T", command="python benchmarks/b.py", description="D", notes=["N"],
                                 tables=[dict(caption="C", columns=["a"], rows=[["1"]])]))
    assert section.startswith("## T (`python benchmarks/b.py`)") and "C\n\n| a |" in section and section.endswith("N")


def test_runner_rewrites_only_its_own_part(bench, tmp_path, monkeypatch):
    run_all = bench("run_all")
    common = bench("common")
    results, readme = tmp_path / "RESULTS.md", tmp_path / "README.md"
    results.write_text("# Benchmark results\n\n## The quickstart\n\nkept\n")
    readme.write_text("# voxlm\n\nintro\n")
    monkeypatch.setattr(run_all, "RESULTS", results)
    monkeypatch.setattr(run_all, "README", readme)
    machine = common.machine_info()
    result = dict(name="preprocessing", title="Preprocessing", command="python benchmarks/bench_preprocessing.py",
                  tables=[dict(columns=["a"], rows=[["1"]])], figures={"speedup": 3.0, "max_abs_difference": 0.0},
                  machine=machine)
    plan = dict(name="memory_plan", title="Plan", command="c", description="plan text",
                tables=[dict(columns=["configuration"], rows=[["x"]])], notes=[], machine=machine)
    for _ in range(2):  # idempotent: a second run replaces, never duplicates
        run_all.write_results({"preprocessing": result, "memory_plan": plan}, quick=True)
    text = results.read_text()
    assert text.count(run_all.BEGIN) == 1 and text.count("## Preprocessing") == 1
    assert text.endswith("## The quickstart\n\nkept\n")
    assert "| preprocessing vs MONAI Compose | 2x, equal output | 3.00x" in text
    readme_text = readme.read_text()
    assert readme_text.startswith("# voxlm\n\nintro\n") and readme_text.count("## Memory to train the 7B model") == 1
    assert "plan text" in readme_text


def test_hlip_flop_count_and_verdict(bench):
    bench_hlip, run_all = bench("bench_hlip"), bench("run_all")
    args = bench_hlip.parse_args(["--image-size", "8", "32", "32", "--hidden-size", "32", "--heads", "2",
                                  "--layers", "3"])

    def flops(schedule, scans):
        return bench_hlip.flop_counts(bench_hlip.build_config(schedule, args), scans)

    tokens, width = 1 + 2 * 2 * 2, 32  # (8, 32, 32) in (4, 16, 16) patches, plus CLS
    assert flops("scan", 1) == flops("study", 1)  # one scan: the levels coincide
    assert flops("scan", 8)[0] == 8 * flops("scan", 1)[0] == 8 * 3 * 4 * tokens**2 * width
    assert flops("study", 8)[0] == 64 * flops("study", 1)[0]
    assert flops("study", 8)[1] == flops("scan", 8)[1] == 8 * flops("scan", 1)[1]  # MLP work is per token
    # scan_study on 3 blocks: two scan blocks and one study block
    assert flops("scan_study", 8)[0] == (2 * 8 + 64) * 4 * tokens**2 * width
    near = {"scan_study": {"time": 9.0, "flops": 9.9}, "study": {"time": 11.0, "flops": 13.6}}
    far = {"scan_study": {"time": 12.0, "flops": 12.0}, "study": {"time": 13.0, "flops": 13.6}}
    assert run_all.hlip_target(near, 8)[-1].startswith("yes") and run_all.hlip_target(far, 8)[-1] == "no"
    assert run_all.hlip_target({}, None)[-1] == "not measured"


def test_speed_settings_checkpoint_and_compile_in_place(monkeypatch):
    from voxlm.modeling import VoxViTModel
    from voxlm.training.loop import apply_speed_settings
    from voxlm.training.settings import RunSettings

    model = VoxViTModel(tiny_vision_config())
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    apply_speed_settings(model, RunSettings(gradient_checkpointing=True, compile=True))
    assert all(block.gradient_checkpointing for block in model.blocks)
    assert compiled == [model]


def test_frozen_weights_in_bf16_train_under_autocast():
    from voxlm.modeling import VoxLMForConditionalGeneration
    from voxlm.training.trainable import LoraSettings, apply_lora
    from tiny_models import IMAGE_TOKEN_ID, SEG_TOKEN_ID, tiny_voxlm_config

    torch.manual_seed(0)
    model = apply_lora(VoxLMForConditionalGeneration(tiny_voxlm_config()),
                       LoraSettings(train_vision=True, frozen_dtype="bf16"))
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    ids = torch.tensor([[1] + [IMAGE_TOKEN_ID] * model.config.num_image_tokens + [10, 11, SEG_TOKEN_ID, 12]])
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, pixel_values=torch.rand(1, 1, 8, 16, 16),
                     seg_masks=(torch.rand(1, 1, 8, 16, 16) > 0.5).float(), has_mask=torch.tensor([True])).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="frozen_dtype"):
        apply_lora(VoxLMForConditionalGeneration(tiny_voxlm_config()), LoraSettings(frozen_dtype="int3"))


@pytest.mark.slow
def test_compile_trains_on_cpu(tmp_path):
    """`run.compile` with the real inductor backend (about a minute of compilation on a CPU)."""
    from voxlm.modeling import VoxViTModel
    from voxlm.training.loop import run_training
    from voxlm.training.settings import RunSettings

    model = VoxViTModel(tiny_vision_config())
    batches = [{"pixel_values": torch.rand(2, 1, 8, 16, 16)} for _ in range(3)]
    settings = RunSettings(output_dir=str(tmp_path), max_steps=3, batch_size=2, tracker=None, compile=True,
                           gradient_checkpointing=True)
    model, history, accelerator = run_training(
        model, lambda epoch, skip_rows: batches, lambda m, b: (m(b["pixel_values"]).last_hidden_state.square().mean(), {}),
        settings)
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    assert type(accelerator.unwrap_model(model)) is VoxViTModel
    assert os.path.exists(tmp_path / "train_history.jsonl")
