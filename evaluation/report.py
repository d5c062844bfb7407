"""Results as JSON and Markdown, including seed 002's Table 1 layout (BLEU-1..4, ROUGE, METEOR per dataset)."""

from __future__ import annotations

import json
from pathlib import Path

# The Hub's task type of each `voxlm evaluate` task, for `model-index` entries.
TASK_TYPES = {"vqa-closed": "visual-question-answering", "vqa-open": "visual-question-answering",
              "report": "image-to-text", "reg": "image-to-text", "rec": "object-detection",
              "seg": "image-segmentation", "refseg": "image-segmentation", "retrieval": "image-text-retrieval"}
TABLE1_COLUMNS = (("BLEU-1", "bleu_1"), ("BLEU-2", "bleu_2"), ("BLEU-3", "bleu_3"), ("BLEU-4", "bleu_4"),
                  ("ROUGE-1", "rouge_1"), ("METEOR", "meteor"))


def table1(scores_by_dataset: dict[str, dict[str, float]]) -> str:
    """Seed 002's Table 1 as Markdown: one row per dataset (e.g. CQ500, PhysioNet), six text metrics (M3D variants:
    per-sample BLEU over 13a tokens, ROUGE-1 F, nltk METEOR), six decimals as the seed prints them."""
    lines = ["| Dataset | " + " | ".join(name for name, _ in TABLE1_COLUMNS) + " |",
             "| --- |" + " --- |" * len(TABLE1_COLUMNS)]
    for dataset, scores in scores_by_dataset.items():
        lines.append(f"| {dataset} | " + " | ".join(f"{scores[key]:.6f}" for _, key in TABLE1_COLUMNS) + " |")
    return "\n".join(lines)


def category_table(per_category: dict[str, dict]) -> str:
    """Closed-VQA accuracy per question category as Markdown, M3D's per-type table (plane, phase, organ,
    abnormality, location for M3D-VQA): M3D's letter rule and exact match, and the sample count."""
    lines = ["| question category | accuracy (M3D) | exact match | n |", "| --- | --- | --- | --- |"]
    lines += [f"| {category} | {scores['accuracy_m3d']:.4f} | {scores['exact_match']:.4f} | {scores['num_samples']} |"
              for category, scores in per_category.items()]
    return "\n".join(lines)


def results_markdown(results: dict) -> str:
    """`results` of `voxlm evaluate` as Markdown: its metrics, and closed VQA's per-category table."""
    header = f"Task `{results['task']}` on `{results['data']}` ({results['split']}, n={results['num_samples']})"
    rows = [f"| {key} | {value:.4f} |" for key, value in results["metrics"].items() if isinstance(value, float)]
    parts = [header, "", "| metric | value |", "| --- | --- |", *rows]
    if results["metrics"].get("per_category"):
        parts += ["", category_table(results["metrics"]["per_category"])]
    return "\n".join(parts) + "\n"


def result_records(results: dict) -> list[dict]:
    """`voxlm evaluate`'s results as `model-index` records (`voxlm.model_cards.eval_result`): every number it
    measured, and closed VQA's accuracy per question category."""
    data = results["data"]
    base = dict(task=results["task"], task_type=TASK_TYPES[results["task"]], split=results["split"],
                dataset=Path(data).name if Path(data).exists() else data)  # a local folder by its name, else a Hub id
    metrics = results["metrics"]
    records = [dict(base, metric=name, variant=f"n={results['num_samples']}", value=value)
               for name, value in metrics.items() if isinstance(value, float)]
    records += [dict(base, metric="accuracy_m3d", variant=f"{category} questions, n={scores['num_samples']}",
                     value=scores["accuracy_m3d"]) for category, scores in metrics.get("per_category", {}).items()]
    return records


def write_results(results: dict, path: str | Path) -> Path:
    """Write `results` (metric name -> value, plus what was measured) as JSON beside its Markdown."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    path.with_suffix(".md").write_text(results_markdown(results))
    return path
