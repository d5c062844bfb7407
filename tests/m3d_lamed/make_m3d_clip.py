"""Writes `m3d_clip/` (a tiny M3D-CLIP in the released layout) and `m3d_clip_reference.safetensors` (inputs and the
outputs M3D's own `M3DCLIP` gives for them).

    python tests/m3d_lamed/make_m3d_clip.py --m3d M3D_GIT

M3D_GIT is a git directory of BAAI-DCAI/M3D (e.g. `/work/.mirror/BAAI-DCAI+M3D/repo`, MIT licence); its
`LaMed/src/model/CLIP.py`, `LaMed/src/model/multimodal_encoder/vit.py` and `LaMed/src/utils/dist_utils.py` are read
from HEAD (the commit is saved in the reference file's metadata) into a temporary `LaMed` package and run unchanged.
The shims, all outside M3D's files:

- the package's `__init__.py` files are empty: M3D's `LaMed/src/model/__init__.py` imports its LLM classes, which
  CLIP needs not;
- MONAI 1.5 renamed `PatchEmbeddingBlock(pos_embed=...)` (the patch projection type) to `proj_type`: vit.py's
  module-level `PatchEmbeddingBlock` name is replaced by a wrapper that passes M3D's `pos_embed` on as `proj_type`;
- `M3DCLIP.forward` gathers features with `dist_utils.gather_features` (`torch.distributed.nn.all_gather`): a
  one-process gloo group makes it run as M3D's training would on one GPU.

The model is M3D's `M3DCLIP` at the tiny test sizes (tests/tiny_models.py: volume 1 x 8 x 16 x 16, patch 2 x 4 x 4,
width 32, 2 layers, 4 heads), with a tiny random `BertModel` (saved first, since M3DCLIP loads its text encoder with
`BertModel.from_pretrained(config.language_model_name_or_path)`) and a ~100-word WordPiece tokenizer. Every parameter
then gets seeded noise, so that LayerNorms, biases and the (zero-initialised) CLS token all change the outputs and a
wrong key mapping shows. The folder is saved as `train_CLIP.py` saves a release: `model.save_pretrained`, then the
tokenizer files that its transformers 4.x `BertTokenizer` wrote (`vocab.txt`, `tokenizer_config.json`). Its config
keeps the BERT path of `LaMed/script/train_clip.sh` (a path on the trainer's machine, as the release's is) and an
`auto_map` to remote code, as a Hub release that loads with `trust_remote_code=True` carries (the file names in it
are assumed: converters must not follow it).

Reports are tokenized as `LaMed/src/dataset/multi_dataset.py` `ITRDataset` does: `max_length=512` (the `max_length`
of `train_CLIP.py`'s DataArguments and of `Bench/eval/eval_itr.py`; the config's `max_text_len` is never read),
`truncation=True`, `padding="max_length"`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).parent
M3D_FILES = ("LaMed/src/model/CLIP.py", "LaMed/src/model/multimodal_encoder/vit.py", "LaMed/src/utils/dist_utils.py")
RELEASED_BERT_PATH = "./LaMed/pretrained_model/bert_base_uncased"  # LaMed/script/train_clip.sh
MAX_LENGTH = 512  # ITRDataset's `args.max_length` in training and in Bench/eval/eval_itr.py
REPORTS = [
    "There is a small hypodense lesion in the left lobe of the liver.",
    "No acute intracranial abnormality. The ventricles are normal in size.",
]
WORDS = (
    "there is a an the of in on to with no and are be small large left right lobe liver lesion lesions hypodense "
    "hyperdense mass acute chronic intracranial abnormality ventricles ventricle normal size brain ct scan kidney "
    "lung nodule nodules fracture bleeding hemorrhage subdural edema enhancement contrast wall thickening fluid cyst "
    "cysts stone stones bowel spleen pancreas gallbladder bladder aorta artery vein heart chest abdomen pelvis head "
    "neck spine bone soft tissue findings impression seen noted"
).split()
SUBWORDS = ["##s", "##ed", "##ing", "##al", "##ly", "##er", "##ion", "##ic", "##ous", "##ity"]
PUNCTUATION = [".", ",", ":", ";", "-", "(", ")"]


def m3d_package(git: list[str], root: Path) -> None:
    """M3D's three files under `root/LaMed/...`, with empty `__init__.py` files on the way."""
    for name in M3D_FILES:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(subprocess.run([*git, "show", f"HEAD:{name}"], check=True, capture_output=True).stdout)
    for folder in ("LaMed", "LaMed/src", "LaMed/src/model", "LaMed/src/model/multimodal_encoder", "LaMed/src/utils"):
        (root / folder / "__init__.py").touch()


