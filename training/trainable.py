"""Which parameters each stage trains. MLLM stages (seed 002, section 3): alignment trains the projector and the new
token embeddings only; fine-tuning adds LoRA on the LLM's linear layers (through PEFT's own switches), the segmentation
head and, optionally, the encoder. VoxCLIP pre-training may lock all or the lower layers of its pre-trained text
encoder."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from voxlm.modeling import VoxCLIPModel, VoxLMForConditionalGeneration


def new_token_ids(model: VoxLMForConditionalGeneration) -> list[int]:
    """The ids of voxlm's added tokens (`<im_patch>`, `[SEG]`, `<bx_start>`, `<bx_end>`) that the config names."""
    config = model.config
    ids = [config.image_token_id, config.seg_token_id, config.box_start_token_id, config.box_end_token_id]
    return sorted({token_id for token_id in ids if token_id is not None})


def freeze_for_align(model: VoxLMForConditionalGeneration) -> list[nn.Parameter]:
    """Train the projector and the rows of the new tokens in the input embeddings; freeze everything else.

    The embedding matrix stays one parameter, so a gradient hook zeroes the gradient of every row that is not a new
    token.

    Returns:
        `list[nn.Parameter]`: the parameters trained on some rows only (the input embeddings). They must get no weight
        decay (`parameter_groups(no_decay=...)`): AdamW's decoupled decay would shrink their frozen rows too.
    """
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    embeddings = model.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    row_mask = torch.zeros(embeddings.shape[0], 1, dtype=embeddings.dtype, device=embeddings.device)
    row_mask[new_token_ids(model)] = 1.0
    embeddings.register_hook(lambda grad: grad * row_mask.to(grad.dtype))
    return [embeddings]


def freeze_text_layers(model: VoxCLIPModel, trainable_layers: int | None) -> None:
    """Lock VoxCLIP's text encoder except its top `trainable_layers` transformer layers (`None`: train it all).

    With 0 the pre-trained text tower is locked and only its projection trains: the image encoder learns to meet a
    fixed text space, which needs far less compute per step (no backward through the text encoder) and keeps the
    language knowledge of the pre-trained model on small data.
    """
    if trainable_layers is None:
        return
    layers = getattr(getattr(model.text_model, "encoder", None), "layer", None)
    if layers is None:
        raise ValueError(f"text_trainable_layers needs a BERT-like text encoder with `encoder.layer`; "
                         f"{type(model.text_model).__name__} has none")
    if not 0 <= trainable_layers <= len(layers):
        raise ValueError(f"text_trainable_layers must be between 0 and the text encoder's {len(layers)} layers "
                         f"(or None for all), got {trainable_layers}")
    model.text_model.requires_grad_(False)
    for layer in layers[len(layers) - trainable_layers:]:
        layer.requires_grad_(True)


@dataclass
class LoraSettings:
    """LoRA on the LLM (seed 002: r=16, alpha=32, dropout 0.1; M3D uses 0.05), or full fine-tuning.

    Args:
        enabled (`bool`): `False` trains the LLM fully instead and saves a plain model (no adapter). Meant for an LLM
            with no pre-training to preserve, such as the quickstart's randomly initialised tiny Llama: LoRA cannot
            teach it language, since its embeddings and output head stay frozen and random.
        r (`int`), alpha (`int`), dropout (`float`): LoRA's rank, scaling and dropout.
        train_vision (`bool`): also train the encoder fully (saved with the adapter through `modules_to_save`);
            `run.module_learning_rates={vision_tower: ...}` gives it a learning rate of its own.
        extra_modules (`list[str]`): further modules trained fully and saved with the adapter.
        frozen_dtype (`str`, *optional*): `"bf16"` stores every frozen parameter (the LLM's base weights, a frozen
            encoder) in bfloat16 while the trained ones stay float32: half the weight memory, which is what lets the
            7B model train on one 24 GB GPU (`README.md`, "Memory to train the 7B model"). Needs
            `run.mixed_precision=bf16`. `None` keeps every parameter as loaded.
    """

    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    train_vision: bool = False
    extra_modules: list[str] = field(default_factory=list)
    frozen_dtype: str | None = None


def llm_linear_names(model: VoxLMForConditionalGeneration) -> list[str]:
    """Leaf names of the LLM's linear layers (q_proj, ..., or Phi-3's fused qkv_proj), the output head excluded."""
    output_head = model.language_model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.language_model.named_modules()
        if isinstance(module, nn.Linear) and module is not output_head
    }
    return sorted(names)


def prepare_finetune(model: VoxLMForConditionalGeneration, settings: LoraSettings):
    """What the `finetune` stage trains: LoRA ([`apply_lora`]) or, with `settings.enabled=False`, every parameter but
    the encoder's (unless `train_vision`).

    Returns:
        `peft.PeftModel` with LoRA, else the model itself.
    """
    if settings.enabled:
        return apply_lora(model, settings)
    model.requires_grad_(True)
    model.vision_tower.requires_grad_(settings.train_vision)
    if settings.frozen_dtype is not None:
        cast_frozen(model, settings.frozen_dtype)
    return model


def apply_lora(model: VoxLMForConditionalGeneration, settings: LoraSettings):
    """Wrap the model with PEFT LoRA on the LLM's linear layers; the projector, the segmentation head, the new token
    rows (PEFT's `trainable_token_indices`) and optionally the encoder train too, and all of them are saved with the
    adapter.

    Returns:
        `peft.PeftModel`.
    """
    from peft import LoraConfig, get_peft_model

    linear_names = "|".join(llm_linear_names(model))
    modules_to_save = ["multi_modal_projector"] + (["seg_head"] if model.seg_head is not None else [])
    if settings.train_vision:
        modules_to_save.append("vision_tower")
    modules_to_save += settings.extra_modules
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=rf"language_model\..*\.({linear_names})",
        modules_to_save=modules_to_save,
        trainable_token_indices={"embed_tokens": new_token_ids(model)},
        task_type=None,
    )
    model = get_peft_model(model, config)
    if settings.frozen_dtype is not None:
        cast_frozen(model, settings.frozen_dtype)
    return model


FROZEN_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cast_frozen(model: nn.Module, dtype: str) -> None:
    """Store the parameters that do not train in `dtype` (`"bf16"`, `"fp16"` or `"fp32"`); trained ones keep theirs."""
    if dtype not in FROZEN_DTYPES:
        raise ValueError(f"lora.frozen_dtype must be one of {sorted(FROZEN_DTYPES)} or None, got {dtype!r}")
    for parameter in model.parameters():
        if not parameter.requires_grad:
            parameter.data = parameter.data.to(FROZEN_DTYPES[dtype])
