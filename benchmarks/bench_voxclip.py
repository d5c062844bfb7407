"""VoxCLIP's learning targets on phantoms, and an ablation of the extra pre-training terms.

A tiny VoxCLIP (the quickstart's: VoxViT 16 x 64 x 64, 4 x 16 x 16 patches, width 192, 3 blocks, max pooling; the
packaged MiniLM locked, only its projection trains) is pre-trained with `voxlm train pretrain-clip`'s own `train`
on phantom volume-report pairs, once with the contrastive loss alone and once with each extra term switched on (MG-3D's
inter-patient soft targets, text-guided masked-volume reconstruction and image-guided MLM; COLIPRI's report generation
and masked-image modelling on image-only volumes from a second phantom set), with the same data, seed and number of
steps. Each model is scored on held-out patients: image-to-report retrieval among 100 pairs and zero-shot "hemorrhage
present" AUC from prompt ensembles (`voxlm.evaluation.zero_shot`). Targets (issue 5): R@5 >= 0.5 (chance 0.05) and
AUC >= 0.9 after at most 5 minutes of training on 2 CPU cores.

Usage: python benchmarks/bench_voxclip.py [--cases 400] [--steps 300] [--variants contrastive mvr ...] [--json-out F]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import common

VISION = {"patch_size": [4, 16, 16], "hidden_size": 192, "intermediate_size": 384, "num_hidden_layers": 3,
          "num_attention_heads": 4, "pooling": "max"}
IMAGE_SIZE = (16, 64, 64)
PHANTOM_SHAPE = (32, 64, 64)
TEST_FRACTION = 0.25
# variant -> the `VoxCLIPConfig` loss weight it switches on (the contrastive loss is always on)
VARIANTS = {
    "contrastive": None,
    "inter_patient": "inter_patient_loss_weight",
    "mvr": "mvr_loss_weight",
    "mlm": "mlm_loss_weight",
    "report_gen": "report_gen_loss_weight",
    "mim": "mim_loss_weight",
}
HEMORRHAGE_PROMPTS = {
    "normal": ["no acute intracranial hemorrhage", "normal head CT"],
    "hemorrhage": ["acute intracranial hemorrhage", "hyperdense blood"],
}


def held_out_labelled(num_cases: int):
    """Held-out phantom volumes `(N, 1, D, H, W)` and their "hemorrhage present" labels, the test split of
    `write_phantom_dataset(num_cases, seed=0)`."""
    import numpy as np
    import torch

    from voxlm.processing import VoxVolumeProcessor
    from voxlm.data.hub_format import split_of
    from voxlm.data.phantoms import generate_case

    processor = VoxVolumeProcessor(image_size=IMAGE_SIZE)
    volumes, labels = [], []
    for seed in range(num_cases):
        case = generate_case(seed, shape=PHANTOM_SHAPE)
        if split_of(case.case_id, TEST_FRACTION, 0.0) != "test":
            continue
        volumes.append(processor.preprocess_volume(case.volume.astype(np.float32))[0].reshape(1, *IMAGE_SIZE))
        labels.append(int(case.finding is not None and case.finding.is_hemorrhage))
    return torch.stack(volumes), labels


def train_variant(variant: str, data: Path, image_only: Path, out: Path, args) -> tuple[Path, float]:
    from voxlm.training import train_clip
    from voxlm.training.settings import RunSettings

    weights = {VARIANTS[variant]: 1.0} if VARIANTS[variant] else {}
    start = time.perf_counter()
    folder = train_clip.train(train_clip.ClipSettings(
        pretrained=train_clip.ClipPretrainedParts(text_trainable_layers=0),
        model=dict(vision_config={**VISION, "image_size": list(IMAGE_SIZE)}, projection_dim=128, text_pooling="mean",
                   **weights),
        data=train_clip.ClipDataSettings(path=str(data), image_only_path=str(image_only) if variant == "mim" else ""),
        run=RunSettings(output_dir=str(out / variant), max_steps=args.steps, batch_size=args.batch_size,
                        learning_rate=args.learning_rate, warmup_steps=10, tracker=None, seed=0),
    ))
    return folder, time.perf_counter() - start


def score(folder: Path, data: Path, volumes, labels) -> dict:
    """Held-out retrieval among 100 pairs and zero-shot hemorrhage AUC."""
    from itertools import islice

    import torch
    from sklearn.metrics import roc_auc_score
    from transformers import AutoModel, AutoProcessor

    import voxlm  # noqa: F401
    from voxlm.evaluation.runner import evaluate_retrieval
    from voxlm.evaluation.zero_shot import class_embeddings, zero_shot_probabilities
    from voxlm.data import PreprocessedStream, stream_rows

    clip, processor = AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    pairs = list(islice(PreprocessedStream(stream_rows(data, "cap", "test"), processor.image_processor), 100))
    retrieval = evaluate_retrieval(clip, processor, pairs, pool_size=100)
    classes = class_embeddings(clip, processor, HEMORRHAGE_PROMPTS)
    probabilities = torch.cat([zero_shot_probabilities(clip, batch, classes) for batch in volumes.split(32)])
    return {"r@1": retrieval["i2t_r@1"], "r@5": retrieval["i2t_r@5"], "pool": retrieval["pool_size"],
            "auc": float(roc_auc_score(labels, probabilities[:, 1].numpy()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=400, help="phantom patients (a quarter held out)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from voxlm.data import write_phantom_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_phantom_dataset(root / "pairs", args.cases, shape=PHANTOM_SHAPE, test_fraction=TEST_FRACTION)
        # Image-only volumes for COLIPRI's vision-only term: other patients (seeds after the paired ones).
        image_only = write_phantom_dataset(root / "image-only", args.cases, shape=PHANTOM_SHAPE, seed=args.cases,
                                           test_fraction=TEST_FRACTION)
        volumes, labels = held_out_labelled(args.cases)
        rows = []
        for variant in args.variants:
            folder, seconds = train_variant(variant, data, image_only, root / "runs", args)
            rows.append({"variant": variant, "train_seconds": seconds, **score(folder, data, volumes, labels)})
            print(rows[-1], flush=True)
    baseline = next((row for row in rows if row["variant"] == "contrastive"), None)
    common.emit({
        "name": "voxclip",
        "title": "VoxCLIP on phantoms: learning targets and the extra terms",
        "command": common.command_line("bench_voxclip.py", sys.argv[1:]),
        "description": common.doc_description(__doc__),
        "tables": [{
            "caption": f"{args.cases} phantoms ({len(labels)} held-out patients for AUC, retrieval among the first 100 "
                       f"held-out pairs), {args.steps} steps of batch {args.batch_size}, extra terms at weight 1",
            "columns": ["terms", "image->report R@1", "R@5 (target 0.5)", "zero-shot hemorrhage AUC (target 0.9)",
                        "train s (target 300)"],
            "rows": [["contrastive" + ("" if row["variant"] == "contrastive" else f" + {row['variant']}"),
                      row["r@1"], row["r@5"], common.fmt(row["auc"], 3), common.fmt(row["train_seconds"], 0)]
                     for row in rows],
        }],
        "figures": {} if baseline is None else {"r@5": baseline["r@5"], "auc": baseline["auc"],
                                                  "train_seconds": baseline["train_seconds"]},
    }, args.json_out)


if __name__ == "__main__":
    main()