def import_m3d_clip(root: Path):
    """M3D's CLIP module, with vit.py's `PatchEmbeddingBlock` taking M3D's `pos_embed` (MONAI < 1.5's name)."""
    from monai.networks.blocks.patchembedding import PatchEmbeddingBlock

    sys.path.insert(0, str(root))
    vit = importlib.import_module("LaMed.src.model.multimodal_encoder.vit")

    def patch_embedding_block(*args, pos_embed, **kwargs):
        return PatchEmbeddingBlock(*args, proj_type=pos_embed, **kwargs)

    vit.PatchEmbeddingBlock = patch_embedding_block
    return importlib.import_module("LaMed.src.model.CLIP")


def tiny_bert(folder: Path):
    """A random 32-wide BERT and its WordPiece tokenizer, saved to `folder` (what `language_model_name_or_path`
    names)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *PUNCTUATION, *WORDS, *SUBWORDS]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=MAX_LENGTH)
    BertModel(config).save_pretrained(folder)
    return len(vocab)


def save_released_tokenizer(bert: Path, release: Path) -> None:
    """The tokenizer files of a release saved with transformers 4.x's (slow) `BertTokenizer`: `vocab.txt` and a
    `tokenizer_config.json` (bert-base-uncased's `model_max_length`), without the `tokenizer.json` that today's
    `save_pretrained` writes, so that converters read the vocabulary file as they must for the real release."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(bert).save_pretrained(release)
    (release / "tokenizer.json").unlink()
    (release / "vocab.txt").write_bytes((bert / "vocab.txt").read_bytes())
    settings = json.loads((release / "tokenizer_config.json").read_text())
    for loading_only in ("backend", "is_local", "local_files_only"):
        settings.pop(loading_only, None)
    settings["model_max_length"] = MAX_LENGTH
    (release / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m3d", required=True, help="git directory of BAAI-DCAI/M3D")
    args = parser.parse_args()
    git = ["git", f"--git-dir={args.m3d}"]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    from transformers import AutoTokenizer

    release = HERE / "m3d_clip"
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        m3d_package(git, scratch)
        clip = import_m3d_clip(scratch)
        torch.distributed.init_process_group("gloo", init_method=f"file://{scratch / 'group'}", rank=0, world_size=1)
        torch.manual_seed(0)
        vocab_size = tiny_bert(scratch / "bert")
        config = clip.M3DCLIPConfig(
            language_model_name_or_path=str(scratch / "bert"), img_size=(8, 16, 16), patch_size=(2, 4, 4),
            hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4, vocab_size=vocab_size,
        )
        model = clip.M3DCLIP(config).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        model.config.language_model_name_or_path = RELEASED_BERT_PATH
        model.config.auto_map = {"AutoConfig": "configuration_m3d_clip.M3DCLIPConfig",
                                 "AutoModel": "modeling_m3d_clip.M3DCLIP"}
        model.save_pretrained(release)
        save_released_tokenizer(scratch / "bert", release)

        # Bench/eval/eval_itr.py loads the tokenizer from the release this way, then ITRDataset calls it per report.
        tokenizer = AutoTokenizer.from_pretrained(release, model_max_length=MAX_LENGTH, padding_side="right")
        tokens = [tokenizer(text, max_length=MAX_LENGTH, truncation=True, padding="max_length", return_tensors="pt")
                  for text in REPORTS]
        input_ids = torch.cat([t["input_ids"] for t in tokens])  # (B, 512)
        attention_mask = torch.cat([t["attention_mask"] for t in tokens])  # (B, 512)
        pixel_values = torch.rand(len(REPORTS), 1, 8, 16, 16)  # M3D's volumes are normalised to [0, 1]
        with torch.no_grad():
            image_features = model.encode_image(pixel_values)  # (B, 1 + N, E)
            text_features = model.encode_text(input_ids, attention_mask)  # (B, 512, E)
            output = model(pixel_values, input_ids, attention_mask, labels=torch.arange(len(REPORTS)))
        torch.distributed.destroy_process_group()
    tensors = {
        "pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask,
        "image_features": image_features, "text_features": text_features,
        "image_embeds": image_features[:, 0], "text_embeds": text_features[:, 0],  # eval_itr.py's `[:, 0]`
        "loss": output["loss"], "logits": output["logits"],
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, HERE / "m3d_clip_reference.safetensors", metadata={
        "made_by": "tests/m3d_lamed/make_m3d_clip.py", "BAAI-DCAI/M3D": commit, "reports": json.dumps(REPORTS),
        "max_length": str(MAX_LENGTH),
    })


if __name__ == "__main__":
    main()
