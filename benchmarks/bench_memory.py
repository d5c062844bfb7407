"""Peak memory and time of a VoxLM training step at the paper size, with and without gradient checkpointing, beside the
memory plan's formula (`memory_plan.py`) for the same configuration.

The step is seed 002's fine-tuning step on one sample: ViT-B encoder at 32 x 256 x 256 trained fully, `spp` projector,
SmolLM2-135M (the LLM this machine can run; the 7B plan uses the same formula) with LoRA r=16 on all its linear
layers, the segmentation head with a `[SEG]` answer and a mask, 512 LLM tokens (256 image + 256 text), AdamW. Each
configuration runs in a fresh process: a warm-up step creates the optimizer state, then `--repeats` timed steps.
Memory: on the CPU the resident set (RSS) before the timed steps and its peak during them (Linux `clear_refs`); on a GPU
`torch.cuda.memory_allocated` and `max_memory_allocated`.

Usage: python benchmarks/bench_memory.py [--repeats 2] [--configs fp32 fp32_ckpt bf16_ckpt] [--device cuda]
       [--json-out FILE]
"""

from __future__ import annotations

import argparse
import sys

import common
import memory_plan

# name -> (compute dtype, frozen dtype, gradient checkpointing)
CONFIGS = {
    "fp32": ("fp32", "fp32", False),
    "fp32_ckpt": ("fp32", "fp32", True),
    "bf16": ("bf16", "bf16", False),
    "bf16_ckpt": ("bf16", "bf16", True),
}
TEXT_TOKENS = 256


def build(compute: str, frozen: str, checkpointing: bool, device: str):
    """The LoRA-wrapped paper-size VoxLM, its optimizer and one training batch."""
    import torch

    from voxlm.training.assemble import PretrainedParts, build_voxlm
    from voxlm.training.trainable import LoraSettings, apply_lora

    model, _ = build_voxlm(PretrainedParts(llm="smollm2"), {"seg_config": {}})
    config = model.config
    model = apply_lora(model, LoraSettings(r=16, alpha=32, dropout=0.05, train_vision=True,
                                           frozen_dtype=None if frozen == "fp32" else frozen))
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(100, 1000, (TEXT_TOKENS,), generator=generator)
    text[-2] = config.seg_token_id
    input_ids = torch.cat([torch.tensor([1]), torch.full((config.num_image_tokens,), config.image_token_id), text[1:]])
    batch = dict(
        input_ids=input_ids[None], labels=input_ids[None].clone(),
        pixel_values=torch.rand(1, 1, *config.vision_config.image_size, generator=generator),
        seg_masks=(torch.rand(1, 1, *config.vision_config.image_size, generator=generator) > 0.5).float(),
        has_mask=torch.tensor([True]),
    )
    return model, optimizer, {key: value.to(device) for key, value in batch.items()}


def allocate_adamw_state(optimizer) -> None:
    """Create AdamW's moments now, as its first `step` would, so the first step's peak holds activations and
    gradients only."""
    import torch

    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state[parameter]
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)


def measure(name: str, args) -> dict:
    """Run in a fresh process: the memory of model + optimizer state, the first step's peak above it, and the
    median time of the steps after it."""
    import torch

    compute, frozen, checkpointing = CONFIGS[name]
    device = args.device
    on_gpu = device.startswith("cuda")
    process_start = 0.0 if on_gpu else common.current_rss_gb()
    model, optimizer, batch = build(compute, frozen, checkpointing, device)
    allocate_adamw_state(optimizer)
    device_type = "cuda" if on_gpu else "cpu"

    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=compute == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    before = torch.cuda.memory_allocated() / 2**30 if on_gpu else common.current_rss_gb()
    common.reset_peak_memory(device)
    step()
    peak = common.peak_memory_gb(device)
    seconds = common.median_time(step, args.repeats, device, warmup=0)
    return {"seconds": seconds, "static_gb": before - process_start, "before_gb": before, "peak_gb": peak,
            "step_gb": peak - before}


