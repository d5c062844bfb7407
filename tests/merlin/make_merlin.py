"""Writes `release/` (a tiny Merlin checkpoint in the released layout), `Clinical-Longformer/` (a tiny text encoder
config and BPE tokenizer in the layout of the Hub repo `yikuan8/Clinical-Longformer`, which Merlin's text tower
loads) and `reference.safetensors` (inputs and the outputs Merlin's own code gives for them).

    python tests/merlin/make_merlin.py --merlin MERLIN_SOURCE

MERLIN_SOURCE is a checkout of StanfordMIMI/Merlin (MIT licence; e.g. `/work/src/Merlin`); its
`merlin/models/build.py`, `i3res.py` and `inflate.py` run unchanged (the commit is saved in the reference file's
metadata; the files were made from 2489a96bab716b6b27e3e693e2e9e9a1587135a5). Python with torch, transformers and
nltk (tested: torch 2.13 CPU, transformers 5.24, nltk 3.10.4; no virtual environment is needed). The shims, all
outside Merlin's files:

- `merlin` and `merlin.models` are empty packages over the source folders: `merlin/models/__init__.py` imports
  the report-generation model (peft, GPT-2), which the contrastive model needs not;
- `torchvision` is a stub module whose `models.resnet152(pretrained=True)` builds a torchvision-compatible 2-D
  ResNet (torchvision's module and attribute names, ResNet v1.5 Bottleneck blocks) at tiny widths with seeded
  weights: it is the input that Merlin's own `I3ResNet` inflates to 3-D;
- `build.AutoTokenizer` / `build.AutoModel` return the tiny tokenizer and a tiny random `LongformerModel` where
  Merlin asks the Hub for `yikuan8/Clinical-Longformer`;
- Merlin's heads are sized for ResNet-152 and Clinical-Longformer (`Conv3d(2048, 1692)`, `Conv3d(2048, 512)`,
  `Linear(768, 512)`): they are rebuilt with the same layer types at the tiny widths (64 -> 7 phenotypes,
  64 -> 16 and 32 -> 16 contrastive).

Every parameter and batch-norm statistic then gets seeded noise (inflation leaves zeros off the kernels' centre
slices), so that a wrong key, axis or kernel mapping shows. The checkpoint is saved as Merlin's release is: one
`torch.save`d state dict of `MerlinArchitecture` (`encode_image.i3_resnet.*`, `encode_text.text_encoder.*`,
`encode_text.linear_layer.*`, `logit_scale`) under the released file name.

Inputs: two volumes in Merlin's layout `(B, 1, X, Y, Z)` (after its MONAI transforms; here 32 x 32 x 16) and two
reports, tokenised by Merlin's `TextEncoder` itself (sanitized: lower case, `wordpunct_tokenize` words joined by
spaces; padding to the longest, `max_length=1024`). Outputs: `encode_image`'s `(contrastive, phenotype logits)`, the
`ImageEmbedding=True` model's pooled 2048-d (here 64-d) feature, `encode_text`'s embeddings, and
`MerlinArchitecture.forward`'s normalised embeddings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LongformerConfig, LongformerModel, LongformerTokenizer

HERE = Path(__file__).parent
CHECKPOINT = "i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt"
WIDTH = 2  # bottleneck widths (2, 4, 8, 16): 64 output channels
LAYERS = (1, 2, 1, 1)
PHENOTYPES, EMBED = 7, 16
REPORTS = ["The LIVER is normal; no focal lesion.", "Small left renal cyst, 1.2 cm. Liver normal."]
WORDS = ["the", "liver", "is", "normal", "no", "focal", "lesion", "small", "left", "renal", "cyst", "cm"]


class Bottleneck(nn.Module):
    """torchvision's `Bottleneck` (stride on the 3x3 conv), module names included."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride


class ResNet(nn.Module):
    """torchvision's `ResNet` layout at a base width of `width` (torchvision: 64)."""

    def __init__(self, layers, width):
        super().__init__()
        self.inplanes = width * 2  # torchvision: 64 stem channels for 64-wide first bottlenecks
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for index, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 2)), start=1):
            setattr(self, f"layer{index}", self._make_layer(width * 2 ** (index - 1), blocks, stride))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, 10)

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)


