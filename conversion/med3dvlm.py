"""Med3DVLM's released VLM (mirthAI/Med3DVLM, Hub `MagicXin/Med3DVLM-Qwen-2.5-7B`) as a voxlm folder:
`voxlm convert med3dvlm SRC OUT`.

    SRC  config.json (read as JSON: its auto_map names Med3DVLM's remote code), the weights (sharded safetensors or
         `.bin`, read shard by shard without unpickling), Qwen2's tokenizer with Med3DVLM's `<im_patch>`
    OUT  a VoxLM (DCFormer tower, mixer projector, Qwen2), voxlm's code for `trust_remote_code`, a VoxLMProcessor
         with what Med3DVLM was trained on (M3D-Cap's preparation at 1 x 128 x 256 x 256 in [0, 1]) and its prompt
         layout (`prompt_layout="med3dvlm"`), the tokenizer, the generation config, a model card
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from voxlm.model_cards import preprocessing_summary, render_voxlm_card
from voxlm.modeling.convert_dcformer_siglip import MED3DVLM_COMMIT
from voxlm.modeling.convert_m3d import checkpoint_files
from voxlm.modeling.convert_med3dvlm import VISION, check_med3dvlm_fields, convert_med3dvlm_state_dict, med3dvlm_config
from voxlm.processing import VoxLMProcessor, dcformer_volume_processor
from voxlm.processing.processing_voxlm import IMAGE_TOKEN, MED3DVLM_LAYOUTS

from .checkpoints import convert_shards, resolve_source
from .dcformer_siglip import MED3DVLM_REPOSITORY
from .m3d import read_source_config, source_card_fields, write_converted_voxlm

# Note: Med3DVLM's prompt begins with `<im_patch>` read as text (its splice keeps the first token), so the image
# placeholders must be another token of the same vocabulary, whose embedding is never read (image features replace
# it): Qwen2's `<|image_pad|>`, in every Qwen2 / Qwen2.5 tokenizer, unused by Med3DVLM.
PLACEHOLDER_TOKEN = "<|image_pad|>"
SETTINGS = ("prompt_layout",)


def med3dvlm_token_ids(tokenizer, source) -> dict[str, int | None]:
    """The placeholder's id (`PLACEHOLDER_TOKEN`) and the pad token's; `ValueError` when the tokenizer lacks
    `<im_patch>` or the placeholder."""
    for token in (IMAGE_TOKEN, PLACEHOLDER_TOKEN):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"{source}: the tokenizer has no {token} token; it is not Med3DVLM's Qwen2 tokenizer")
    return {"image_token_id": tokenizer.convert_tokens_to_ids(PLACEHOLDER_TOKEN),
            "pad_token_id": tokenizer.pad_token_id}


def convert_med3dvlm(source: str | Path, output_dir: str | Path, settings: dict | None = None) -> Path:
    """Convert a released Med3DVLM into a voxlm folder that `AutoModel` / `AutoProcessor` load, with voxlm installed
    or through `trust_remote_code`.

    Args:
        source (`str` or `Path`): the released repo's folder, or its Hub id (downloaded).
        output_dir (`str` or `Path`): the folder to write.
        settings (`dict`, *optional*): `prompt_layout`, `"med3dvlm"` (default: Med3DVLM's VQA prompts, a space before
            the question) or `"med3dvlm_caption"` (its caption prompts and demo, no space).

    Raises:
        `ValueError`: a config.json that is no Med3DVLM voxlm reproduces, a tokenizer without its tokens, unknown
        settings, or weights that do not fill the model (naming the keys).
    """
    settings = dict(settings or {})
    if set(settings) - set(SETTINGS) or settings.get("prompt_layout", "med3dvlm") not in MED3DVLM_LAYOUTS:
        raise ValueError(f"Med3DVLM conversion settings: {settings}; known: {SETTINGS}, prompt_layout one of "
                         f"{MED3DVLM_LAYOUTS}")
    folder = resolve_source(source)
    source_config = read_source_config(folder)
    check_med3dvlm_fields(source_config)
    # Given the LLM's config, AutoTokenizer never reads config.json, whose auto_map would ask to run Med3DVLM's code.
    tokenizer = AutoTokenizer.from_pretrained(folder, config=AutoConfig.for_model("qwen2"))
    token_ids = med3dvlm_token_ids(tokenizer, folder)
    vision_shapes: dict[str, torch.Tensor] = {}

    def convert(state_dict):
        """One shard; the DCFormer's shapes are kept (as meta tensors) for its config."""
        vision_shapes.update({key: value.to("meta") for key, value in state_dict.items() if key.startswith(VISION)})
        return convert_med3dvlm_state_dict(state_dict)

    output_dir = Path(output_dir)
    shapes, skipped = convert_shards(checkpoint_files(folder), output_dir, convert,
                                     metadata={"converted_from": str(source)})
    config = med3dvlm_config(source_config, vision_shapes, token_ids,
                             shapes["language_model.model.embed_tokens.weight"][0])
    write_converted_voxlm(config, shapes, skipped, source, folder, output_dir, token_ids["pad_token_id"])
    processor = VoxLMProcessor(
        image_processor=dcformer_volume_processor(config.vision_config.image_size),
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        image_token=PLACEHOLDER_TOKEN,
        prompt_layout=settings.get("prompt_layout", "med3dvlm"),
    )
    processor.save_pretrained(output_dir)
    write_med3dvlm_card(output_dir, source, config, processor, shapes)
    return output_dir


