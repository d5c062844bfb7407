"""Writes `hlip_tiny/` (a tiny HLIP in the released open_clip layout), `tiny_overrides.json` (the HLIP model
arguments of the tiny size) and `reference.safetensors` (inputs and the embeddings HLIP's own code gives for them).

    python -m venv --system-site-packages /work/venvs/hlip
    /work/venvs/hlip/bin/pip install --no-deps timm==1.0.15 open_clip_torch==2.32.0
    /work/venvs/hlip/bin/python tests/hlip/make_hlip.py --hlip /work/src/hlip

`--hlip` is a checkout of Zch0414/hlip (MIT licence; tested at fe8d764fd4863e1040a39bfae8eb0b05f6d94fc9, saved in the
reference file's metadata). Its `src/hlip/visual_encoder.py`, `pos_embed.py` and `patch_embed.py` run unchanged, as
an `hlip` package; torchvision, which open_clip and timm import for image transforms only, is a stub module (never
installed).

The model is HLIP's `vit_base_multiscan_h3_token1176` timm function called with `TINY` (HLIP's own field names, the
same dict `tiny_overrides.json` holds for the converter): volume 4 x 16 x 16 per scan, patch 2 x 8 x 8, width 48,
7 layers whose slice / scan / study assignment makes every one of HLIP's six regroupings run (and a last slice layer,
merged into the study at the end), 2 heads, 2 register tokens, `pre_norm`, up to 4 scans; inside open_clip's
`CustomTextCLIP` with a timm `token` pool + `linear` projection to 32, and an `HFTextEncoder` over a tiny random
BERT (64 wide, 1 head, 2 layers; `cls_last_hidden_state_pooler`, `linear` projection). Every parameter then gets
seeded noise, so that a wrong key mapping shows. Saved as the Hub releases are (open_clip's `push_to_hf_hub`):
`open_clip_config.json` ({"model_cfg": ..., "preprocess_cfg": ...}, the model config naming HLIP's timm function and
BiomedBERT, as the released ones do) and `open_clip_model.safetensors`, plus the tiny BERT's WordPiece `vocab.txt`.

Inputs: a 2-scan study (1, 2, 1, 4, 16, 16) and a 1-scan volume (1, 1, 1, 6, 16, 16), whose 3 x 2 x 2 grid makes
HLIP resample its position table; two reports tokenized at `context_length` 16 (padding="max_length", truncation).
Outputs: `encode_image` / `encode_text` (open_clip's, `normalize=False`) and `logit_scale`.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
TINY = dict(
    img_size=[4, 16, 16], patch_size=[2, 8, 8], embed_dim=48, depth=7, num_heads=2, reg_tokens=2, pre_norm=True,
    max_num_scans=4, slice_attn_indexes=[0, 2, 6], scan_attn_indexes=[3, 5], study_attn_indexes=[1, 4],
)
BERT = dict(vocab_size=0, hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128,
            max_position_embeddings=32)
WORDS = ("no acute findings the lungs are clear there is a small nodule in right upper lobe left lower effusion "
         "pleural heart size normal mild emphysema consolidation opacity ground glass").split()
REPORTS = ["There is a small nodule in the right upper lobe.", "No acute findings; the lungs are clear."]
CONTEXT_LENGTH = 16


class _Anything(type):
    """A class whose every attribute is another such class: torchvision names open_clip / timm touch at import."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `torchvision` and its submodules as empty modules that answer any attribute."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda name: getattr(_Anything("torchvision", (), {}), name)
        return module

    def exec_module(self, module):
        pass


def build_source(hlip_root: Path, workdir: Path):
    """HLIP's CustomTextCLIP at the tiny size, seeded, eval mode."""
    sys.meta_path.insert(0, _StubFinder())
    sys.path.insert(0, str(hlip_root / "src"))
    import open_clip
    from timm.models import register_model

    from hlip import visual_encoder

    @register_model
    def hlip_tiny_test(pretrained=False, **kwargs):
        return visual_encoder.vit_base_multiscan_h3_token1176(pretrained=False, **dict(TINY, **kwargs))

    from transformers import BertConfig, BertModel, BertTokenizer

    bert_dir = workdir / "bert"
    bert_dir.mkdir()
    (bert_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ";", ","]
                                                  + WORDS) + "\n")
    tokenizer = BertTokenizer(str(bert_dir / "vocab.txt"))
    # HFTextEncoder loads the BERT with `from_pretrained` (open_clip's `hf_model_pretrained` default).
    torch.manual_seed(0)
    BertModel(BertConfig(**dict(BERT, vocab_size=len(tokenizer))), add_pooling_layer=False).save_pretrained(bert_dir)
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "hlip_tiny_test", "timm_model_pretrained": False, "timm_drop_path": 0.2,
                       "timm_pool": "token", "timm_proj": "linear"},
        "text_cfg": {"hf_model_name": str(bert_dir), "hf_tokenizer_name": str(bert_dir),
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "hf_proj_type": "linear",
                     "context_length": CONTEXT_LENGTH},
    }
    (workdir / "hlip-tiny.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(workdir / "hlip-tiny.json")
    torch.manual_seed(0)
    model = open_clip.create_model("hlip-tiny", pretrained=None)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "logit_scale":
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
        model.logit_scale.fill_(2.5)
    return model.eval(), model_cfg, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hlip", type=Path, required=True, help="a checkout of Zch0414/hlip")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(args.hlip), "log", "-1", "--format=%H"], capture_output=True,
                            text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        model, model_cfg, tokenizer = build_source(args.hlip.resolve(), Path(tmp))
        generator = torch.Generator().manual_seed(2)
        study = torch.randn(1, 2, 1, 4, 16, 16, generator=generator)  # (B, S, C, D, H, W)
        volume = torch.randn(1, 1, 1, 6, 16, 16, generator=generator)
        tokens = tokenizer(REPORTS, max_length=CONTEXT_LENGTH, padding="max_length", truncation=True,
                           return_tensors="pt")
        with torch.no_grad():
            outputs = {
                "study": study, "volume": volume, "input_ids": tokens["input_ids"],
                "study_embeds": model.encode_image(study), "volume_embeds": model.encode_image(volume),
                "text_embeds": model.encode_text(tokens["input_ids"]), "logit_scale": model.logit_scale.detach(),
            }
        folder = HERE / "hlip_tiny"
        folder.mkdir(exist_ok=True)
        # The released configs name HLIP's timm function and BiomedBERT's Hub id; the tiny sizes are overrides.
        released_cfg = json.loads(json.dumps(model_cfg))
        released_cfg["vision_cfg"]["timm_model_name"] = "vit_base_multiscan_h3_token1176"
        released_cfg["text_cfg"]["hf_model_name"] = released_cfg["text_cfg"]["hf_tokenizer_name"] = (
            "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext")
        (folder / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": released_cfg, "preprocess_cfg": {"mean": [0.0], "std": [1.0]}}, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
        shutil.copy(Path(tmp) / "bert" / "vocab.txt", folder / "vocab.txt")
        (HERE / "tiny_overrides.json").write_text(json.dumps(TINY, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in outputs.items()}, HERE / "reference.safetensors",
                  metadata={"hlip_commit": commit, "timm": "1.0.15", "open_clip_torch": "2.32.0"})


if __name__ == "__main__":
    main()
