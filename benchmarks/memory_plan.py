"""Memory plan for training seed 002's 7B setting: Llama-2-7B with LoRA, the ViT-B encoder at 32 x 256 x 256 (trainable
or frozen), the `spp` projector and the `[SEG]` segmentation head, AdamW.

Parameters are counted from the real model classes built on the meta device (`VoxLMForConditionalGeneration` with
Llama-2-7B's config, wrapped by `voxlm.training.trainable.apply_lora`), so nothing is downloaded and no number is typed
by hand. Memory per configuration, in GiB:

* parameters: trained ones in fp32; frozen ones in fp32, bf16 (`lora.frozen_dtype: bf16`) or NF4 (QLoRA: the LLM's
  linear weights at 4 bits plus one fp32 absmax per 64 weights, everything else bf16);
* gradients: 4 bytes per trained parameter; optimizer: AdamW's two fp32 moments, 8 bytes per trained parameter;
* activations: the tensors autograd saves, per token, counted op by op (below); under bf16 autocast also the bf16
  copies autocast keeps of the trained fp32 weights (2 bytes per trained parameter);
* overhead: a fixed 1 GiB for the CUDA context and allocator slack.

Activation bytes per token (beta = bytes of the compute dtype: 2 under bf16 autocast, 4 in fp32; h, I the LLM's width
and MLP width, h_kv its key/value width, E, I_v the encoder's; the residual stream of the encoder stays fp32):

    LLM decoder layer   2 (4 + beta) h          two RMSNorms: the fp32 upcast of the input and the normalised output
                        beta (2 h + 2 h_kv)     q and k after RoPE, v, the attention output (SDPA keeps no N x N matrix)
                        beta h                  the contiguous copy of the attention output that o_proj saves
                        4 beta I                MLP: gate, SiLU(gate), up, their product
                        (beta + 1)(6 h + I)     LoRA dropout: each adapted Linear saves its own dropped input + mask
    LLM, once           beta h + (4 + beta) h + (beta + 8) V   embeddings, final norm, logits and their fp32 log-softmax
    encoder block       2 (4 + 4 + [beta < 4] beta) E   two LayerNorms (fp32 input, fp32 output, bf16 cast)
                        beta (3 E + E + E)      q, k, v, the attention output and its copy for out_proj
                        2 beta I_v              MLP: the first Linear's output and GELU's
    gradient checkpointing: each block keeps only its input (beta h, or 4 E for the encoder), and one block's
    activations live again while it is recomputed.

LLM tokens: `--text-tokens` text + 256 image tokens per sample (seed 002: up to 512 in all); encoder tokens 1 + 2,048;
the projector and segmentation head add their feature maps (small next to the rest). A frozen encoder saves nothing
for the backward pass. The formula is cross-checked against measured peaks by `bench_memory.py`.

Usage: python benchmarks/memory_plan.py [--text-tokens 256] [--budget-gib 24] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, replace

GIB = 2**30
OVERHEAD_GIB = 1.0

# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json), the LLM of seed 002's 7B setting.
LLAMA2_7B = dict(
    model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)
NEW_TOKENS = 4  # <im_patch>, <bx_start>, <bx_end>, [SEG]


@dataclass(frozen=True)
class TrainSetting:
    """One row of the plan.

    Args:
        name (`str`): the row's label.
        frozen_dtype (`str`): storage of the frozen parameters: `"fp32"`, `"bf16"` or `"nf4"` (QLoRA).
        compute (`str`): `"bf16"` (autocast) or `"fp32"`.
        train_encoder (`bool`): the encoder trains fully (PEFT `modules_to_save`) or stays frozen.
        checkpointing (`bool`): gradient checkpointing in the encoder and the LLM.
        micro_batch (`int`): samples per forward / backward.
        text_tokens (`int`): text tokens per sample besides the image tokens.
        lora_r (`int`), lora_dropout (`float`): LoRA on every linear layer of the LLM.
        seg (`bool`): the segmentation head is built and a `[SEG]` sample is in the batch.
    """

    name: str
    frozen_dtype: str = "bf16"
    compute: str = "bf16"
    train_encoder: bool = True
    checkpointing: bool = True
    micro_batch: int = 1
    text_tokens: int = 256
    lora_r: int = 16
    lora_dropout: float = 0.05
    seg: bool = True


def build_meta_model(text_config: dict, setting: TrainSetting, vision_config=None, seg_config=None):
    """The PEFT-wrapped VoxLM of a setting, on the meta device (shapes and `requires_grad` only, no memory)."""
    import torch

    from voxlm.modeling import VoxLMConfig, VoxLMForConditionalGeneration
    from voxlm.training.trainable import LoraSettings, apply_lora

    vocab = text_config["vocab_size"]
    text_config = {**text_config, "vocab_size": vocab + NEW_TOKENS}
    config = VoxLMConfig(
        vision_config=vision_config, text_config=text_config,
        seg_config=(seg_config if seg_config is not None else {}) if setting.seg else None,
        image_token_id=vocab, box_start_token_id=vocab + 1, box_end_token_id=vocab + 2, seg_token_id=vocab + 3,
    )
    with torch.device("meta"):
        model = VoxLMForConditionalGeneration(config)
        model = apply_lora(model, LoraSettings(r=setting.lora_r, alpha=2 * setting.lora_r,
                                               dropout=setting.lora_dropout, train_vision=setting.train_encoder))
    return model


def count_parameters(model) -> dict:
    """Parameter counts of a (PEFT-wrapped) VoxLM by role: trained, frozen LLM linear weights (what NF4 quantizes),
    and the other frozen parameters. Shared tensors are counted once."""
    counts = {"trained": 0, "frozen_llm_linear": 0, "frozen_other": 0}
    seen = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        if parameter.requires_grad:
            counts["trained"] += parameter.numel()
        elif "language_model" in name and "base_layer.weight" in name:
            counts["frozen_llm_linear"] += parameter.numel()
        else:
            counts["frozen_other"] += parameter.numel()
    counts["total"] = sum(counts.values())
    return counts


def llm_activation_bytes(text_config, tokens: int, setting: TrainSetting) -> float:
    """Bytes the LLM saves for the backward pass over `tokens` tokens (the module docstring's formula)."""
    beta = 2 if setting.compute == "bf16" else 4
    h, inter = text_config["hidden_size"], text_config["intermediate_size"]
    layers, vocab = text_config["num_hidden_layers"], text_config["vocab_size"] + NEW_TOKENS
    h_kv = h * text_config.get("num_key_value_heads", text_config["num_attention_heads"]) // text_config[
        "num_attention_heads"]
    lora = (beta + 1) * (6 * h + inter) if setting.lora_dropout > 0 else 0
    per_layer = 2 * (4 + beta) * h + beta * (2 * h + 2 * h_kv) + beta * h + 4 * beta * inter + lora
    once = beta * h + (4 + beta) * h + (beta + 8) * vocab
    kept = layers * beta * h + per_layer if setting.checkpointing else layers * per_layer
    return tokens * (kept + once)