def install_stubs(merlin_source: Path) -> None:
    """`torchvision` (a tiny `resnet152`) and empty `merlin` / `merlin.models` packages over the source."""
    torchvision = types.ModuleType("torchvision")
    torchvision.models = types.SimpleNamespace(resnet152=lambda pretrained=False: ResNet(LAYERS, WIDTH))
    sys.modules["torchvision"] = torchvision
    for name, folder in (("merlin", merlin_source / "merlin"), ("merlin.models", merlin_source / "merlin/models")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package


def tiny_tokenizer(folder: Path) -> LongformerTokenizer:
    """A byte-level BPE tokenizer (RoBERTa / Longformer's, as Clinical-Longformer's) with the 256 byte symbols and
    merges that spell the reports' words, saved as `vocab.json` + `merges.txt` + `tokenizer_config.json`."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = []
    for word in [*("\u0120" + word for word in WORDS), *WORDS]:  # "\u0120" is the byte-level space
        pieces = list(word)
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    merged = []
    for merge in merges:
        token = merge.replace(" ", "")
        if token not in merged:
            merged.append(token)
    vocab = ["<s>", "<pad>", "</s>", "<unk>", *symbols, *merged, "<mask>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LongformerTokenizer", "model_max_length": 4096, "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "sep_token": "</s>", "cls_token": "<s>", "pad_token": "<pad>", "mask_token": "<mask>"},
        indent=2))
    return LongformerTokenizer.from_pretrained(folder)


def tiny_longformer_config(vocab_size: int) -> LongformerConfig:
    """Clinical-Longformer's architecture (RoBERTa positions from `pad_token_id + 1`, one token type, local
    attention windows) at a 32-wide, 2-layer size."""
    return LongformerConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        attention_window=[4, 4], max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, sep_token_id=2,
    )


def add_noise(model: nn.Module, generator: torch.Generator) -> None:
    """Seeded noise on every parameter and batch-norm statistic (positive variances)."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator) * 0.1
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("bn3.weight") or name.endswith("downsample.1.weight"):
                tensor.copy_(1.0 + noise)
            else:
                tensor.add_(noise)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--merlin", type=Path, required=True, help="a checkout of StanfordMIMI/Merlin")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(args.merlin), "log", "-1", "--format=%H"], capture_output=True,
                            text=True, check=True).stdout.strip()
    torch.manual_seed(0)
    install_stubs(args.merlin)
    import importlib

    build = importlib.import_module("merlin.models.build")
    tokenizer = tiny_tokenizer(HERE / "Clinical-Longformer")
    text_config = tiny_longformer_config(len(tokenizer))
    text_config.save_pretrained(HERE / "Clinical-Longformer")
    build.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda name: tokenizer)
    build.AutoModel = types.SimpleNamespace(from_pretrained=lambda name: LongformerModel(text_config))

    model = build.MerlinArchitecture()
    resnet = model.encode_image.i3_resnet
    channels = resnet.layer4[-1].conv3.out_channels
    resnet.classifier = nn.Conv3d(channels, PHENOTYPES, kernel_size=(1, 1, 1), bias=True)
    resnet.contrastive_head = nn.Conv3d(channels, EMBED, kernel_size=(1, 1, 1), bias=True)
    model.encode_text.linear_layer = nn.Linear(text_config.hidden_size, EMBED)
    generator = torch.Generator().manual_seed(1)
    add_noise(model, generator)
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    model.eval()
    state_dict = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    (HERE / "release").mkdir(exist_ok=True)
    torch.save(state_dict, HERE / "release" / CHECKPOINT)

    image = torch.rand((2, 1, 32, 32, 16), generator=generator)  # (B, 1, X, Y, Z): Merlin's input layout
    with torch.no_grad():
        contrastive, phenotype_logits = model.encode_image(image)
        text_embeds = model.encode_text(REPORTS)
        image_normed, _, text_normed = model(image, REPORTS)
        embedding_model = build.MerlinArchitecture(ImageEmbedding=True)
        embedding_model.encode_image.i3_resnet.classifier = resnet.classifier
        embedding_model.encode_image.i3_resnet.contrastive_head = resnet.contrastive_head
        embedding_model.encode_text.linear_layer = model.encode_text.linear_layer
        embedding_model.load_state_dict(state_dict)
        pooled = embedding_model.eval()(image)  # (1, B, C): Merlin's ImageEmbedding output
    tokens = tokenizer([build.sanitize_report(report) for report in REPORTS], return_tensors="pt", padding=True,
                       truncation=True, max_length=1024)
    reference = {
        "image": image, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
        "image_embeds": contrastive, "phenotype_logits": phenotype_logits, "pooled_image_features": pooled[0],
        "text_embeds": text_embeds, "image_embeds_normalized": image_normed, "text_embeds_normalized": text_normed,
    }
    save_file({key: value.contiguous() for key, value in reference.items()}, HERE / "reference.safetensors",
              metadata={"StanfordMIMI/Merlin": commit, "made_by": "tests/merlin/make_merlin.py",
                        "reports": json.dumps(REPORTS)})


if __name__ == "__main__":
    main()
