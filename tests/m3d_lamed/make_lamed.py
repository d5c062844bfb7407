"""Writes tiny random-weight M3D-LaMed checkpoints made with M3D's own code, laid out like the released Hub repos, and
the outputs M3D's code gives on them.

    flock /tmp/torch.lock python tests/m3d_lamed/make_lamed.py --m3d M3D_GIT

M3D_GIT is a git directory of BAAI-DCAI/M3D (e.g. `/work/.mirror/BAAI-DCAI+M3D/repo`). Its `LaMed/src/model/` tree is
read from HEAD (the commit is saved in every file's metadata) into a temporary `LaMed` package, with the shims below,
and run. Nothing of M3D's is copied into this repository: the folders hold weights, configs and tokenizers only.

What is written (seed 0):

- `lamed_llama/` (M3D's `LamedLlamaForCausalLM`, like GoodBaiBai88/M3D-LaMed-Llama-2-7B) and `lamed_phi3/`
  (`LamedPhi3ForCausalLM`, like GoodBaiBai88/M3D-LaMed-Phi-3-4B): `config.json`, `generation_config.json`, weights,
  and the tokenizer (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`). Both have the `vit3d`
  tower, the `spp` projector and SegVol (`segmentation_module="segvol"`). Llama's weights are safetensors in 5 shards
  with `model.safetensors.index.json`; Phi-3's are PyTorch `.bin` shards with `pytorch_model.bin.index.json`
  (transformers 5 no longer writes `.bin`, so the safetensors shards `save_pretrained` writes are re-saved with
  `torch.save` under the names and index that transformers 4.39, M3D's version, gives them with
  `safe_serialization=False`).
- `lamed_llama_reference.safetensors`, `lamed_phi3_reference.safetensors`: the inputs and M3D's outputs (below),
  computed in float32 on CPU by M3D's model classes loaded back from those folders, in eval mode.
- `m3d_constants.json`: the numbers M3D hard-codes that neither the weights' shapes nor config.json tell, with the
  values used here and M3D's own.

How the checkpoints are made: M3D's `LaMed/src/utils/merge_lora_weights_and_save_hf_model.py` wrote the released
folders, so its `main()` is run piecewise, from its own source text: its `ModelArguments` dataclass (tiny values
passed in), its tokenizer and model preparation (from `print("Tokenizer preparation")` up to the LoRA block: the
tokenizer loaded from the base LLM folder with `use_fast=False`, M3D's special tokens added, `pad = unk` when there is
no pad, `LamedLlamaForCausalLM` / `LamedPhi3ForCausalLM.from_pretrained(base)`, `config.seg_token_id`,
`initialize_vision_modules`, `initialize_seg_modules`, `initialize_vision_tokenizer` with 4 new tokens), and its save
block (`config.save_pretrained`, `save_pretrained`, `tokenizer.save_pretrained`). The base LLM folder (the stand-in
for llama-2-7b-chat / Phi-3-mini-4k-instruct) is a random `LlamaForCausalLM` / `Phi3ForCausalLM` of the tiny size with
a tiny tokenizer. In place of the LoRA merge, every parameter is then drawn anew from a seeded generator (fan-in scaled
normals; norm weights 1 + 0.1 N(0, 1)), so that no two rows are equal (M3D sets the 4 new token rows to one mean row).

The tiny tokenizer: WordLevel over radiology words with `<unk>` 0, `<s>` 1, `</s>` 2, a whitespace/punctuation
pre-tokenizer and a post-processor prepending `<s>` (as Llama's and Phi-3's do). The Llama one declares no pad token,
as Llama-2's does, so M3D's rule makes `<unk>` the pad; the Phi-3 one has Phi-3's `<|endoftext|>` (eos and pad),
`<|assistant|>`, `<|end|>`, `<|user|>`, `<|system|>` and a Phi-3 chat template (M3D never applies it). M3D then adds
`<im_patch>`, `<bx_start>`, `<bx_end>` (special) and `[SEG]` (not special), in that order, at the end of the vocab.

Reference keys (int64 ids, float32 tensors):

- `image` (1, 1, 8, 16, 16): a uniform random volume in [0, 1].
- `input_ids` (1, L): `"<im_patch>" * 8 + " " + QUESTION` tokenized as M3D's Bench/eval/eval_vqa.py and
  Bench/dataset/multi_dataset.py do (BOS from the tokenizer, no chat template). M3D's `prepare_inputs_for_multimodal`
  keeps the embedding of position 0 (BOS) and replaces positions 1..8 with the 8 projected image tokens.
- `logits` (1, L, V): M3D's `forward(images=image, input_ids=input_ids)`.
- `greedy_ids` (1, 8): `generate(image, input_ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)`. M3D's
  generate passes only `inputs_embeds` to transformers' generate, so what it returns holds the new tokens only, not
  the prompt.
- `seg_prompt_ids` (1, L'): `"<im_patch>" * 8 + " " + SEG_QUESTION`, tokenized the same way.
- `seg_answer_ids` (1, 5): what `generate(image, seg_prompt_ids, seg_enable=True, max_new_tokens=8,
  do_sample=False, logits_processor=[forcing FORCED_ANSWER + eos])` returned: `It is [SEG] . <eos>` (the eos
  ends it; `[SEG]` is the third new token).
- `seg_mask_logits` (1, 1, 8, 16, 16): the mask logits it returned.
- `seg_hidden_state` (1, 32), `seg_prompt` (1, 32): what M3D's `seg_projector` got and gave in that call (hooked).

The header's metadata holds the M3D commit, this script's name, the question texts and the tiny sizes; its keys are
sorted (safetensors writes them in hash-map order), so that reruns give identical bytes.

Which hidden state M3D feeds the seg projector (generate, lamed_llama.py / lamed_phi3.py): `seg_token_mask =
output_ids[:, 1:] == seg_token_id` and `last_hidden_state = cat(step hidden_states[-1] for steps 1..)`, so position i
of that mask pairs the LLM's last-layer (after the final norm) state at generated token i with the token i + 1 being
`[SEG]`: the state of the token *before* `[SEG]`, the one that predicted it (the script checks this against M3D's
`forward` on the prompt plus the answer up to `[SEG]`). A `[SEG]` as the first new token is never
seen; with several `[SEG]`s their states are averaged; with none, that sample's mask logits are set to -inf. Training
(`forward` with `segs`) uses the same shift (`input_ids[:, 1:] == seg_token_id` padded with a 0 at the end).

Shims (each text substitution must match exactly once; M3D's values are kept in m3d_constants.json):

- `multimodal_encoder/vit.py`, M3D's copy of MONAI's ViT: `PatchEmbeddingBlock(pos_embed=...)` ->
  `proj_type=...` (MONAI >= 1.4 renamed the argument; MONAI 1.6 is installed, M3D pinned 1.3).
- `multimodal_encoder/vit.py`, `ViT3DTower`: M3D builds its ViT with the ViT-B defaults (hidden 768, mlp 3072,
  12 layers, 12 heads); the call gets `hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4`.
- `segment_anything_volumetric/build_sam.py`: `embed_dim=768` -> 32 (SegVol's ViT width, the decoder's width and
  the prompt width: it must equal `mm_hidden_size`, which the seg projector outputs), `mlp_dim = 3072` -> 64,
  `num_layers = 12` -> 2, `num_heads = 12` -> 4 (SegVol's ViT), `pos_embed=pos_embed` -> `proj_type=pos_embed`
  (MONAI's `ViT`, as above), TwoWayTransformer `mlp_dim=2048` -> 64, `iou_head_hidden_dim=256` -> 32. Kept: the
  TwoWayTransformer's depth 2 and 8 heads, 3 multimask outputs, iou head depth 3, `mask_in_chans=16`.
- `segment_anything_volumetric/modeling/mask_decoder.py`: `txt_align_upscaled_embedding = nn.Linear(768, 96)` ->
  `nn.Linear(32, 4)` (prompt width -> width // 8, the channels of the upscaled embedding).
- torchvision is not installed: while M3D's package is imported, stub `torchvision.ops.boxes` and
  `torchvision.transforms.functional` modules stand in (M3D's automatic mask generator and SAM transforms import
  them; nothing here calls them), and they are removed from `sys.modules` afterwards.
- transformers 5's generate hands the KV cache to `forward` as `cache`; M3D's `forward` takes `past_key_values`
  (and passes it on to Llama's / Phi-3's `forward`, which still accept that name). A wrapper around M3D's
  `prepare_inputs_for_generation` renames the key, and drops the `logits_to_keep=0` (all logits) that Phi-3's
  `prepare_inputs_for_generation` always adds and M3D's `forward` does not take.
- The merge script's save block gets `max_shard_size` (Llama 120KB, Phi-3 400KB) and `save_jinja_files=False`;
  its LoRA block, `load_state_dict(model_with_lora.bin)`, `merge_and_unload` and `torch.save(merged_model.bin)` are
  not run (the random redraw stands in for them).
- `pretraining_tp=1` is in the base Llama config (Llama-2's config.json has it; M3D's `LamedLlamaForCausalLM`
  reads it). Not needed: the `.cuda()` in M3D's training forward (only run with `segs`, which is not done here).
- config.json is rewritten into the form transformers 4.39 (M3D's version, which wrote the released ones) writes:
  `rope_parameters` -> `rope_theta` + `rope_scaling: null`, `dtype` -> `torch_dtype`, and for Llama no `head_dim`,
  `mlp_bias` or `pad_token_id: null` (LlamaConfig gained the first two after 4.39); `auto_map` is added
  (`lamed_llama.LamedConfig` / `lamed_llama.LamedLlamaForCausalLM`, `lamed_phi3.LamedPhi3Config` /
  `lamed_phi3.LamedPhi3ForCausalLM`: M3D's module files; the folders do not ship them). Its other fields are what
  M3D's code set (`image_channel`, `image_size`, `patch_size`, `vision_tower`, `vision_select_layer`,
  `vision_select_feature`, `mm_projector_type`, `proj_layer_type`, `proj_layer_num`, `proj_pooling_type`,
  `proj_pooling_size`, `mm_hidden_size`, `segmentation_module`, `seg_token_id`, `vocab_size`); `img_token_id` is
  not among them (M3D keeps it on `model_args`). Because of `auto_map`, load the tokenizer with
  `AutoTokenizer.from_pretrained(folder, trust_remote_code=False)`: without it transformers asks whether to run the
  (absent) remote code. The shard indexes' metadata keeps `total_size` only (transformers 5 adds
  `total_parameters`).
- The tokenizer is saved with `save_jinja_files=False`, so the Phi-3 chat template stays in tokenizer_config.json as
  transformers 4.39 kept it; tokenizer_config.json is rewritten in 4.39's form (`tokenizer_class`
  `PreTrainedTokenizerFast`, `additional_special_tokens` for transformers 5's `extra_special_tokens`,
  `added_tokens_decoder`, without 5's `backend`, `is_local`, `local_files_only`), and `special_tokens_map.json`
  (which transformers 5 no longer writes) is written.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
)

HERE = Path(__file__).parent
SCRIPT = "tests/m3d_lamed/make_lamed.py"
SEED = 0

# tests/tiny_models.py: volume (1, 8, 16, 16), patch (2, 4, 4), width 32
IMAGE_SIZE = (8, 16, 16)
PATCH_SIZE = (2, 4, 4)
POOLING_SIZE = 2  # 4 x 4 x 4 patches -> 2 x 2 x 2 = 8 image tokens
WIDTH = 32  # LaMed's ViT, SegVol's ViT and decoder (mm_hidden_size), the LLM
VIT = dict(mlp_dim=64, num_layers=2, num_heads=4)
SEG_VIT = dict(mlp_dim=64, num_layers=2, num_heads=4)
DECODER = dict(mlp_dim=64, iou_head_hidden_dim=32)
DECODER_KEPT = dict(depth=2, num_heads=8, num_multimask_outputs=3, iou_head_depth=3)  # M3D's, unchanged
LLM = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=128, rms_norm_eps=1e-5, hidden_act="silu", initializer_range=0.02,
           tie_word_embeddings=False, use_cache=True)

LLAMA_SHARD_SIZE = "120KB"  # -> 5 safetensors shards
PHI3_SHARD_SIZE = "400KB"  # -> 2 shards

# an open VQA question (its greedy answers are not one token repeated); the segmentation question and answer are from
# LaMed/src/dataset/prompt_templates.py (Seg_templates)
QUESTION = "Where is the mass located in this image?"
SEG_QUESTION = "Can you segment the liver in this image? Please output the mask."
FORCED_ANSWER = "It is [SEG]."
MAX_NEW_TOKENS = 8

M3D_TOKENS = ["<im_patch>", "<bx_start>", "<bx_end>", "[SEG]"]  # what M3D adds, in its order
PHI3_CHAT_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]
PHI3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

WORDS = """
What Which Where How Can Could Please Is Are Does Do It The This There Sure Yes No According From Choices Answer
you I me has have shows any all not
A B C D E is are was were be in on of the a an and or with without to for at by from as this that it its
image images scan scans volume slice slices plane mask segment segmentation segmented output provide show find
liver kidney kidneys spleen pancreas gallbladder stomach bladder lung lungs heart aorta brain bone bones spine rib
ribs colon bowel duodenum esophagus adrenal prostate uterus vessel vessels artery vein trachea
left right upper lower anterior posterior lateral medial central axial coronal sagittal
CT MRI contrast enhanced phase arterial venous delayed noncontrast
abnormality abnormal normal finding findings lesion lesions mass nodule nodules cyst cysts tumor stone stones
fracture effusion hemorrhage edema atrophy calcification dilation thickening enlargement opacity consolidation
small large mild moderate severe multiple single diffuse focal round irregular hypodense hyperdense
organ organs size shape density located appears seen visible present absent suggests indicates reveals
caption report describe diagnosis type , . ? : ; ( ) - /
"""


def run_git(git: list[str], *args: str) -> bytes:
    return subprocess.run([*git, *args], check=True, capture_output=True).stdout


# (file under LaMed/src/model/, exact text, replacement): each must match exactly once
def shims() -> list[tuple[str, str, str]]:
    tower = (f"            classification=True,\n            hidden_size={WIDTH}, mlp_dim={VIT['mlp_dim']}, "
             f"num_layers={VIT['num_layers']}, num_heads={VIT['num_heads']},\n        )\n")
    sam = "segmentation_module/segment_anything_volumetric/build_sam.py"
    return [
        ("multimodal_encoder/vit.py", "            pos_embed=pos_embed,\n", "            proj_type=pos_embed,\n"),
        ("multimodal_encoder/vit.py", "            classification=True,\n        )\n", tower),
        (sam, "        embed_dim=768,\n", f"        embed_dim={WIDTH},\n"),
        (sam, "    mlp_dim = 3072\n", f"    mlp_dim = {SEG_VIT['mlp_dim']}\n"),
        (sam, "    num_layers = 12\n", f"    num_layers = {SEG_VIT['num_layers']}\n"),
        (sam, "    num_heads = 12\n", f"    num_heads = {SEG_VIT['num_heads']}\n"),
        (sam, "        pos_embed=pos_embed,\n", "        proj_type=pos_embed,\n"),
        (sam, "                mlp_dim=2048,\n", f"                mlp_dim={DECODER['mlp_dim']},\n"),
        (sam, "            iou_head_hidden_dim=256,\n",
         f"            iou_head_hidden_dim={DECODER['iou_head_hidden_dim']},\n"),
        ("segmentation_module/segment_anything_volumetric/modeling/mask_decoder.py",
         "nn.Linear(768, 96)", f"nn.Linear({WIDTH}, {WIDTH // 8})"),
    ]


def write_m3d_package(git: list[str], root: Path) -> None:
    """M3D's `LaMed/src/model/` tree (with the shims) as the package `LaMed.src.model` under `root`."""
    prefix = "LaMed/src/model/"
    paths = run_git(git, "ls-tree", "-r", "--name-only", "HEAD", prefix).decode().split()
    texts = {path[len(prefix):]: run_git(git, "show", f"HEAD:{path}").decode()
             for path in paths if path.endswith(".py") and ".ipynb_checkpoints" not in path}
    for name, old, new in shims():
        count = texts[name].count(old)
        if count != 1:
            raise RuntimeError(f"shim for {name} matches {count} times, not once: {old!r}")
        texts[name] = texts[name].replace(old, new)
    for name, text in texts.items():
        path = root / prefix / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in [root / "LaMed", root / "LaMed/src", *(p for p in (root / prefix).rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch(exist_ok=True)


def import_m3d(root: Path) -> types.ModuleType:
    """Import M3D's `LaMed.src.model.language_model`, with torchvision stubbed while it imports."""

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is stubbed by make_lamed.py")

    stubs = {}
    for name, names in [("torchvision", []), ("torchvision.ops", []),
                        ("torchvision.ops.boxes", ["batched_nms", "box_area"]), ("torchvision.transforms", []),
                        ("torchvision.transforms.functional", ["resize", "to_pil_image"])]:
        module = types.ModuleType(name)
        for attribute in names:
            setattr(module, attribute, unavailable)
        stubs[name] = module
    stubs["torchvision"].ops = stubs["torchvision.ops"]
    stubs["torchvision.ops"].boxes = stubs["torchvision.ops.boxes"]
    stubs["torchvision"].transforms = stubs["torchvision.transforms"]
    stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    if "torchvision" in sys.modules:
        raise RuntimeError("a real torchvision is imported; this script stubs it")
    sys.path.insert(0, str(root))
    sys.modules.update(stubs)
    try:
        language_model = importlib.import_module("LaMed.src.model.language_model")
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    for cls in (language_model.LamedLlamaForCausalLM, language_model.LamedPhi3ForCausalLM):
        pass_cache_as_past_key_values(cls)
    return language_model


def pass_cache_as_past_key_values(cls: type) -> None:
    """transformers 5 generate hands the KV cache to `forward` as `cache` (formerly `past_key_values`, which M3D's
    `forward` takes and passes on to Llama's / Phi-3's `forward`, where it is still accepted); Phi-3's
    `prepare_inputs_for_generation` also always passes `logits_to_keep=0` (all logits), which M3D's `forward` does
    not take."""
    prepare = cls.prepare_inputs_for_generation

    @functools.wraps(prepare)  # generate reads its signature (`inputs_embeds`)
    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = prepare(self, *args, **kwargs)
        if "cache" in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
        if inputs.get("logits_to_keep", 0) != 0:
            raise RuntimeError("M3D's forward cannot keep only some logits")
        inputs.pop("logits_to_keep", None)
        return inputs

    cls.prepare_inputs_for_generation = prepare_inputs_for_generation


def between(text: str, start: str, end: str) -> str:
    """The dedented lines of `text` from the line holding `start` up to (not including) the line holding `end`."""
    lines = text.splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if start in line)
    last = next(i for i, line in enumerate(lines) if end in line and i > first)
    return textwrap.dedent("".join(lines[first:last]))


def base_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """The stand-in for Llama-2's / Phi-3's tokenizer, before M3D adds its tokens."""
    words = list(dict.fromkeys(WORDS.split()))
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    settings = dict(bos_token="<s>", unk_token="<unk>", model_max_length=LLM["max_position_embeddings"])
    if kind == "llama":
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", **settings)
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in PHI3_CHAT_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   chat_template=PHI3_CHAT_TEMPLATE, **settings)


