"""Writes `dcformer_siglip/` (a tiny Med3DVLM DCFormer-SigLIP, `model_type` `dec_clip`, in the released layout) and
`reference.safetensors` (its inputs and the outputs Med3DVLM's own `DEC_CLIP` gives for them).

    HF_HUB_OFFLINE=1 python tests/dcformer_siglip/make_dcformer_siglip.py --med3dvlm /work/src/Med3DVLM

MED3DVLM is a checkout of github mirthAI/Med3DVLM (MIT licence; the commit is saved in the reference file's
metadata, cbbd6335a64370f829710a1412e46afc68f243ff when this was written). Its `src/model/CLIP.py`,
`src/model/encoder/dcformer.py`, `vit.py` and `src/model/projector/mlp.py` run unchanged (torch 2.13, transformers
5.24, einops; no package to install). The shims, all outside Med3DVLM's files:

- `timm.layers` is a stub module: dcformer.py imports `DropPath`, `to_3tuple` and `trunc_normal_` from it, and calls
  only `to_3tuple` (in a branch the model never takes) and `DropPath` for a drop rate > 0 (it is 0); installing timm
  would pull in torchvision;
- `DEC_CLIP` always builds `decomp_small` (the released 64 -> 768 channels): the module-level name is replaced by a
  `DecompModel` at tiny widths (channels 8, 8, 16, 16, 24; blocks 1, 1, 2, 1, 1; dcformer.py's kernel sizes
  13, 11, 9, 7), Med3DVLM's own class;
- `DEC_CLIP.forward` gathers features with `torch.distributed.nn` when a process group exists, as deepspeed training
  (scripts/train_clip.sh) always has: a one-process gloo group makes it take that branch, where the SigLIP logits are
  `cosines * exp(t_prime) + bias` (without a group it multiplies by `t_prime` itself).

The text encoder is a tiny random `DistilBertModel` (the release's `medicalai/ClinicalBERT` is a DistilBERT; it is
saved first, since DEC_CLIP loads it with `AutoModel.from_pretrained(language_model_name_or_path)`) with a ~100-word
WordPiece tokenizer. Every parameter then gets seeded noise, the layer scales (1e-6 at init) and the BatchNorm
running statistics too, so that a wrong key or axis shows. The folder is saved as train_clip.py saves a release:
`model.save_pretrained` (config.json with DEC_CLIPConfig's and train_clip.py ModelArguments' fields, with the
ClinicalBERT Hub id and scripts/train_clip.sh's settings, + model.safetensors), then the tokenizer.

Volumes are (B, 1, D, H, W) in [0, 1], as clip_dataset.py reads them (SimpleITK array (D, H, W), channel first);
here 16 x 32 x 96, so every stage has a different token grid. Reports are tokenized as clip_dataset.py does:
`max_length=512` (scripts/train_clip.sh), `truncation=True`, `padding="max_length"`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).parent
MAX_LENGTH = 512  # scripts/train_clip.sh --max_length
RELEASED_TEXT_MODEL = "medicalai/ClinicalBERT"  # scripts/train_clip.sh --language_model_name_or_path
TINY_CHANNELS = [8, 8, 16, 16, 24]
TINY_BLOCKS = [1, 1, 2, 1, 1]
VOLUME = (16, 32, 96)  # (D, H, W)
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


def import_med3dvlm_dcformer(root: Path):
    """Med3DVLM's `src.model.encoder.dcformer` (its checkout `root` on `sys.path`, a stub `timm.layers`), and
    `decomp_tiny`: its `DecompModel` at the tiny widths, to stand in for `decomp_small`."""
    layers = types.ModuleType("timm.layers")
    layers.DropPath = torch.nn.Dropout  # never built: drop_path is 0
    layers.to_3tuple = lambda x: (x, x, x)
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    sys.modules["timm"] = types.ModuleType("timm")
    sys.modules["timm.layers"] = layers
    sys.path.insert(0, str(root))
    dcformer = importlib.import_module("src.model.encoder.dcformer")

    def decomp_tiny(input_size):
        return dcformer.DecompModel(input_size=input_size, num_blocks=TINY_BLOCKS, channels=TINY_CHANNELS)

    return dcformer, decomp_tiny


def import_med3dvlm_clip(root: Path):
    """Med3DVLM's `src.model.CLIP`, with a stub `timm.layers` and `decomp_small` at the tiny widths."""
    _, decomp_tiny = import_med3dvlm_dcformer(root)
    clip = importlib.import_module("src.model.CLIP")
    clip.decomp_small = decomp_tiny
    return clip