def encoder_activation_bytes(vision_config, setting: TrainSetting) -> float:
    """Bytes one sample's encoder saves for the backward pass (0 when it is frozen)."""
    if not setting.train_encoder:
        return 0.0
    beta = 2 if setting.compute == "bf16" else 4
    width, inter, blocks = vision_config.hidden_size, vision_config.intermediate_size, vision_config.num_hidden_layers
    tokens = 1 + vision_config.num_patches
    norms = 2 * (4 + 4 + (beta if beta < 4 else 0)) * width
    per_block = norms + beta * 5 * width + 2 * beta * inter
    kept = blocks * 4 * width + per_block if setting.checkpointing else blocks * per_block
    embedding = vision_config.num_patches * vision_config.patch_dim * 4 + 8 * tokens * width  # patches, final norm
    return tokens * kept + embedding


def head_activation_bytes(config, setting: TrainSetting) -> float:
    """Projector and segmentation head, one sample: patch grid, pooled tokens, two-way layers, upsampled maps."""
    beta = 2 if setting.compute == "bf16" else 4
    vision, llm_width = config.vision_config, config.text_config.hidden_size
    patches = vision.num_patches
    projector = patches * vision.hidden_size * 4 + config.num_image_tokens * (vision.hidden_size * 4 + 3 * beta * llm_width)
    if not setting.seg or config.seg_config is None:
        return projector
    seg = config.seg_config
    voxels = vision.num_channels * vision.image_size[0] * vision.image_size[1] * vision.image_size[2]
    seg_bytes = patches * seg.hidden_size * beta * (12 * seg.num_hidden_layers + 20) + 6 * 4 * voxels
    return projector + seg_bytes


