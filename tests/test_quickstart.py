"""The quickstart end to end at a tiny size: every stage runs, results are written, and the folder it leaves loads
with AutoModel in a new process and answers."""

import json
import os
import subprocess
import sys

from voxlm import cli
from voxlm.evaluation.cli import evaluate
from voxlm.quickstart import EVAL_SHUFFLE_BUFFER

# Loads a saved folder in a new process and answers the hemorrhage question about new phantoms (seeds in argv).
ANSWER_NEW_PHANTOMS = """
import json, sys, voxlm
from transformers import AutoModel, AutoProcessor
from voxlm.data import generate_case
model, processor = AutoModel.from_pretrained(sys.argv[1]).eval(), AutoProcessor.from_pretrained(sys.argv[1])
cases = [generate_case(seed, shape=(32, 64, 64)) for seed in json.loads(sys.argv[2])]
question = "Is there an intracranial hemorrhage?"
inputs = processor(images=[case.volume for case in cases], text=[question] * len(cases))
ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
print(json.dumps([answer["text"] for answer in processor.post_process_generation(ids[:, inputs["input_ids"].shape[1]:])]))
"""


def test_quickstart_runs_every_stage_and_leaves_a_loadable_model(tmp_path):
    # Through the `voxlm` command, which must exit 0 (a command's result is not an exit status).
    assert cli.main(["quickstart", "--output-dir", str(tmp_path), "--num-cases", "16", "--clip-steps", "2",
                     "--align-steps", "2", "--finetune-steps", "2", "--eval-samples", "4"]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    results = saved["results"]
    assert {r["task"] for r in results} == {"closed VQA", "segmentation", "retrieval"}
    assert all(0.0 <= r["value"] <= 1.0 for r in results)
    model_dir = tmp_path / "finetune" / "final" / "model"
    card = (model_dir / "README.md").read_text()
    assert "model-index" in card and "clinical decision-making" in card
    # Closed VQA per question category, as M3D's paper tabulates M3D-VQA: in results.json and the card's model-index.
    per_category = saved["closed_vqa"]["per_category"]
    assert set(per_category) == {"abnormality", "location"}
    assert sum(scores["num_samples"] for scores in per_category.values()) == len(saved["closed_vqa"]["predictions"])
    assert "M3D letter rule, location questions" in card and "M3D letter rule, abnormality questions" in card
    # Every stage leaves its card: VoxCLIP, the aligned VoxLM; the random tiny Llama is fine-tuned fully (no adapter).
    cards = {folder: (tmp_path / folder / "README.md").read_text() for folder in ("clip/final", "align/final")}
    assert "# voxclip-clip" in cards["clip/final"] and "| stage | pretrain-clip: 2 steps" in cards["clip/final"]
    assert "# voxlm-align-align" in cards["align/final"] and "align: 2 steps" in cards["align/final"]
    assert all("clinical decision-making" in text and "## How to load" in text for text in cards.values())
    assert not (tmp_path / "finetune" / "final" / "adapter").exists() and "LLM trained fully" in card
    result = subprocess.run([sys.executable, "-c", ANSWER_NEW_PHANTOMS, str(model_dir), "[123456]"],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads(result.stdout.strip().splitlines()[-1])) == 1

    # `voxlm evaluate` on the folder the quickstart left reproduces the numbers it printed; closed VQA scores every
    # held-out closed question (eight per test patient), not `--eval-samples` of them.
    closed = evaluate(str(model_dir), str(tmp_path / "data"), "vqa-closed", limit=1000,
                      shuffle_buffer=EVAL_SHUFFLE_BUFFER)
    printed = next(r for r in results if r["task"] == "closed VQA")
    assert closed["metrics"]["accuracy_m3d"] == printed["value"]
    assert closed["num_samples"] == len(saved["closed_vqa"]["predictions"]) > 4 and closed["num_samples"] % 8 == 0
    groups = closed["metrics"]["per_question"]
    assert groups and all(question.endswith("?") and "A." not in question for question in groups)
    assert closed["metrics"]["per_category"] == saved["closed_vqa"]["per_category"]
    rec = evaluate(str(model_dir), str(tmp_path / "data"), "rec", limit=2)
    assert rec["num_samples"] == 2 and 0.0 <= rec["metrics"]["iou"] <= 1.0
    reg = evaluate(str(model_dir), str(tmp_path / "data"), "reg", limit=2, max_new_tokens=4)
    assert 0.0 <= reg["metrics"]["bleu_1"] <= 1.0
    retrieval = evaluate(str(tmp_path / "clip" / "final"), str(tmp_path / "data"), "retrieval", limit=4,
                         shuffle_buffer=EVAL_SHUFFLE_BUFFER)
    printed = next(r for r in results if r["metric"] == "recall@5")
    assert retrieval["metrics"]["i2t_r@5"] == printed["value"]


def test_quickstart_model_answers_about_new_phantoms_better_than_chance(tmp_path):
    """A shorter quickstart (VQA-only fine-tuning, 1,200 steps) leaves a folder that, loaded in a new process, tells
    hemorrhage from no hemorrhage on new phantoms: on a balanced set any fixed answer scores exactly one half."""
    from voxlm.data import generate_case
    from voxlm.quickstart import QuickstartSettings, run_quickstart

    run_quickstart(QuickstartSettings(output_dir=str(tmp_path), align_steps=10, finetune_steps=1200,
                                      finetune_tasks={"vqa": 1.0}, eval_samples=8,
                                      closed_vqa_samples=8))
    bleeds, others = [], []
    for seed in range(100_000, 100_200):  # patients the quickstart never saw
        finding = generate_case(seed, shape=(32, 64, 64)).finding
        (bleeds if finding is not None and finding.is_hemorrhage else others).append(seed)
    seeds = bleeds[:20] + others[:20]
    result = subprocess.run([sys.executable, "-c", ANSWER_NEW_PHANTOMS, str(tmp_path / "finetune" / "final" / "model"),
                             json.dumps(seeds)], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    expected = ["Yes."] * 20 + ["No."] * 20
    correct = sum(answer.strip().startswith(truth) for answer, truth in zip(answers, expected))
    assert correct >= 28, (correct, answers)  # 0.7; a coin reaches 28 of 40 with p < 0.01, a fixed answer 20