def tiny_distilbert(folder: Path) -> None:
    """A random 32-wide DistilBERT and its WordPiece tokenizer, saved to `folder`."""
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *PUNCTUATION, *WORDS, *SUBWORDS]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    DistilBertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    config = DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                              max_position_embeddings=MAX_LENGTH)
    DistilBertModel(config).save_pretrained(folder)


def randomise(model: torch.nn.Module) -> None:
    """Seeded noise on every parameter and BatchNorm statistic; layer scales of order 1."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".scale"):
                parameter.copy_(0.5 * torch.randn_like(parameter))
            else:
                parameter.add_(0.05 * torch.randn_like(parameter))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.copy_(0.1 * torch.randn_like(module.running_mean))
                module.running_var.copy_(torch.empty_like(module.running_var).uniform_(0.5, 1.5))


def med3dvlm_checkout(description: str) -> tuple[str, str]:
    """The `--med3dvlm` checkout given on the command line and its commit."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--med3dvlm", required=True, help="checkout of mirthAI/Med3DVLM")
    root = parser.parse_args().med3dvlm
    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    return root, commit


def main() -> None:
    root, commit = med3dvlm_checkout(__doc__.splitlines()[0])
    from transformers import AutoTokenizer

    release = HERE / "dcformer_siglip"
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        clip = import_med3dvlm_clip(Path(root))
        torch.distributed.init_process_group("gloo", init_method=f"file://{scratch / 'group'}", rank=0, world_size=1)
        torch.manual_seed(0)
        tiny_distilbert(scratch / "text")
        # train_clip.py: DEC_CLIPConfig.from_dict(vars(model_args)), with scripts/train_clip.sh's arguments.
        config = clip.DEC_CLIPConfig.from_dict(dict(
            wb_name="DCFormer_SigLIP", language_model_name_or_path=str(scratch / "text"), efficient_loss=False,
            gather_loss=True, local_loss=False, pretrained_model=None, input_size=(VOLUME[1], VOLUME[2], VOLUME[0]),
            dim=768, depth=12, hidden_size=20, mlp_depth=2, vision_encoder="dcformer", loss_type="sigmoid",
            siglip_margin=0.1,
        ))
        model = clip.DEC_CLIP(config).eval()
        randomise(model)
        with torch.no_grad():
            model.bias.fill_(-1.5)
        model.config.language_model_name_or_path = RELEASED_TEXT_MODEL
        model.save_pretrained(release)
        tokenizer = AutoTokenizer.from_pretrained(scratch / "text")
        tokenizer.save_pretrained(release)

        tokens = [tokenizer(text, max_length=MAX_LENGTH, truncation=True, padding="max_length", return_tensors="pt")
                  for text in REPORTS]
        input_ids = torch.cat([t["input_ids"] for t in tokens])  # (B, 512)
        attention_mask = torch.cat([t["attention_mask"] for t in tokens])  # (B, 512)
        pixel_values = torch.rand(len(REPORTS), 1, *VOLUME)  # (B, 1, D, H, W), in [0, 1]
        with torch.no_grad():
            stages = model.vision_encoder(pixel_values)  # 5 x (B, N_i, C_i)
            image_embeds = model.encode_image(pixel_values)  # (B, P)
            text_embeds = model.encode_text(input_ids, attention_mask)  # (B, P)
            output = model(pixel_values, input_ids, attention_mask, labels=None)
        torch.distributed.destroy_process_group()
    tensors = {
        "pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask,
        "image_embeds": image_embeds, "text_embeds": text_embeds, "loss": output["loss"],
        "logits": output["logits"],  # (logits_per_image + logits_per_text) / 2, SigLIP's exp(t_prime) and bias
        **{f"hidden_states.{i}": stage for i, stage in enumerate(stages)},
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, HERE / "reference.safetensors", metadata={
        "made_by": "tests/dcformer_siglip/make_dcformer_siglip.py", "mirthAI/Med3DVLM": commit,
        "reports": json.dumps(REPORTS), "max_length": str(MAX_LENGTH),
    })


if __name__ == "__main__":
    main()