def plan(setting: TrainSetting, text_config: dict = LLAMA2_7B, vision_config=None, seg_config=None) -> dict:
    """Memory of one training step of `setting` in bytes, by part, plus the parameter counts."""
    model = build_meta_model(text_config, setting, vision_config, seg_config)
    counts = count_parameters(model)
    config = model.base_model.model.config
    frozen_bytes = {"fp32": 4, "bf16": 2, "nf4": 2}[setting.frozen_dtype]
    linear_bytes = 0.5 + 4 / 64 if setting.frozen_dtype == "nf4" else frozen_bytes
    tokens = config.num_image_tokens + setting.text_tokens
    activations = setting.micro_batch * (
        llm_activation_bytes(text_config, tokens, setting)
        + encoder_activation_bytes(config.vision_config, setting)
        + head_activation_bytes(config, setting)
    )
    autocast_copies = 2 * counts["trained"] if setting.compute == "bf16" else 0
    parts = {
        "parameters": 4 * counts["trained"] + linear_bytes * counts["frozen_llm_linear"]
        + frozen_bytes * counts["frozen_other"],
        "gradients": 4 * counts["trained"],
        "optimizer": 8 * counts["trained"],
        "activations": activations + autocast_copies,
    }
    parts["total"] = sum(parts.values())
    return {"setting": asdict(setting), "counts": counts, "tokens": tokens, "bytes": parts}


SEED_002_SETTINGS = (
    TrainSetting("fp32 weights, no checkpointing (voxlm's default load)", frozen_dtype="fp32", checkpointing=False),
    TrainSetting("bf16 frozen weights, no checkpointing", checkpointing=False),
    TrainSetting("bf16 frozen weights, no checkpointing, micro-batch 2", checkpointing=False, micro_batch=2),
    TrainSetting("bf16 frozen weights, checkpointing", checkpointing=True),
    TrainSetting("bf16 frozen weights, checkpointing, micro-batch 2 (shipped config)", micro_batch=2),
    TrainSetting("bf16 frozen weights, checkpointing, micro-batch 4", micro_batch=4),
    TrainSetting("bf16, encoder frozen, checkpointing, micro-batch 2", train_encoder=False, micro_batch=2),
    TrainSetting("NF4 base (QLoRA, needs bitsandbytes), checkpointing, micro-batch 2", frozen_dtype="nf4",
                 micro_batch=2),
)


def plan_table(plans: list[dict], budget_gib: float) -> list[list]:
    """Rows: configuration, trained parameters, each part in GiB, total with overhead, and whether it fits."""
    rows = []
    for entry in plans:
        parts, counts = entry["bytes"], entry["counts"]
        total = parts["total"] / GIB + OVERHEAD_GIB
        rows.append([
            entry["setting"]["name"], f"{counts['trained'] / 1e6:.0f} M",
            *(f"{parts[key] / GIB:.2f}" for key in ("parameters", "gradients", "optimizer", "activations")),
            f"{total:.2f}", "yes" if total <= budget_gib else "no",
        ])
    return rows


PLAN_COLUMNS = ["configuration", "trained params", "parameters GiB", "gradients GiB", "optimizer GiB",
                "activations GiB", "total GiB (+1 GiB overhead)", "fits 24 GB"]


def main(argv=None) -> None:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    import common

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--budget-gib", type=float, default=23.5, help="usable memory of the card (RTX 4090: ~23.5)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    plans = [plan(replace(setting, text_tokens=args.text_tokens)) for setting in SEED_002_SETTINGS]
    counts = plans[0]["counts"]
    result = dict(
        name="memory_plan",
        title="Memory to train the 7B model (computed, not measured on a GPU)",
        command=common.command_line("memory_plan.py", argv),
        description=(
            f"Seed 002's 7B setting: Llama-2-7B + LoRA r=16 on all its linear layers, the ViT-B encoder at 32 x 256 x "
            f"256 trained fully unless noted, `spp` projector, segmentation head, AdamW (fp32 moments), bf16 autocast, "
            f"{plans[0]['tokens']} LLM tokens per sample (256 image + {args.text_tokens} text). Model: "
            f"{counts['total'] / 1e9:.2f} B parameters as built (the frozen original of every module PEFT trains "
            f"through `modules_to_save` included), counted on the meta device. Formula and assumptions: "
            f"`benchmarks/memory_plan.py`; its cross-check against measured peaks is in the memory section. Budget: "
            f"{args.budget_gib} GiB usable on a 24 GB card."
        ),
        tables=[dict(columns=PLAN_COLUMNS, rows=plan_table(plans, args.budget_gib))],
        figures={"plans": plans},
        notes=[
            "The shipped config is `training/configs/finetune_7b_24gb.yaml` (+ "
            "`training/configs/accelerate/single_gpu.yaml`): `lora.frozen_dtype: bf16`, `run.mixed_precision: bf16`, "
            "`run.gradient_checkpointing: true`, micro-batch 2 with gradient accumulation. Without `frozen_dtype` "
            "voxlm builds the model in fp32 and the 7B weights alone take 25 GiB."
        ],
    )
    common.emit(result, args.json_out)


if __name__ == "__main__":
    main()