def write_med3dvlm_card(output_dir: Path, source, config, processor, shapes) -> None:
    """A model card that names the source checkpoint, Med3DVLM's code and its licence terms."""
    parameters = sum(torch.Size(shape).numel() for shape in shapes.values())
    vision = config.vision_config
    card = render_voxlm_card(
        Path(output_dir).name,
        [],
        summary=("Med3DVLM (mirthAI/Med3DVLM) as a VoxLM, converted by `voxlm convert med3dvlm`: a DCFormer 3D "
                 "encoder, a dual-stream MLP-Mixer projector over its last two stages and a Qwen2 language model; "
                 "trained by its authors on M3D-Data (weights unchanged)."),
        vision_source=f"Med3DVLM's DCFormer (stem {vision.stem_channels}, stages {list(vision.stage_channels)}), "
        f"converted from `{source}`",
        llm_source=f"Qwen2 ({config.text_config.hidden_size} wide, {config.text_config.num_hidden_layers} layers), "
        f"converted from `{source}`",
        data_source=f"M3D-Data (M3D-Cap, M3D-VQA), as the source was trained ({MED3DVLM_REPOSITORY})",
        stages=(f"trained by Med3DVLM's authors; converted by `voxlm convert med3dvlm` from `{source}`, weights "
                f"unchanged, outputs checked against {MED3DVLM_REPOSITORY} {MED3DVLM_COMMIT[:8]} on a tiny model. "
                f"Projector: the dual-stream MLP-Mixer over the last two DCFormer stages ({config.num_image_tokens} "
                f"tokens). Prompts as Med3DVLM wrote them (`prompt_layout=\"{processor.prompt_layout}\"`: "
                f"`<im_patch>` as text, the image tokens, the question without its first token, which Med3DVLM's "
                "splice overwrites; no chat template)"),
        limits=(f"Med3DVLM's code is MIT-licensed and, in its authors' words, \"only for research purposes\" "
                f"({MED3DVLM_REPOSITORY}, LICENSE and README); the weights carry the licence of their Hub "
                f"repository's card ({source}), which the conversion could not read offline: check it before reuse."),
        preprocessing=preprocessing_summary(processor.image_processor),
        memory=f"{parameters / 1e6:.1f} M parameters (in the source's dtype)",
        repo_or_path=str(output_dir),
        **source_card_fields(source),
    )
    card.save(Path(output_dir) / "README.md")
