"""Whole studies against one random series: zero-shot "hemorrhage present" when the finding is in one series only.

Phantom head-CT studies (`voxlm.data.phantom_studies`: brain window, bone window, post-contrast, thick slices) in
which half of the findings are drawn into one randomly chosen series only and the rest into every series (the
generator's default, `--single-series-fraction 0.5`). The same small VoxCLIP
(the quickstart's VoxViT: 16 x 64 x 64 input, 4 x 16 x 16 patches, width 192, 3 blocks, max pooling; here in study
mode, up to 4 scans, HLIP's scan/study schedule; the packaged MiniLM locked, only its projection trains) is pre-trained
twice with the contrastive loss, with the same initialisation, seed, batch size, steps and study order: (a) on whole
studies (all series, stored order) and (b) on one random series per study and step, as a single-scan pipeline that
picks a series would. Both are scored by zero-shot "hemorrhage present" AUC (prompt ensembles,
`voxlm.evaluation.zero_shot`) on the held-out studies where the finding is visible in one series only (and the normal
ones), each on whole studies, on one random series (the same pick for both models) and on the series that holds the
finding (an oracle that no single-series pipeline has).

Usage: python benchmarks/bench_study_zero_shot.py [--studies 400] [--test-studies 300] [--steps 300] [--batch-size 32]
       [--json-out FILE]

The text tower is locked, so the report features are computed once per distinct report instead of at every step, and
every series is preprocessed once (`series_pixel_values`) before training; the step is otherwise `VoxCLIPModel`'s own
contrastive path (`get_image_features` with the study's `scan_mask`, `text_projection`, `contrastive_losses`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import common

VISION = {"patch_size": [4, 16, 16], "hidden_size": 192, "intermediate_size": 384, "num_hidden_layers": 3,
          "num_attention_heads": 4, "pooling": "max", "max_scans": 4, "attention_levels": "scan_study"}
IMAGE_SIZE = (16, 64, 64)
PHANTOM_SHAPE = (32, 64, 64)
HEMORRHAGE_PROMPTS = {
    "normal": ["no acute intracranial hemorrhage", "normal head CT"],
    "hemorrhage": ["acute intracranial hemorrhage", "hyperdense blood"],
}
VIEWS = ("whole study", "one random series", "the finding's series")


def phantom_studies(seeds, single_series_fraction: float) -> list[dict]:
    """Study rows of the phantom `seeds`, every series preprocessed: `series` a list of `(C, D, H, W)` tensors in
    stored order, plus `report`, `hemorrhage` (0 / 1), `finding_series` and `split`."""
    from voxlm.processing import VoxVolumeProcessor
    from voxlm.data.phantoms import HEMORRHAGE_TYPES
    from voxlm.data.phantom_studies import generate_study
    from voxlm.data.study_sampling import series_pixel_values

    processor = VoxVolumeProcessor(image_size=IMAGE_SIZE)
    studies = []
    for seed in seeds:
        row = generate_study(seed, shape=PHANTOM_SHAPE, single_series_fraction=single_series_fraction)
        studies.append(dict(id=row["id"], series=list(series_pixel_values(row["series"], processor)),
                            report=row["report"], hemorrhage=int(row["label"] in HEMORRHAGE_TYPES),
                            finding_series=row["finding_series"], split=row["split"]))
    return studies


def split_seeds(num_train_seeds: int, num_test: int) -> tuple[list[int], list[int]]:
    """Seeds of the training studies (the train-split patients among the first `num_train_seeds`) and of the first
    `num_test` test-split patients: the held-out set grows without changing what the models train on."""
    from voxlm.data.hub_format import split_of

    def split(seed: int) -> str:  # the split `generate_study` gives the seed's patient
        return split_of(f"phantom-patient-{seed:06d}", test_fraction=0.2)

    train = [seed for seed in range(num_train_seeds) if split(seed) == "train"]
    test, seed = [], 0
    while len(test) < num_test:
        if split(seed) == "test":
            test.append(seed)
        seed += 1
    return train, test


def build_model(seed: int):
    """The VoxCLIP and its `VoxCLIPProcessor`, built by `pretrain-clip`'s own `build_clip` (MiniLM locked), seeded."""
    import torch

    from voxlm.processing import VoxCLIPProcessor
    from voxlm.training.train_clip import ClipPretrainedParts, build_clip

    torch.manual_seed(seed)
    model, volume_processor, tokenizer = build_clip(ClipPretrainedParts(text_trainable_layers=0), dict(
        vision_config={**VISION, "image_size": list(IMAGE_SIZE)}, projection_dim=128, text_pooling="mean"))
    return model, VoxCLIPProcessor(volume_processor, tokenizer)


