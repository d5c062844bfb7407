"""Tiny configs shared by the model tests (STYLE.md rule 13): volume (1, 8, 16, 16), patch (2, 4, 4), width 32."""

from voxlm.modeling import VoxLMConfig, VoxViTConfig

IMAGE_TOKEN_ID, SEG_TOKEN_ID, BOX_START_TOKEN_ID, BOX_END_TOKEN_ID = 4, 5, 6, 7
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2
VOCAB_SIZE = 99

TEXT_CONFIGS = {
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "phi3": dict(model_type="phi3", num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2),
}


def tiny_vision_config(**overrides) -> VoxViTConfig:
    settings = dict(
        image_size=(8, 16, 16),
        patch_size=(2, 4, 4),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    settings.update(overrides)
    return VoxViTConfig(**settings)


def tiny_text_config(kind: str = "llama", **overrides) -> dict:
    settings = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB_SIZE,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        max_position_embeddings=128,
        **TEXT_CONFIGS[kind],
    )
    settings.update(overrides)
    return settings


def tiny_voxlm_config(kind: str = "llama", seg: bool = True, **overrides) -> VoxLMConfig:
    settings = dict(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(kind),
        seg_config=dict(hidden_size=32, num_attention_heads=4, intermediate_size=64) if seg else None,
        image_token_id=IMAGE_TOKEN_ID,
        seg_token_id=SEG_TOKEN_ID,
        box_start_token_id=BOX_START_TOKEN_ID,
        box_end_token_id=BOX_END_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )
    settings.update(overrides)
    return VoxLMConfig(**settings)
