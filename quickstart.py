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

from voxlm.training import finetune, pretrain_projector, train_clip
from voxlm.training.assemble import ModelSettings
from voxlm.data import write_phantom_dataset
from voxlm.training.loop import RunSettings
from voxlm.training.mllm import InstructionDataSettings, MLLMSettings
from voxlm.training.trainable import LoraSettings

logger = logging.getLogger(__name__)

# Max pooling of the patch tokens: with CLS (M3D-CLIP's choice) or mean pooling this small ViT does not learn from
# phantoms within a CPU budget (the finding sits in one or two of 64 patches); with max pooling it detects hemorrhage
# at 0.94 held-out accuracy after 220 steps (benchmarks/RESULTS.md, "Why the encoder did not learn").
VISION = {"patch_size": [4, 16, 16], "hidden_size": 192, "intermediate_size": 384, "num_hidden_layers": 3,
          "num_attention_heads": 4, "pooling": "max"}

# The held-out samples are drawn across every test patient (stored order would give a dozen patients' questions).
EVAL_SHUFFLE_BUFFER = 4096


@dataclass
class QuickstartSettings:
    """The sizes of the quickstart (defaults: 11 to 13 minutes on 2 CPU cores).

    Args:
        output_dir (`str`): everything goes here; the final model in `<output_dir>/model`.
        num_cases (`int`): phantom patients (a quarter held out for testing).
        phantom_shape (`list[int]`), image_size (`list[int]`): stored and model volume sizes `(D, H, W)`.
        llm (`str`): `"tiny-llama"`, `"smollm2"` (packaged, offline) or any causal LM folder / Hub id.
        clip_steps (`int`), align_steps (`int`), finetune_steps (`int`): the stages' lengths.
        clip_batch_size (`int`): pre-training batch (contrastive learning needs many negatives per batch).
        batch_size (`int`): the batch of the MLLM stages.
        finetune_tasks (`dict[str, float]`): the fine-tuning task mix (dataset configs and their probabilities).
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
    image_size: list[int] = field(default_factory=lambda: [16, 64, 64])
    llm: str = "tiny-llama"
    clip_steps: int = 300
    align_steps: int = 60
    # The four-choice questions need the most steps: the tiny Llama starts to point from an option's text to its
    # letter between 3,000 and 4,500 steps (benchmarks/RESULTS.md, the quickstart).
    finetune_steps: int = 4500
    clip_batch_size: int = 32
    batch_size: int = 8
    finetune_tasks: dict = field(default_factory=lambda: {"vqa": 0.75, "seg": 0.2, "pos": 0.05})
    eval_samples: int = 100
    closed_vqa_samples: int | None = None
    seed: int = 0
    overwrite: bool = False


def run(settings: QuickstartSettings, stage_settings: dict, name: str) -> RunSettings:
    return RunSettings(output_dir=str(Path(settings.output_dir) / name), seed=settings.seed, tracker="tensorboard",
                       checkpoint_every=250, overwrite=settings.overwrite,
                       **{"batch_size": settings.batch_size, **stage_settings})


def evaluate_quickstart(data: Path, clip_dir: Path, model_dir: Path, eval_samples: int,
                        closed_vqa_samples: int | None) -> tuple[list[dict], dict]:
    """Held-out results as `model-index`-ready records, and the closed-VQA details (accuracy per question and every
    prediction)."""
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    import voxlm  # noqa: F401
    from voxlm.evaluation.cli import held_out_samples
    from voxlm.evaluation.runner import evaluate_closed_vqa, evaluate_retrieval, evaluate_segmentation

    def held_out(task: str, limit: int | None) -> list[dict]:
        return held_out_samples(data, task, volume_processor, limit, shuffle_buffer=EVAL_SHUFFLE_BUFFER)

    model, processor = AutoModel.from_pretrained(model_dir), AutoProcessor.from_pretrained(model_dir)
    volume_processor = processor.image_processor
    closed = evaluate_closed_vqa(model, processor, held_out("vqa-closed", closed_vqa_samples))
    seg = evaluate_segmentation(model, processor, held_out("seg", eval_samples // 2))
    clip = AutoModel.from_pretrained(clip_dir)
    retrieval = evaluate_retrieval(clip, AutoTokenizer.from_pretrained(clip_dir),
                                   held_out("retrieval", eval_samples), pool_size=eval_samples)
    dataset = "voxlm-phantoms"
    records = [
        dict(task="closed VQA", task_type="visual-question-answering", dataset=dataset, split="test",
             metric="accuracy", variant=f"M3D letter rule, n={closed['num_samples']}", value=closed["accuracy_m3d"]),
        dict(task="segmentation", task_type="image-segmentation", dataset=dataset, split="test", metric="dice",
             variant=f"soft, M3D, n={seg['num_samples']}", value=seg["dice_soft"]),
        dict(task="segmentation", task_type="image-segmentation", dataset=dataset, split="test", metric="dice",
             variant=f"hard at 0.5, n={seg['num_samples']}", value=seg["dice_hard"]),
        dict(task="retrieval", task_type="image-text-retrieval", dataset=dataset, split="test", metric="recall@5",
             variant=f"image to report, pool {retrieval['pool_size']}", value=retrieval["i2t_r@5"]),
        dict(task="retrieval", task_type="image-text-retrieval", dataset=dataset, split="test", metric="recall@1",
             variant=f"image to report, pool {retrieval['pool_size']}", value=retrieval["i2t_r@1"]),
    ]
    return records, {key: closed[key] for key in ("per_question", "predictions")}


def run_quickstart(settings: QuickstartSettings) -> list[dict]:
    """Run every stage; return the held-out results (also written to `results.json` and the model card)."""
    from voxlm.model_cards import render_voxlm_card, results_table

    out = Path(settings.output_dir)
    logger.info("1/5 Writing %d phantom head CTs to %s", settings.num_cases, out / "data")
    data = write_phantom_dataset(out / "data", settings.num_cases, shape=tuple(settings.phantom_shape),
                                 seed=settings.seed, test_fraction=0.25, rows_per_shard=256,
                                 overwrite=settings.overwrite)
    logger.info("2/5 Pre-training VoxCLIP (%d steps)", settings.clip_steps)
    # The packaged MiniLM stays locked (only its projection trains): the encoder learns to meet a fixed text space
    # with no backward pass through the text tower, which is what fits pre-training in the CPU budget.
    clip_dir = train_clip.train(train_clip.ClipSettings(
        model=train_clip.ClipModelSettings(image_size=settings.image_size, vision_config=VISION, projection_dim=128,
                                           text_trainable_layers=0),
        data=train_clip.ClipDataSettings(path=str(data)),
        run=run(settings, {"max_steps": settings.clip_steps, "batch_size": settings.clip_batch_size,
                           "learning_rate": 3e-4, "warmup_steps": 10}, "clip"),
    ))
    # The volume embedding that VoxCLIP aligned with reports goes to the LLM as one more image token: a tiny LLM
    # trained from scratch reads a finding from it within the budget, not from the patch tokens alone.
    model_settings = ModelSettings(llm=settings.llm, vision=str(clip_dir), image_size=settings.image_size,
                                   pooling_size=[1, 2, 2], pooled_image_token=True)
    logger.info("3/5 Aligning the projector (%d steps)", settings.align_steps)
    aligned = pretrain_projector.train(MLLMSettings(
        model=model_settings, data=InstructionDataSettings(path=str(data)),
        run=run(settings, {"max_steps": settings.align_steps, "learning_rate": 1e-3, "find_unused_parameters": True},
                "align"),
    ))
    # A random tiny Llama has no pre-training to protect and cannot learn language through LoRA (its embeddings and
    # output head stay frozen and random), so it trains fully; a real LLM gets LoRA r=16 as in seed 002. The encoder
    # keeps what pre-training taught it.
    full_llm = settings.llm == "tiny-llama"
    logger.info("4/5 Fine-tuning (%s) with segmentation (%d steps)", "full LLM" if full_llm else "LoRA",
                settings.finetune_steps)
    tuned = finetune.train(MLLMSettings(
        init_from=str(aligned), lora=LoraSettings(enabled=not full_llm),
        data=InstructionDataSettings(path=str(data), tasks=settings.finetune_tasks),
        run=run(settings, {"max_steps": settings.finetune_steps, "learning_rate": 2e-3 if full_llm else 5e-4,
                           "find_unused_parameters": True}, "finetune"),
    ))
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
        preprocessing=f"brain window (0-80 HU), foreground crop, resize to {settings.image_size}",
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
    parser.add_argument("--clip-steps", type=int, default=defaults.clip_steps)
    parser.add_argument("--align-steps", type=int, default=defaults.align_steps)
    parser.add_argument("--finetune-steps", type=int, default=defaults.finetune_steps)
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