def save_base_llm(kind: str, folder: Path) -> None:
    """A random tiny Llama-2 / Phi-3 with its tokenizer: what M3D's merge script loads as `model_name_or_path`."""
    tokenizer = base_tokenizer(kind)
    common = dict(LLM, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id)
    if kind == "llama":  # Llama-2-7b-chat's config.json: pretraining_tp 1, no pad
        config = LlamaConfig(**common, eos_token_id=tokenizer.eos_token_id, pretraining_tp=1, attention_bias=False,
                             rope_theta=10000.0)
        model = LlamaForCausalLM(config)
    else:  # Phi-3-mini-4k-instruct's: eos = pad = <|endoftext|>, sliding_window max - 1
        config = Phi3Config(**common, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            original_max_position_embeddings=LLM["max_position_embeddings"],
                            sliding_window=LLM["max_position_embeddings"] - 1, rope_theta=10000.0,
                            resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
        model = Phi3ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn anew: fan-in scaled normals, norm weights near 1, biases small."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in sorted(model.named_modules()):
            for name, parameter in sorted(module.named_parameters(recurse=False)):
                noise = torch.randn(parameter.shape, generator=generator)
                if "Norm" in type(module).__name__:
                    value = 1 + 0.1 * noise if name == "weight" else 0.1 * noise
                elif parameter.dim() == 1:
                    value = 0.1 * noise
                elif isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
                    value = noise / parameter[0].numel() ** 0.5
                else:  # embeddings, MONAI's position embeddings and CLS token
                    value = noise / parameter.shape[-1] ** 0.5
                parameter.copy_(value)


def legacy_config(folder: Path, kind: str) -> None:
    """config.json in the form transformers 4.39 wrote it, with the released repos' `auto_map`."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters", None) or {}
    if kind == "llama":  # LlamaConfig gained these after 4.39; None is the default 4.39 leaves out
        for key in ("head_dim", "mlp_bias"):
            config.pop(key)
        if config.get("pad_token_id", 0) is None:
            config.pop("pad_token_id")
    legacy = {}
    for key, value in config.items():
        if key == "dtype":
            key = "torch_dtype"
        legacy[key] = value
    legacy["rope_theta"] = rope.get("rope_theta", 10000.0)
    legacy["rope_scaling"] = None
    module = f"lamed_{kind}"
    names = ("LamedConfig", "LamedLlamaForCausalLM") if kind == "llama" else ("LamedPhi3Config", "LamedPhi3ForCausalLM")
    legacy["auto_map"] = {"AutoConfig": f"{module}.{names[0]}", "AutoModelForCausalLM": f"{module}.{names[1]}"}
    path.write_text(json.dumps(dict(sorted(legacy.items())), indent=2) + "\n")


def legacy_index(folder: Path) -> None:
    """The shard index as transformers 4.39 wrote it: its metadata holds `total_size` only."""
    path = folder / "model.safetensors.index.json"
    if path.exists():
        index = json.loads(path.read_text())
        index["metadata"] = {"total_size": index["metadata"]["total_size"]}
        path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def safetensors_to_bin(folder: Path) -> None:
    """Re-save the safetensors shards as transformers 4.39's `safe_serialization=False` names them."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    renamed = {}
    for shard in shards:
        name = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        if len(shards) == 1:
            name = "pytorch_model.bin"
        torch.save(load_file(folder / shard), folder / name)
        (folder / shard).unlink()
        renamed[shard] = name
    (folder / "model.safetensors.index.json").unlink()
    if len(shards) > 1:
        index["weight_map"] = {key: renamed[value] for key, value in index["weight_map"].items()}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def legacy_tokenizer_files(folder: Path, tokenizer) -> None:
    """tokenizer_config.json and special_tokens_map.json in the form transformers 4.39 wrote them (for a
    `PreTrainedTokenizerFast`): `additional_special_tokens` (transformers 5: `extra_special_tokens`),
    `added_tokens_decoder`, and none of transformers 5's `backend`, `is_local`, `local_files_only`."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in ("backend", "is_local", "local_files_only"):
        config.pop(key, None)
    additional = config.pop("extra_special_tokens", [])
    named = {key: config[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(key)}
    config.update(
        additional_special_tokens=additional, tokenizer_class="PreTrainedTokenizerFast",
        clean_up_tokenization_spaces=False,
        added_tokens_decoder={str(i): dict(content=t.content, lstrip=t.lstrip, normalized=t.normalized,
                                           rstrip=t.rstrip, single_word=t.single_word, special=t.special)
                              for i, t in sorted(tokenizer.added_tokens_decoder.items())})
    path.write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps(dict(sorted(named.items()), additional_special_tokens=additional), indent=2) + "\n")


class ForceAnswer(LogitsProcessor):
    """Every score -inf but the next token of a fixed answer."""

    def __init__(self, token_ids: list[int]):
        self.token_ids = token_ids
        self.step = 0

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -torch.inf)
        forced[:, self.token_ids[min(self.step, len(self.token_ids) - 1)]] = 0
        self.step += 1
        return forced


def build(kind: str, language_model: types.ModuleType, merge_source: str, work: Path, target: Path) -> dict:
    """Run M3D's merge script's preparation and save blocks; `target` gets the released-layout folder. Returns the
    state dict."""
    namespace = {"dataclass": dataclass, "field": field, "Optional": Optional}
    arguments = between(merge_source, "class ModelArguments", "class TrainingArguments").rstrip()
    exec("@dataclass\n" + arguments.removesuffix("@dataclass"), namespace)
    # the paths M3D's scripts use (finetune_lora_*.sh, the merge script's default), relative to `work`
    base = "./LaMed/pretrained_model/llama-2-7b-chat" if kind == "llama" else "microsoft/Phi-3-mini-4k-instruct"
    output = ("./LaMed/output/LaMed-finetune-0000/hf/" if kind == "llama"
              else "./LaMed/output/LaMed-Phi3-4B-finetune-0000/hf/")
    save_base_llm(kind, work / base)
    model_args = namespace["ModelArguments"](
        model_name_or_path=base, model_type="llama2" if kind == "llama" else "phi3",
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, proj_pooling_size=POOLING_SIZE, segmentation_module="segvol")
    training_args = types.SimpleNamespace(cache_dir=None, output_dir=output, lora_enable=False)
    scope = dict(AutoTokenizer=AutoTokenizer, LamedLlamaForCausalLM=language_model.LamedLlamaForCausalLM,
                 LamedPhi3ForCausalLM=language_model.LamedPhi3ForCausalLM, model_args=model_args,
                 training_args=training_args, os=os, torch=torch)
    torch.manual_seed(SEED)
    exec(between(merge_source, 'print("Tokenizer preparation")', "if training_args.lora_enable:"), scope)
    model, tokenizer = scope["model"], scope["tokenizer"]
    randomize(model, SEED)
    save = between(merge_source, "model.model.config.architectures = ", 'print("Finish")')
    shard_size = LLAMA_SHARD_SIZE if kind == "llama" else PHI3_SHARD_SIZE
    for old, new in [("model.save_pretrained(training_args.output_dir)",
                      f"model.save_pretrained(training_args.output_dir, max_shard_size={shard_size!r})"),
                     ("tokenizer.save_pretrained(training_args.output_dir)",
                      "tokenizer.save_pretrained(training_args.output_dir, save_jinja_files=False)")]:
        if save.count(old) != 1:
            raise RuntimeError(f"M3D's save block changed: {old!r}")
        save = save.replace(old, new)
    output = work / output
    output.mkdir(parents=True, exist_ok=True)
    exec(save, scope)
    legacy_config(output, kind)
    legacy_tokenizer_files(output, tokenizer)
    legacy_index(output)
    if kind == "phi3":
        safetensors_to_bin(output)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(output, target)
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def reference(kind: str, language_model: types.ModuleType, folder: Path, state_dict: dict, commit: str) -> None:
    """M3D's outputs on the saved folder, loaded back with M3D's classes."""
    cls = language_model.LamedLlamaForCausalLM if kind == "llama" else language_model.LamedPhi3ForCausalLM
    model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    loaded = model.state_dict()
    if loaded.keys() != state_dict.keys() or any(not torch.equal(loaded[k], state_dict[k]) for k in state_dict):
        raise RuntimeError(f"{folder} does not load back into M3D's {cls.__name__} unchanged")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)  # config.json has an auto_map
    added = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer) - len(M3D_TOKENS), len(tokenizer))))
    if added != M3D_TOKENS or model.config.vocab_size != len(tokenizer):
        raise RuntimeError(f"M3D's tokens are not the last ones of the vocab: {added}")
    num_image_tokens = model.get_model().mm_projector.proj_out_num
    image_tokens = "<im_patch>" * num_image_tokens
    generator = torch.Generator().manual_seed(SEED)
    image = torch.rand((1, 1, *IMAGE_SIZE), generator=generator)
    input_ids = tokenizer(image_tokens + " " + QUESTION, return_tensors="pt")["input_ids"]
    seg_prompt_ids = tokenizer(image_tokens + " " + SEG_QUESTION, return_tensors="pt")["input_ids"]
    forced = tokenizer(FORCED_ANSWER, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    texts = forced + input_ids[0].tolist() + seg_prompt_ids[0].tolist()
    if forced.index(model.config.seg_token_id) < 1 or tokenizer.unk_token_id in texts:
        raise RuntimeError("the forced answer must hold [SEG] after its first token, and no text may be <unk>")
    seen = {}
    hook = model.get_model().seg_projector.register_forward_hook(
        lambda module, inputs, output: seen.update(hidden=inputs[0].clone(), prompt=output.clone()))
    with torch.no_grad():
        logits = model(images=image, input_ids=input_ids).logits
        greedy_ids = model.generate(image, input_ids, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS,
                                    do_sample=False)
        seg_answer_ids, seg_mask_logits = model.generate(
            image, seg_prompt_ids, seg_enable=True, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
            logits_processor=LogitsProcessorList([ForceAnswer(forced)]))
        # the docstring's claim: the seg projector gets the last-layer state of the token before [SEG]
        before_seg = seg_answer_ids[:, :forced.index(model.config.seg_token_id)]
        states = model(images=image, input_ids=torch.cat([seg_prompt_ids, before_seg], dim=1),
                       output_hidden_states=True).hidden_states[-1]
    hook.remove()
    if not torch.allclose(states[:, -1], seen["hidden"], atol=1e-5):
        raise RuntimeError("M3D's seg projector input is not the state of the token before [SEG]")
    if greedy_ids.shape != (1, MAX_NEW_TOKENS) or seg_answer_ids[0].tolist() != forced:
        raise RuntimeError(f"unexpected generations: {greedy_ids.tolist()} {seg_answer_ids.tolist()}")
    tensors = dict(image=image, input_ids=input_ids, logits=logits, greedy_ids=greedy_ids,
                   seg_prompt_ids=seg_prompt_ids, seg_answer_ids=seg_answer_ids, seg_mask_logits=seg_mask_logits,
                   seg_hidden_state=seen["hidden"], seg_prompt=seen["prompt"])
    metadata = {
        "made_by": SCRIPT, "BAAI-DCAI/M3D": commit, "model_class": cls.__name__,
        "image_size": json.dumps(IMAGE_SIZE), "patch_size": json.dumps(PATCH_SIZE),
        "proj_pooling_size": str(POOLING_SIZE), "num_image_tokens": str(num_image_tokens),
        "question": QUESTION, "seg_question": SEG_QUESTION, "forced_answer": FORCED_ANSWER,
        "max_new_tokens": str(MAX_NEW_TOKENS), "image_token_id": str(tokenizer.convert_tokens_to_ids("<im_patch>")),
        "seg_token_id": str(model.config.seg_token_id), "vocab_size": str(model.config.vocab_size),
        "sizes": json.dumps(dict(vision=dict(hidden_size=WIDTH, **VIT), seg_vision=dict(hidden_size=WIDTH, **SEG_VIT),
                                 seg_decoder=dict(hidden_size=WIDTH, **DECODER, **DECODER_KEPT), llm=LLM)),
    }
    save_sorted({k: v.contiguous() for k, v in tensors.items()}, HERE / f"lamed_{kind}_reference.safetensors",
                metadata)


def save_sorted(tensors: dict, path: Path, metadata: dict) -> None:
    """`save_file`, with the JSON header's keys sorted: safetensors writes them in hash-map order, which changes from
    run to run, so the same tensors would give different bytes."""
    save_file(tensors, path, metadata=metadata)
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.dumps(json.loads(raw[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    if len(header) > size:
        raise RuntimeError("the sorted safetensors header does not fit")
    path.write_bytes(raw[:8] + header.ljust(size) + raw[8 + size:])


def constants(commit: str) -> dict:
    """Numbers hard-coded in M3D that the weights' shapes and config.json do not tell."""
    rows = {  # name: (value used here, M3D's value, where)
        "ViT3DTower.num_heads": (VIT["num_heads"], 12, "multimodal_encoder/vit.py: ViT3DTower builds ViT with its "
                                                      "default num_heads=12"),
        "ViT3DTower.dropout_rate": (0.0, 0.0, "multimodal_encoder/vit.py: ViT default"),
        "ViT3DTower.qkv_bias": (False, False, "multimodal_encoder/vit.py: ViT default (no qkv bias key)"),
        "ViT3DTower.mlp_act": ("GELU", "GELU", "MONAI TransformerBlock -> MLPBlock default act"),
        "ViT3DTower.layer_norm_eps": (1e-5, 1e-5, "torch.nn.LayerNorm default in MONAI's blocks and ViT.norm"),
        "ViT3DTower.pos_embed": ("perceptron", "perceptron", "multimodal_encoder/vit.py: ViT3DTower"),
        "_build_sam.num_heads": (SEG_VIT["num_heads"], 12, "segment_anything_volumetric/build_sam.py: SegVol's "
                                                           "MONAI ViT"),
        "_build_sam.dropout_rate": (0.0, 0.0, "build_sam.py"),
        "_build_sam.pos_embed": ("perceptron", "perceptron", "build_sam.py (MONAI ViT, classification=False)"),
        "_build_sam.qkv_bias": (False, False, "MONAI ViT default"),
        "TwoWayTransformer.num_heads": (DECODER_KEPT["num_heads"], 8, "build_sam.py: TwoWayTransformer(num_heads=8)"),
        "TwoWayTransformer.attention_downsample_rate": (2, 2, "transformer.py default (q_proj out = width // 2)"),
        "TwoWayTransformer.mlp_act": ("ReLU", "ReLU", "transformer.py: TwoWayTransformer default activation"),
        "MaskDecoder.num_multimask_outputs": (3, 3, "build_sam.py (mask_tokens rows = 3 + 1)"),
        "MaskDecoder.iou_head_depth": (3, 3, "build_sam.py"),
        "MaskDecoder.upscaling_act": ("GELU", "GELU", "mask_decoder.py: MaskDecoder default activation"),
        "MaskDecoder.hypernetwork_mlp_depth": (3, 3, "mask_decoder.py: MLP(..., 3)"),
        "MaskDecoder.txt_align_upscaled_embedding": ([WIDTH, WIDTH // 8], [768, 96],
                                                     "mask_decoder.py: nn.Linear(768, 96), width -> width // 8"),
        "MaskDecoder.multimask_output": (False, False, "segvol.py: forward_decoder keeps mask 0 of 4"),
        "SegVol.interpolation": ("trilinear, align_corners=False", "trilinear, align_corners=False",
                                 "segvol.py: F.interpolate of the low-res masks to the image size"),
        "PromptEncoder.mask_in_chans": (16, 16, "build_sam.py (unused mask downscaling convs)"),
        "PositionEmbeddingRandom.num_pos_feats": (WIDTH // 2, 384, "prompt_encoder.py: embed_dim // 2 (its Gaussian "
                                                                   "matrix is a saved buffer)"),
        "LayerNorm2d.eps": (1e-6, 1e-6, "common.py (prompt encoder's unused mask downscaling)"),
        "seg_projector.dropout": (0.1, 0.1, "lamed_arch.py: Linear, ReLU, Linear, Dropout(0.1); eval: none"),
        "seg_projector.act": ("ReLU", "ReLU", "lamed_arch.py"),
        "SpatialPoolingProjector.mlp_act": ("GELU", "GELU", "spatial_pooling_projector.py (proj_layer_type=mlp)"),
    }
    return {
        "made_by": SCRIPT,
        "BAAI-DCAI/M3D": commit,
        "values": {name: row[0] for name, row in rows.items()},
        "m3d_values": {name: row[1] for name, row in rows.items()},
        "where": {name: row[2] for name, row in rows.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m3d", required=True, help="git directory of BAAI-DCAI/M3D")
    args = parser.parse_args()
    git = ["git", f"--git-dir={os.path.abspath(args.m3d)}"]
    commit = run_git(git, "rev-parse", "HEAD").decode().strip()
    merge_source = run_git(git, "show", "HEAD:LaMed/src/utils/merge_lora_weights_and_save_hf_model.py").decode()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "m3d"
        write_m3d_package(git, root)
        language_model = import_m3d(root)
        for kind in ("llama", "phi3"):
            work = Path(scratch) / kind
            work.mkdir()
            here = os.getcwd()
            os.chdir(work)  # M3D's scripts use relative paths
            try:
                state_dict = build(kind, language_model, merge_source, work, HERE / f"lamed_{kind}")
            finally:
                os.chdir(here)
            reference(kind, language_model, HERE / f"lamed_{kind}", state_dict, commit)
    (HERE / "m3d_constants.json").write_text(json.dumps(constants(commit), indent=2) + "\n")


if __name__ == "__main__":
    main()
