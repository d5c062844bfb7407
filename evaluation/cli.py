"""`voxlm evaluate`: score a saved model on a dataset in voxlm's format (a local folder or a Hub repo id)."""

from __future__ import annotations

import argparse
from pathlib import Path

from voxlm.data.held_out import TASKS, held_out_samples


def evaluate(model_dir: str, data: str, task: str, split: str = "test", limit: int = 100, batch_size: int = 8,
             max_new_tokens: int | None = None, shuffle_buffer: int = 0) -> dict:
    """Run one task and return `{"task", "data", "split", "num_samples", "metrics"}` (samples: `held_out_samples`)."""
    from transformers import AutoModel, AutoProcessor

    import voxlm  # noqa: F401  (registers the Auto classes)

    from . import runner

    processor = AutoProcessor.from_pretrained(model_dir)  # a VoxLMProcessor, or a VoxCLIP's VoxCLIPProcessor
    # held_out_samples checks `task` first.
    samples = held_out_samples(data, task, processor.image_processor, limit, split, shuffle_buffer)
    model = AutoModel.from_pretrained(model_dir)
    if task == "vqa-closed":
        metrics = runner.evaluate_closed_vqa(model, processor, samples, batch_size, max_new_tokens or 8)
        metrics.pop("predictions")
    elif task == "rec":
        metrics = runner.evaluate_positioning(model, processor, samples, batch_size, max_new_tokens or 48)
    elif task in ("vqa-open", "report", "reg"):
        metrics = runner.evaluate_open_text(model, processor, samples, batch_size, max_new_tokens or 64)
    elif task in ("seg", "refseg"):
        metrics = runner.evaluate_segmentation(model, processor, samples, max(1, batch_size // 2), max_new_tokens or 8)
    else:
        metrics = runner.evaluate_retrieval(model, processor, samples, pool_size=limit)
    return {"task": task, "data": str(data), "split": split, "num_samples": len(samples), "metrics": metrics}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a saved model with M3D-Bench metrics",
        description="Example: voxlm evaluate --model voxlm-quickstart/finetune/final/model "
        "--data voxlm-quickstart/data --task vqa-closed --limit 100 --out results/vqa_closed.json\n"
        "retrieval takes a VoxCLIP folder as --model (voxlm-quickstart/clip/final).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="a saved VoxLM (or VoxCLIP for retrieval) folder or Hub id")
    parser.add_argument("--data", required=True, help="a dataset folder or Hub id in voxlm's format")
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=100, help="samples (the retrieval pool size; M3D-Bench: 2000)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--shuffle-buffer", type=int, default=0,
                        help="draw the samples through a fixed shuffle of this many rows (0: stored order)")
    parser.add_argument("--out", type=Path, help="write results as JSON (and Markdown beside it)")
    parser.add_argument("--card", action="store_true",
                        help="add the results to the model-index of the model folder's card (its README.md)")

    def run(args):
        from voxlm.model_cards import add_results_to_card

        from .report import result_records, results_markdown, write_results

        if args.card and not (Path(args.model) / "README.md").is_file():
            parser.error(f"--card adds the results to the README.md card of a local model folder; {args.model} "
                         "has none")
        results = evaluate(args.model, args.data, args.task, args.split, args.limit, args.batch_size,
                           args.max_new_tokens, args.shuffle_buffer)
        print(results_markdown(results))
        if args.out:
            write_results(results, args.out)
        if args.card:
            add_results_to_card(args.model, result_records(results))

    parser.set_defaults(func=run)