def predicted(name: str, text_config: dict) -> dict:
    """The memory plan's parts (GiB) for the measured configuration."""
    from voxlm.modeling import VoxViTConfig

    compute, frozen, checkpointing = CONFIGS[name]
    setting = memory_plan.TrainSetting(name, frozen_dtype=frozen, compute=compute, checkpointing=checkpointing,
                                       text_tokens=TEXT_TOKENS - 1)
    entry = memory_plan.plan(setting, text_config=text_config, vision_config=VoxViTConfig())
    return {key: value / 2**30 for key, value in entry["bytes"].items()}


def smollm2_text_config() -> dict:
    """SmolLM2-135M's config as the plan takes it (vocabulary before voxlm's tokens)."""
    from voxlm.training.backends import load_smollm2, load_smollm2_tokenizer

    config = load_smollm2().config.to_dict()
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps")
    values = {key: config[key] for key in keys}
    values["vocab_size"] = len(load_smollm2_tokenizer())
    return values


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, repeats=2)
    parser.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=["fp32", "fp32_ckpt", "bf16_ckpt"])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = common.resolve_device(args.device)
    if args.measure:
        common.print_worker_result(measure(args.measure, args))
        return
    # Freed blocks of 128 KiB or more go back to the system at once, so the resident set follows the live tensors.
    env = {} if args.device.startswith("cuda") else {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    results = {name: common.run_worker(__file__, ["--repeats", str(args.repeats), "--device", args.device,
                                                  "--measure", name], env=env) for name in args.configs}
    text_config = smollm2_text_config()
    on_gpu = args.device.startswith("cuda")
    rows, cross_rows, figures = [], [], {}
    for name in args.configs:
        measured, formula = results[name], predicted(name, text_config)
        rows.append([name, common.fmt(measured["seconds"]), common.fmt(measured["before_gb"]),
                     common.fmt(measured["peak_gb"]), common.fmt(measured["step_gb"])])
        static_formula = formula["parameters"] + formula["optimizer"]
        step_formula = formula["activations"] + formula["gradients"]
        cross_rows.append([name, common.fmt(static_formula), common.fmt(measured["static_gb"]),
                           common.fmt(step_formula), common.fmt(measured["step_gb"]),
                           common.fmt(measured["step_gb"] / step_formula, suffix="x")])
        figures[name] = {**measured, "formula": formula}
    if "fp32" in results and "fp32_ckpt" in results:
        figures["checkpointing_step_memory_saving"] = results["fp32"]["step_gb"] / results["fp32_ckpt"]["step_gb"]
        figures["checkpointing_time_cost"] = results["fp32_ckpt"]["seconds"] / results["fp32"]["seconds"]
    figures["fastest_step_seconds"] = min(r["seconds"] for r in results.values())
    memory = "allocated" if on_gpu else "RSS"
    result = dict(
        name="memory",
        title="Training step memory at the paper size",
        command=common.command_line("bench_memory.py", argv),
        description=(
            "Seed 002's fine-tuning step on one sample: ViT-B encoder at 32 x 256 x 256 trained fully, `spp` "
            "projector, SmolLM2-135M with LoRA r=16 on all linear layers, segmentation head with a `[SEG]` answer "
            "and a mask, 512 LLM tokens, AdamW; each configuration in a fresh process, median of "
            f"{args.repeats} steps after the measured first one, on {args.device}. `fp32`: fp32 weights and compute; `_ckpt`: "
            "gradient checkpointing in the encoder and the LLM; `bf16`: frozen weights stored in bf16 and bf16 "
            "autocast (the 24 GB recipe). Step memory = the first step's peak minus the memory before it (model and AdamW "
            "state allocated)."
        ),
        tables=[
            dict(columns=["configuration", "s / step", f"{memory} before step GiB", f"peak {memory} GiB",
                          "step memory GiB"], rows=rows),
            dict(caption=(
                "Cross-check of `memory_plan.py`'s formula on this configuration (GiB). Static: parameters + AdamW "
                "moments (measured: growth of the process from before the model was built to before the first step; "
                "on a CPU it includes the LLM loader's leftovers). Step: activations + gradients (measured: step "
                "memory)."),
                columns=["configuration", "formula static", "measured static", "formula step", "measured step",
                         "measured / formula"], rows=cross_rows),
        ],
        figures=figures,
    )
    common.emit(result, args.json_out)


if __name__ == "__main__":
    main()
