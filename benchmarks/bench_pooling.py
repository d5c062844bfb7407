"""Why the phantom encoder did not learn: a supervised probe of VoxViT's pooling (`config.pooling`).

The quickstart's small VoxViT (16 x 64 x 64 input, 4 x 16 x 16 patches = 64 tokens, width 192, 3 blocks) is trained
from scratch to answer "hemorrhage present?" on phantom head CTs, once per pooling of the patch tokens into the volume
embedding (`cls`: M3D-CLIP's CLS token, `mean`, `max`), with the same data, seed, optimiser and number of steps, in one
run. It reports held-out accuracy and AUC. A finding covers one or two of the 64 patches, so CLS and mean pooling
start with almost no signal from it, while max pooling passes it through from the first step.

Usage: python benchmarks/bench_pooling.py [--cases 400] [--steps 220] [--batch-size 32] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import common

POOLINGS = ("cls", "mean", "max")


def phantom_tensors(num_cases: int, image_size) -> tuple:
    """Preprocessed phantom volumes `(num_cases, 1, D, H, W)` and hemorrhage labels `(num_cases,)`."""
    import numpy as np
    import torch

    from voxlm.processing import VoxVolumeProcessor
    from voxlm.data.phantoms import generate_case

    processor = VoxVolumeProcessor(image_size=image_size)
    volumes, labels = [], []
    for seed in range(num_cases):
        case = generate_case(seed, shape=(32, 64, 64))
        pixel_values, _ = processor.preprocess_volume(case.volume.astype(np.float32))
        volumes.append(pixel_values.reshape(1, *image_size))
        labels.append(int(case.finding is not None and case.finding.is_hemorrhage))
    return torch.stack(volumes), torch.tensor(labels)


def probe(pooling: str, volumes, labels, args) -> dict:
    """Train encoder + linear head for `args.steps` steps; held-out accuracy and AUC of "hemorrhage present"."""
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    from voxlm.modeling import VoxViTConfig, VoxViTModel

    torch.manual_seed(0)
    config = VoxViTConfig(image_size=args.image_size, patch_size=(4, 16, 16), hidden_size=192, intermediate_size=384,
                          num_hidden_layers=3, num_attention_heads=4, pooling=pooling)
    encoder, head = VoxViTModel(config), torch.nn.Linear(config.hidden_size, 2)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=args.learning_rate,
                                  weight_decay=0.05)
    num_train = int(0.75 * len(labels))
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = torch.randint(0, num_train, (args.batch_size,))
        loss = F.cross_entropy(head(encoder(volumes[batch]).pooler_output), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    encoder.eval()
    with torch.no_grad():
        probabilities = head(encoder(volumes[num_train:]).pooler_output).softmax(-1)[:, 1]
    held_out = labels[num_train:]
    return {"pooling": pooling, "train_seconds": seconds, "final_train_loss": loss.item(),
            "accuracy": ((probabilities > 0.5).long() == held_out).float().mean().item(),
            "auc": float(roc_auc_score(held_out.numpy(), probabilities.numpy())),
            "majority": max(held_out.float().mean().item(), 1 - held_out.float().mean().item())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=400, help="phantom patients (a quarter held out)")
    parser.add_argument("--steps", type=int, default=220)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--image-size", type=int, nargs=3, default=[16, 64, 64])
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    volumes, labels = phantom_tensors(args.cases, tuple(args.image_size))
    rows = [probe(pooling, volumes, labels, args) for pooling in POOLINGS]
    common.emit({
        "title": "Why the phantom encoder did not learn: VoxViT pooling probe",
        "command": common.command_line("bench_pooling.py", sys.argv[1:]),
        "description": common.doc_description(__doc__),
        "tables": [{
            "caption": f"{args.cases} phantoms ({len(labels) - int(0.75 * len(labels))} held out), {args.steps} steps "
                       f"of batch {args.batch_size}, same data and seed for each pooling",
            "columns": ["pooling", "held-out accuracy", "held-out AUC", "majority class", "final train loss",
                        "train s"],
            "rows": [[row["pooling"], row["accuracy"], row["auc"], row["majority"], common.fmt(row["final_train_loss"], 3),
                      common.fmt(row["train_seconds"], 0)] for row in rows],
        }],
    }, args.json_out)


if __name__ == "__main__":
    main()
