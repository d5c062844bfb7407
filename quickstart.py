"""`voxlm quickstart`: the project's main job on its embedded default, on a laptop CPU.

    phantom head CTs (Hub format) -> pretrain-clip (VoxCLIP) -> align (projector) -> finetune (LoRA + segmentation)
    -> evaluate on held-out patients (closed VQA, segmentation Dice, retrieval) -> a Hub-ready folder with a model card

Every stage is the same code `voxlm train ...` runs on a GPU cluster; the quickstart only picks small settings.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from voxlm.data import write_phantom_dataset
from voxlm.training import finetune, pretrain_projector, train_clip
from voxlm.training.mllm import MLLMSettings
from voxlm.training.settings import load_settings

logger = logging.getLogger(__name__)

# The stages' settings are the shipped phantom configs; the quickstart sets only folders, lengths, seed and LLM.
CONFIGS = Path(__file__).resolve().parent / "training" / "configs"

# The held-out samples are drawn across every test patient (stored order would give a dozen patients' questions).
EVAL_SHUFFLE_BUFFER = 4096


@dataclass
class QuickstartSettings:
    """The sizes of the quickstart (defaults: 11 to 13 minutes on 2 CPU cores).

    Args:
        output_dir (`str`): everything goes here; the final model in `<output_dir>/model`.
        num_cases (`int`): phantom patients (a quarter held out for testing).
        phantom_shape (`list[int]`): the stored volume size `(D, H, W)`.
        llm (`str`): `"tiny-llama"`, `"smollm2"` (packaged, offline) or any causal LM folder / Hub id.
        clip_steps (`int`, *optional*), align_steps (`int`, *optional*), finetune_steps (`int`, *optional*): the
            stages' lengths; `None`: their config's `run.max_steps` (`training/configs/*_phantoms.yaml`).
        finetune_tasks (`dict[str, float]`, *optional*): the fine-tuning task mix (dataset configs and their
            probabilities); `None`: `finetune_phantoms.yaml`'s.
        eval_samples (`int`): held-out samples for segmentation (half this many) and retrieval (a pool of this many
            pairs).
        closed_vqa_samples (`int`, *optional*): held-out closed questions to score; `None`: every one of the test
            patients (about 800 with the defaults), so that the accuracy is not a draw of a few dozen questions.
        seed (`int`): seeds data and models.
        overwrite (`bool`): replace what an earlier quickstart left in `output_dir` (else such a folder is refused).
    """

    output_dir: str = "voxlm-quickstart"
    num_cases: int = 400
    phantom_shape: list[int] = field(default_factory=lambda: [32, 64, 64])
    llm: str = "tiny-llama"
    clip_steps: int | None = None
    align_steps: int | None = None
    finetune_steps: int | None = None
    finetune_tasks: dict | None = None
    eval_samples: int = 100
    closed_vqa_samples: int | None = None
    seed: int = 0
    overwrite: bool = False


def stage_settings(cls, stage: str, settings: QuickstartSettings, data: Path, max_steps: int | None,
                   overrides: dict):
    """A stage's settings: its `<stage>_phantoms.yaml` with the quickstart's data, folder, seed and length."""
    values = {"data.path": str(data), "run.output_dir": str(Path(settings.output_dir) / stage),
              "run.seed": settings.seed, "run.overwrite": settings.overwrite, **overrides}
    if max_steps is not None:
        values["run.max_steps"] = max_steps
    return load_settings(cls, CONFIGS / f"{stage}_phantoms.yaml", values)


def evaluate_quickstart(data: Path, clip_dir: Path, model_dir: Path, eval_samples: int,
                        closed_vqa_samples: int | None) -> tuple[list[dict], dict]:
    """Held-out results as `model-index`-ready records (closed VQA overall and per question category, as M3D's paper
    tabulates it), and the closed-VQA details (accuracy per category and per question, and every prediction)."""
    from transformers import AutoModel, AutoProcessor

    import voxlm  # noqa: F401
    from voxlm.data.held_out import held_out_samples
    from voxlm.evaluation.runner import evaluate_closed_vqa, evaluate_retrieval, evaluate_segmentation

    def held_out(task: str, limit: int | None) -> list[dict]:
        return held_out_samples(data, task, volume_processor, limit, shuffle_buffer=EVAL_SHUFFLE_BUFFER)

    model, processor = AutoModel.from_pretrained(model_dir), AutoProcessor.from_pretrained(model_dir)
    volume_processor = processor.image_processor
    closed = evaluate_closed_vqa(model, processor, held_out("vqa-closed", closed_vqa_samples))
    seg = evaluate_segmentation(model, processor, held_out("seg", eval_samples // 2))
    clip = AutoModel.from_pretrained(clip_dir)
    retrieval = evaluate_retrieval(clip, AutoProcessor.from_pretrained(clip_dir), held_out("retrieval", eval_samples),
                                   pool_size=eval_samples)
    dataset = "voxlm-phantoms"
    records = [
        dict(task="closed VQA", task_type="visual-question-answering", dataset=dataset, split="test",
             metric="accuracy", variant=f"M3D letter rule, n={closed['num_samples']}", value=closed["accuracy_m3d"]),
        *(dict(task="closed VQA", task_type="visual-question-answering", dataset=dataset, split="test",
               metric="accuracy", variant=f"M3D letter rule, {category} questions, n={scores['num_samples']}",
               value=scores["accuracy_m3d"]) for category, scores in closed["per_category"].items()),
        dict(task="segmentation", task_type="image-segmentation", dataset=dataset, split="test", metric="dice",
             variant=f"soft, M3D, n={seg['num_samples']}", value=seg["dice_soft"]),
        dict(task="segmentation", task_type="image-segmentation", dataset=dataset, split="test", metric="dice",
             variant=f"hard at 0.5, n={seg['num_samples']}", value=seg["dice_hard"]),
        dict(task="retrieval", task_type="image-text-retrieval", dataset=dataset, split="test", metric="recall@5",
             variant=f"image to report, pool {retrieval['pool_size']}", value=retrieval["i2t_r@5"]),
        dict(task="retrieval", task_type="image-text-retrieval", dataset=dataset, split="test", metric="recall@1",
             variant=f"image to report, pool {retrieval['pool_size']}", value=retrieval["i2t_r@1"]),
    ]
    return records, {key: closed[key] for key in ("per_category", "per_question", "predictions")}


def run_quickstart(settings: QuickstartSettings) -> list[dict]:
    """Run every stage; return the held-out results (also written to `results.json` and the model card)."""
    from voxlm.model_cards import render_voxlm_card, results_table

    out = Path(settings.output_dir)
    logger.info("1/5 Writing %d phantom head CTs to %s", settings.num_cases, out / "data")
    data = write_phantom_dataset(out / "data", settings.num_cases, shape=tuple(settings.phantom_shape),
                                 seed=settings.seed, test_fraction=0.25, rows_per_shard=256,
                                 overwrite=settings.overwrite)
    clip_settings = stage_settings(train_clip.ClipSettings, "clip", settings, data, settings.clip_steps, {})
    logger.info("2/5 Pre-training VoxCLIP (%d steps)", clip_settings.run.max_steps)
    clip_dir = train_clip.train(clip_settings)
    align_settings = stage_settings(MLLMSettings, "align", settings, data, settings.align_steps,
                                    {"pretrained.llm": settings.llm, "pretrained.vision": str(clip_dir)})
    logger.info("3/5 Aligning the projector (%d steps)", align_settings.run.max_steps)
    aligned = pretrain_projector.train(align_settings)
    # finetune_phantoms.yaml trains the random tiny Llama fully (it has no pre-training to protect and cannot learn
    # language through LoRA); a real LLM gets LoRA r=16 as in seed 002. The encoder keeps what pre-training taught it.
    full_llm = settings.llm == "tiny-llama"
    overrides = {"init_from": str(aligned)}
    if not full_llm:
        overrides.update({"lora.enabled": True, "run.learning_rate": 5e-4})
    if settings.finetune_tasks is not None:
        overrides["data.tasks"] = settings.finetune_tasks
    finetune_settings = stage_settings(MLLMSettings, "finetune", settings, data, settings.finetune_steps, overrides)
    logger.info("4/5 Fine-tuning (%s) with segmentation (%d steps)", "full LLM" if full_llm else "LoRA",
                finetune_settings.run.max_steps)
    tuned = finetune.train(finetune_settings)
    model_dir = tuned / "model"
    logger.info("5/5 Evaluating on held-out patients")
    results, closed_vqa = evaluate_quickstart(data, clip_dir, model_dir, settings.eval_samples,
                                              settings.closed_vqa_samples)
    (out / "results.json").write_text(json.dumps({"settings": asdict(settings), "results": results,
                                                  "closed_vqa": closed_vqa}, indent=2))
    card = render_voxlm_card(
        "voxlm-quickstart", results, vision_source=f"VoxCLIP pre-trained by the quickstart ({clip_dir})",
        llm_source=settings.llm, data_source=f"{settings.num_cases} synthetic head-CT phantoms (`voxlm data phantoms`)",
        stages="pretrain-clip -> align -> finetune (" + ("LLM trained fully" if full_llm else "LoRA r=16, alpha=32")
        + ", encoder frozen)",
        limits="Trained on synthetic phantoms only: it has never seen a real CT.",
        preprocessing=f"brain window (0-80 HU), foreground crop, resize to "
        f"{clip_settings.model['vision_config']['image_size']}",
        memory="Runs on a CPU; a few hundred MB of RAM.", repo_or_path=str(model_dir),
    )
    card.save(model_dir / "README.md")
    table = results_table(results)
    (out / "results.md").write_text(table + "\n")
    logger.info("Held-out results:\n%s", table)
    logger.info("Model: %s (load it with `import voxlm; AutoModel.from_pretrained(%r)`)", model_dir, str(model_dir))
    logger.info("Open the demo on it (from a voxlm checkout): VOXLM_MODEL=%s VOXLM_CLIP_MODEL=%s python spaces/app.py",
                model_dir, clip_dir)
    return results


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="run the main job: phantoms -> VoxCLIP -> align -> finetune -> evaluate",
        description="Train and evaluate the whole M3D-LaMed pipeline on synthetic head CTs, on a CPU.\n"
        "Example: voxlm quickstart --output-dir voxlm-quickstart",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = QuickstartSettings()
    parser.add_argument("--output-dir", default=defaults.output_dir, help="where results go")
    parser.add_argument("--llm", default=defaults.llm, help="tiny-llama (default), smollm2, or a causal LM id")
    parser.add_argument("--num-cases", type=int, default=defaults.num_cases, help="phantom patients")
    parser.add_argument("--clip-steps", type=int, help="default: training/configs/clip_phantoms.yaml's")
    parser.add_argument("--align-steps", type=int, help="default: training/configs/align_phantoms.yaml's")
    parser.add_argument("--finetune-steps", type=int, help="default: training/configs/finetune_phantoms.yaml's")
    parser.add_argument("--eval-samples", type=int, default=defaults.eval_samples,
                        help="held-out samples for segmentation (half) and retrieval (the pool)")
    parser.add_argument("--closed-vqa-samples", type=int, default=defaults.closed_vqa_samples,
                        help="held-out closed questions to score (default: all of them)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--overwrite", action="store_true", help="replace what an earlier run left in --output-dir")
    parser.set_defaults(func=lambda args: run_quickstart(QuickstartSettings(
        output_dir=args.output_dir, llm=args.llm, num_cases=args.num_cases, clip_steps=args.clip_steps,
        align_steps=args.align_steps, finetune_steps=args.finetune_steps, eval_samples=args.eval_samples,
        closed_vqa_samples=args.closed_vqa_samples, seed=args.seed, overwrite=args.overwrite)))
