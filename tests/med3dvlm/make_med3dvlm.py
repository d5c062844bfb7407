"""Writes `med3dvlm/` (a tiny Med3DVLM, `model_type` `vlm_qwen`, in the released repo layout of
`MagicXin/Med3DVLM-Qwen-2.5-7B`, sharded) and `reference.safetensors` (its input volume and prompt, and the logits and
greedy tokens that Med3DVLM's own `VLMQwenForCausalLM` gives for them).

    HF_HUB_OFFLINE=1 python tests/med3dvlm/make_med3dvlm.py --med3dvlm /work/src/Med3DVLM

(for files exported from a bare mirror, `GIT_DIR=<the mirror>` lets `git rev-parse` name the commit)

MED3DVLM is a checkout of github mirthAI/Med3DVLM (MIT licence, "for research purposes only"; the commit is saved in
the reference file's metadata). Its `src/model/llm/qwen.py`, `vlm_arch.py`, `encoder/builder.py`, `encoder/dcformer.py`
and `projector/mlp.py` run unchanged; the shims, all outside its files, are those of
`tests/dcformer_siglip/make_dcformer_siglip.py`: a stub `timm.layers` (dcformer.py imports it and uses nothing of it
here), and `decomp_small` (which `VisionTower` always builds) replaced by Med3DVLM's own `DecompModel` at tiny widths
(channels 8, 8, 16, 16, 24; blocks 1, 1, 2, 1, 1). On Python < 3.12, one f-string of `vlm_arch.py` that only
3.12 parses is loaded with its inner quotes swapped (a line this script never reaches).

The model is built as `train_vlm.py` builds it (scripts/finetune_lora.sh: `--vision_tower dcformer
--mm_projector_type mixer --vision_select_layer -2`, `vision_select_feature="cls_patch"`, `mm_mlp_depth=2`), at tiny
sizes: a 2-layer Qwen2 32 wide; the mixer's streams give 5 -> 4 and 3 -> 4 tokens (the release: 192 -> 128 and
64 -> 128), so `proj_out_num` is 8; `low_input_size` / `high_input_size` are the tiny DCFormer's last two stages at
the tiny input (H, W, D) = (64, 96, 32), as `initialize_vision_modules` writes the release's (256, 384) / (32, 768).
The tokenizer is a tiny byte-level BPE with Qwen2's special tokens, then `<im_patch>` added as train_vlm.py adds it;
the LLM's vocabulary is its length (train_vlm.py's `resize_token_embeddings(len(tokenizer))`). Every parameter gets
seeded noise, the layer scales and the BatchNorm statistics too, so that a wrong key or axis shows.

The prompt is demo.py's: `"<im_patch>" * proj_out_num + question`, tokenized with the model's tokenizer; the volume
(1, 1, D, H, W) in [0, 1] is stored as uint8 / 255. The logits are `model(input_ids, images=volume)`'s. The greedy
tokens are 8 steps of a plain greedy loop over that forward (each step runs the whole sequence again: the image
embeddings spliced once, the new tokens' embeddings appended), because Med3DVLM's `generate` drops the KV cache that
transformers 5 passes as `cache` (its `forward` takes `past_key_values` and does not pass its `**kwargs` on).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "dcformer_siglip"))
from make_dcformer_siglip import (  # noqa: E402
    TINY_CHANNELS,
    import_med3dvlm_dcformer,
    med3dvlm_checkout,
    randomise,
)

VOLUME = (32, 64, 96)  # (D, H, W)
LOW_OUTPUT_SIZE, HIGH_OUTPUT_SIZE = [5, 4], [3, 4]
QUESTION = "What is the abnormality in the liver?"
NEW_TOKENS = 8
CORPUS = [
    "What is the abnormality in the liver? There is a small hypodense lesion in the left lobe of the liver.",
    "Describe the findings of the medical image you see. No acute intracranial abnormality.",
    "Which organ is shown? The kidney, the spleen and the pancreas are normal in size.",
]
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]


def import_med3dvlm_qwen(root: Path):
    """Med3DVLM's `src.model.llm.qwen`, with a stub `timm.layers` and `decomp_small` at the tiny widths."""
    _, decomp_tiny = import_med3dvlm_dcformer(root)
    builder = importlib.import_module("src.model.encoder.builder")
    builder.decomp_small = decomp_tiny
    # vlm_arch.py nests double quotes in an f-string (`f"{keyword}.{k.split(keyword + ".")[2]}"`), which only
    # Python >= 3.12 parses; that line is in a branch never taken here, and is loaded with single inner quotes.
    path = root / "src" / "model" / "vlm_arch.py"
    source = path.read_text()
    quirk = 'k.split(keyword + ".")[2]'
    if quirk in source and sys.version_info < (3, 12):
        importlib.import_module("src.model.CLIP")
        spec = importlib.util.spec_from_file_location("src.model.vlm_arch", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["src.model.vlm_arch"] = module
        exec(compile(source.replace(quirk, "k.split(keyword + '.')[2]"), str(path), "exec"), module.__dict__)
    return importlib.import_module("src.model.llm.qwen")


def tiny_qwen_tokenizer(folder: Path):
    """A byte-level BPE of ~400 tokens with Qwen2's special tokens, then `<im_patch>` as train_vlm.py adds it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIAL_TOKENS,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        model_max_length=512)
    tokenizer.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, model_max_length=512, padding_side="right")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<im_patch>"]})  # train_vlm.py
    return tokenizer


def stage_shape(index: int) -> tuple[int, int]:
    """(tokens, channels) of DecompModel's output `index` at VOLUME: the stem strides by 4, each stage by 2."""
    grid = [-(-size // 4) for size in VOLUME]
    for _ in range(index):
        grid = [-(-size // 2) for size in grid]
    return grid[0] * grid[1] * grid[2], TINY_CHANNELS[index]


def greedy(model, input_ids: torch.Tensor, images: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` greedy tokens from Med3DVLM's own forward, the whole sequence each step (see the module docstring)."""
    _, _, _, _, embeds, _ = model.prepare_inputs_for_multimodal(input_ids, None, None, None, None, images)
    tokens = []
    for _ in range(steps):
        logits = model(inputs_embeds=embeds).logits[:, -1]
        token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
        tokens.append(token)
        embeds = torch.cat([embeds, model.get_model().embed_tokens(token)], dim=1)
    return torch.cat(tokens, dim=1)


def main() -> None:
    root, commit = med3dvlm_checkout(__doc__.splitlines()[0])
    qwen = import_med3dvlm_qwen(Path(root))
    torch.manual_seed(0)
    release = HERE / "med3dvlm"
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = tiny_qwen_tokenizer(Path(scratch))
    image_token_id = tokenizer.convert_tokens_to_ids("<im_patch>")
    proj_out_num = LOW_OUTPUT_SIZE[-1] + HIGH_OUTPUT_SIZE[-1]
    height, width, depth = VOLUME[1], VOLUME[2], VOLUME[0]
    config = qwen.VLMQwenConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, rope_theta=1000000.0,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        # initialize_vision_modules writes these from train_vlm.py's ModelArguments (scripts/finetune_lora.sh)
        input_size=(height, width, depth), patch_size=(16, 16, 16), dim=768, depth=12, vision_tower="dcformer",
        vision_select_layer=-2, vision_select_feature="cls_patch", mm_projector_type="mixer", mm_mlp_depth=2,
        proj_out_num=proj_out_num, low_output_size=LOW_OUTPUT_SIZE, high_output_size=HIGH_OUTPUT_SIZE,
        low_input_size=stage_shape(3), high_input_size=stage_shape(4), mm_hidden_size=768,
        img_token_id=image_token_id, tune_mm_mlp_adapter=False, use_cache=True,
    )
    model = qwen.VLMQwenForCausalLM(config).eval()
    randomise(model)
    model.save_pretrained(release, max_shard_size="150KB")  # sharded, as the 7B release is
    tokenizer.save_pretrained(release)

    input_ids = tokenizer("<im_patch>" * proj_out_num + QUESTION, return_tensors="pt")["input_ids"]  # demo.py
    volume = torch.randint(0, 256, (1, 1, *VOLUME), dtype=torch.uint8)
    with torch.no_grad():
        logits = model(input_ids=input_ids, images=volume.float() / 255).logits
        generated = greedy(model, input_ids, volume.float() / 255, NEW_TOKENS)
    save_file({"volume_uint8": volume, "input_ids": input_ids, "logits": logits.contiguous(), "generated": generated},
              HERE / "reference.safetensors",
              metadata={"med3dvlm_commit": commit, "question": QUESTION, "script": Path(__file__).name})
    print("logits", tuple(logits.shape), "generated", generated.tolist())


if __name__ == "__main__":
    main()