def report_features(model, processor, reports: list[str]):
    """Pooled features `(R, E_txt)` of the locked text tower for each distinct report, and each report's row."""
    import torch

    distinct = sorted(set(reports))
    with torch.no_grad():
        tokens = processor(text=distinct)
        features = model.pool_text(model.encode_text(tokens["input_ids"], tokens["attention_mask"]),
                                   tokens["attention_mask"])
    row = {report: index for index, report in enumerate(distinct)}
    return features, torch.tensor([row[report] for report in reports])


def train_arm(sampling, train: list[dict], args) -> tuple:
    """Pre-train one model on `train` studies seen through `sampling`; returns `(model, processor, seconds, losses)`."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import get_cosine_schedule_with_warmup

    from voxlm.processing import pad_studies
    from voxlm.data.study_sampling import sample_study
    from voxlm.training.loop import parameter_groups

    model, processor = build_model(args.seed)
    text_features, report_rows = report_features(model, processor, [study["report"] for study in train])
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=args.learning_rate)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 10, args.steps)
    order, rng = torch.Generator().manual_seed(args.seed), np.random.default_rng(args.seed)
    losses, start = [], time.perf_counter()
    model.train()
    for _ in range(args.steps):
        batch = torch.randint(0, len(train), (args.batch_size,), generator=order).tolist()
        picked = [sample_study(train[index], sampling, rng)["series"] for index in batch]
        pixel_values, scan_mask = pad_studies([torch.stack(series) for series in picked])  # (B, S, C, D, H, W)
        image_embeds = F.normalize(model.get_image_features(pixel_values, scan_mask), dim=-1)  # (B, P)
        text_embeds = F.normalize(model.text_projection(text_features[report_rows[batch]]), dim=-1)  # (B, P)
        has_report = torch.ones(len(batch), dtype=torch.bool)
        loss = model.contrastive_losses(image_embeds, text_embeds, has_report)["contrastive_loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return model.eval(), processor, time.perf_counter() - start, losses


def view_series(study: dict, view: str, random_pick: int) -> list:
    """The series a model is shown of a held-out study in one of `VIEWS`."""
    if view == "whole study":
        return study["series"]
    if view == "the finding's series" and study["finding_series"]:
        return [study["series"][study["finding_series"][0]]]
    return [study["series"][random_pick]]  # a random series (also the oracle's pick for studies without a finding)


def zero_shot_scores(model, processor, test: list[dict], picks: list[int]) -> dict:
    """Zero-shot probability of "hemorrhage" for every held-out study in every view: `{view: (N,) array}`."""
    import torch

    from voxlm.evaluation.zero_shot import class_embeddings, zero_shot_probabilities
    from voxlm.processing import pad_studies

    classes = class_embeddings(model, processor, HEMORRHAGE_PROMPTS)
    scores = {}
    for view in VIEWS:
        shown = [torch.stack(view_series(study, view, pick)) for study, pick in zip(test, picks)]
        batches = []
        for start in range(0, len(shown), 32):
            pixel_values, scan_mask = pad_studies(shown[start : start + 32])  # (b, S, C, D, H, W), (b, S)
            batches.append(zero_shot_probabilities(model, pixel_values, classes, scan_mask=scan_mask)[:, 1])
        scores[view] = torch.cat(batches).numpy()
    return scores


def auc_difference_interval(labels, scores_a, scores_b, seed: int, resamples: int = 2000) -> tuple[float, float]:
    """95% interval of `AUC(scores_a) - AUC(scores_b)` over bootstrap resamples of the held-out studies (paired: the
    same studies for both)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    labels, rng, differences = np.asarray(labels), np.random.default_rng(seed), []
    for _ in range(resamples):
        index = rng.integers(0, len(labels), len(labels))
        if labels[index].min() == labels[index].max():  # one class only: no AUC
            continue
        differences.append(roc_auc_score(labels[index], scores_a[index]) - roc_auc_score(labels[index], scores_b[index]))
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=400,
                        help="phantom seeds whose train-split patients (four in five) train the models")
    parser.add_argument("--test-studies", type=int, default=300,
                        help="held-out (test-split) phantom studies, of which the normal ones and those with the "
                             "finding in one series are scored")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--single-series-fraction", type=float, default=0.5,
                        help="share of the findings drawn into one random series only (the rest: every series)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    import numpy as np
    from sklearn.metrics import roc_auc_score

    from voxlm.data.study_sampling import StudySampling

    train_seeds, test_seeds = split_seeds(args.studies, args.test_studies)
    train = phantom_studies(train_seeds, args.single_series_fraction)
    # scored where the issue asks: held-out studies whose finding is in one series only, and the normal ones
    test = [study for study in phantom_studies(test_seeds, args.single_series_fraction)
            if len(study["finding_series"]) <= 1]
    picks = np.random.default_rng(args.seed + 1).integers(0, 4, len(test)).tolist()  # the random series, both models
    arms = {
        "whole studies": StudySampling(max_series=4, random_subset=False, shuffle_sentences=False),
        "one random series": StudySampling(max_series=1, random_subset=True, shuffle_sentences=False),
    }
    labels = [study["hemorrhage"] for study in test]
    rows, scores = [], {}
    for name, sampling in arms.items():
        model, processor, seconds, losses = train_arm(sampling, train, args)
        scores[name] = zero_shot_scores(model, processor, test, picks)
        rows.append({"trained on": name, "train_seconds": seconds, "final_loss": float(np.mean(losses[-10:])),
                     **{view: float(roc_auc_score(labels, scores[name][view])) for view in VIEWS}})
        print(rows[-1], flush=True)
    whole, single = rows
    # the comparison the issue asks for: the study model on whole studies, the other on one random series
    low, high = auc_difference_interval(labels, scores["whole studies"]["whole study"],
                                        scores["one random series"]["one random series"], args.seed)
    difference = whole["whole study"] - single["one random series"]
    common.emit({
        "name": "study_zero_shot",
        "title": "Whole studies against one random series: zero-shot hemorrhage AUC",
        "command": common.command_line("bench_study_zero_shot.py", sys.argv[1:]),
        "description": common.doc_description(__doc__),
        "tables": [{
            "caption": f"{len(train)} training and {args.test_studies} held-out phantom studies, "
                       f"{args.single_series_fraction:.0%} of the findings in one series only; {len(test)} held-out "
                       "studies that are normal or show their finding in one series only "
                       f"({sum(labels)} with a hemorrhage); {args.steps} steps of batch {args.batch_size}, same seed, "
                       "initialisation and study order for both models. Zero-shot AUC of \"hemorrhage present\" in "
                       "each view of the held-out studies",
            "columns": ["trained on", *(f"AUC, {view}" for view in VIEWS), "final loss (last 10 steps)", "train s"],
            "rows": [[row["trained on"], *(common.fmt(row[view], 3) for view in VIEWS),
                      common.fmt(row["final_loss"], 3), common.fmt(row["train_seconds"], 0)] for row in rows],
        }],
        "figures": {"study_auc": whole["whole study"], "one_series_auc": single["one random series"],
                    "difference": difference, "difference_low": low, "difference_high": high},
        "notes": [f"Study model on whole studies minus one-series model on one random series: AUC difference "
                  f"{difference:+.3f}, 95% paired bootstrap interval [{low:+.3f}, {high:+.3f}] over the held-out "
                  "studies."],
    }, args.json_out)


if __name__ == "__main__":
    main()
