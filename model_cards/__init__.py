"""Model cards rendered with `huggingface_hub.ModelCard` from the templates in this folder."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATES = Path(__file__).parent


def results_table(results: list[dict]) -> str:
    """A Markdown table of `{"task", "dataset", "split", "metric", "value", "variant"}` records."""
    lines = ["| task | dataset | split | metric (variant) | value |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['task']} | {r['dataset']} | {r['split']} | {r['metric']} ({r['variant']}) | {r['value']:.4f} |")
    return "\n".join(lines)


def render_voxlm_card(model_name: str, results: list[dict], **fields) -> ModelCard:
    """A VoxLM model card with `model-index` entries for each result.

    Args:
        model_name (`str`): the card title and `model-index` name.
        results (`list[dict]`): measured results (see `results_table`).
        **fields: `vision_source`, `llm_source`, `data_source`, `stages`, `limits`, `preprocessing`, `memory`,
            `repo_or_path`, `base_model`.
    """
    eval_results = [
        EvalResult(task_type=r["task_type"], dataset_type=r["dataset"], dataset_name=r["dataset"],
                   dataset_split=r["split"], metric_type=r["metric"], metric_name=f"{r['metric']} ({r['variant']})",
                   metric_value=round(float(r["value"]), 4))
        for r in results
    ]
    card_data = ModelCardData(
        language="en", license="apache-2.0", library_name="transformers", pipeline_tag="image-text-to-text",
        tags=["medical", "3d", "ct", "voxlm", "m3d-lamed"], base_model=fields.pop("base_model", None),
        model_name=model_name, eval_results=eval_results or None,
    )
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATES / "voxlm.md"), model_name=model_name,
        results_table=results_table(results), **fields,
    )
