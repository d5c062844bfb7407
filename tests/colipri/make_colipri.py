"""Writes `colipri/` (a tiny COLIPRI in the released layout: `model.safetensors` with colipri's own key names, and the
WordPiece tokenizer files standing in for CXR-BERT's) and `reference.safetensors` (inputs and the embeddings colipri's
own `Model` gives for them).

    python -m venv --system-site-packages /work/venvs/colipri
    /work/venvs/colipri/bin/pip install --no-deps colipri==0.1.3 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 \
        hydra-core==1.3.8 timm==1.0.22 dynamic-network-architectures==0.4.4 torchio==1.2.1 jaxtyping \
        wadler_lindig accelerate
    /work/venvs/colipri/bin/python tests/colipri/make_colipri.py

(colipri 0.1.3 from PyPI, the wheel of microsoft/colipri, MIT; torch and transformers are the system's.) The model is
built by colipri's own `get_model(config=..., pretrained=False)` from its packaged Hydra configs with the dot-list
overrides in `OVERRIDES` (colipri's own field names: a 48-wide, 2-layer, 2-head Primus on 16^3 volumes with 4^3
patches, 32-wide projection and poolers), the text backbone node replaced by a tiny random `BertForMaskedLM` (the
release loads CXR-BERT-specialized from the Hub; colipri's `TextEncoder` keeps its `.bert` without pooler as it does
CXR-BERT's). Every floating tensor then gets seeded noise, so that LayerNorms, biases and layer scales change the
outputs and a wrong key mapping shows. Weights are saved with colipri's `Model.save_weights("model.safetensors")`.
Reports are tokenized by colipri's `Processor.process_text` (512 tokens, padded to max length).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import BertTokenizer

HERE = Path(__file__).parent
OVERRIDES = {
    "input_size": 16,
    "image_embed_dim": 48,
    "projection_dim": 32,
    "model.image_encoder.backbone.eva_depth": 2,
    "model.image_encoder.backbone.eva_numheads": 2,
    "model.image_encoder.backbone.patch_embed_size": [4, 4, 4],
    "model.image_encoder.pooler.num_heads": 2,
    "model.text_encoder.pooler.num_heads": 2,
}
TEXT_HEADS = 2
WORDS = ["no", "acute", "findings", "small", "nodule", "in", "the", "right", "left", "upper", "lower", "lobe",
         "pleural", "effusion", "consolidation", "lung", "heart", "normal", "size", "mild", "emphysema", "there",
         "is", "a", "and", "of", "with", "without", "##s", "##ed", "."]
REPORTS = ["No acute findings.", "Small nodule in the right upper lobe and mild emphysema.",
           "Left pleural effusion with consolidation of the lower lobe."]


def stub_torchvision() -> None:
    """timm imports torchvision at import time for layers COLIPRI never builds (`FrozenBatchNorm2d`, image
    transforms): stub modules whose every attribute is a placeholder class stand in (torchvision is not installed)."""

    class Placeholder(type):
        def __getattr__(cls, name):  # enum members such as `InterpolationMode.NEAREST`, used as dict keys
            if name.startswith("__"):
                raise AttributeError(name)
            return f"{cls.__name__}.{name}"

    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Placeholder(name, (), {})

    for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
                 "torchvision.transforms.functional", "torchvision.transforms.v2", "torchvision.models",
                 "torchvision.models.feature_extraction", "torchvision.datasets", "torchvision.io"):
        sys.modules[name] = Stub(name)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])


def tiny_tokenizer(folder: Path) -> BertTokenizer:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # Read back from the folder: transformers 5's `BertTokenizer(vocab_file=...)` ignores the file.
    tokenizer = BertTokenizer.from_pretrained(folder, do_lower_case=True, model_max_length=512)
    tokenizer.save_pretrained(folder)
    (folder / "tokenizer.json").unlink(missing_ok=True)
    return tokenizer


def main() -> None:
    stub_torchvision()
    from colipri.checkpoint import load_model_config
    from colipri.model.multimodal import get_model
    from colipri.processor import Processor

    release = HERE / "colipri"
    tokenizer = tiny_tokenizer(release)
    config = load_model_config(overrides=[f"{key}={json.dumps(value)}" for key, value in OVERRIDES.items()])
    config.text_encoder.backbone = OmegaConf.create({
        "_target_": "transformers.BertForMaskedLM",
        "config": {"_target_": "transformers.BertConfig", "vocab_size": len(tokenizer), "hidden_size": 32,
                   "num_hidden_layers": 2, "num_attention_heads": TEXT_HEADS, "intermediate_size": 64,
                   "max_position_embeddings": 512},
    })
    torch.manual_seed(0)
    model = get_model(config=config, pretrained=False).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    model.save_weights(release / "model.safetensors")
    (release / "overrides.json").write_text(json.dumps({**OVERRIDES, "text_config": {
        "num_attention_heads": TEXT_HEADS}}, indent=2) + "\n")

    pixel_values = torch.rand((2, 1, 16, 16, 16), generator=generator) * 2 - 1  # colipri's [-1, 1] intensities
    input_ids, attention_mask = Processor(image_transform=None, tokenizer=tokenizer).process_text(REPORTS)
    with torch.no_grad():
        tensors = {
            "pixel_values": pixel_values,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "backbone_features": model.encode_image(pixel_values),  # (B, E, D', H', W')
            "image_embeds": model.encode_image(pixel_values, pool=True, project=True, normalize=True),
            "dense_image_embeds": model.encode_image(pixel_values, project=True, normalize=True),
            "text_embeds": model.encode_text(input_ids, attention_mask),
        }
        tensors["probabilities"] = model.classify(tensors["image_embeds"], tensors["text_embeds"])
    save_file({key: value.contiguous() for key, value in tensors.items()}, HERE / "reference.safetensors",
              metadata={"colipri": "0.1.3", "made_by": "tests/colipri/make_colipri.py", "reports": json.dumps(REPORTS)})


if __name__ == "__main__":
    main()
