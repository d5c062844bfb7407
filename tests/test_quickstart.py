"""The quickstart end to end at a tiny size: every stage runs, results are written, and the folder it leaves loads
with AutoModel in a new process and answers."""

import json
import os
import subprocess
import sys

from voxlm import cli
from voxlm.evaluation.cli import evaluate
from voxlm.training.quickstart import EVAL_SHUFFLE_BUFFER

LOAD_AND_ANSWER = """
import sys, numpy as np, voxlm
from transformers import AutoModel, AutoProcessor
from voxlm.training.data import generate_case
model, processor = AutoModel.from_pretrained(sys.argv[1]), AutoProcessor.from_pretrained(sys.argv[1])
case = generate_case(123456, shape=(32, 48, 48))
inputs = processor(images=[case.volume], text=["Is there an intracranial hemorrhage?"])
ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
print(processor.post_process_generation(ids[:, inputs["input_ids"].shape[1]:])[0]["text"])
"""


def test_quickstart_runs_every_stage_and_leaves_a_loadable_model(tmp_path):
    # Through the `voxlm` command, which must exit 0 (a command's result is not an exit status).
    assert cli.main(["quickstart", "--output-dir", str(tmp_path), "--num-cases", "16", "--clip-steps", "2",
                     "--align-steps", "2", "--finetune-steps", "2", "--eval-samples", "4"]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    results = saved["results"]
    assert {r["task"] for r in results} == {"closed VQA", "segmentation", "retrieval"}
    assert all(0.0 <= r["value"] <= 1.0 for r in results) and len(saved["closed_vqa"]["predictions"]) == 4
    model_dir = tmp_path / "finetune" / "final" / "model"
    card = (model_dir / "README.md").read_text()
    assert "model-index" in card and "clinical decision-making" in card
    # Every stage leaves its card: VoxCLIP, the aligned VoxLM; the random tiny Llama is fine-tuned fully (no adapter).
    cards = {folder: (tmp_path / folder / "README.md").read_text() for folder in ("clip/final", "align/final")}
    assert "# voxclip-clip" in cards["clip/final"] and "| stage | pretrain-clip: 2 steps" in cards["clip/final"]
    assert "# voxlm-align-align" in cards["align/final"] and "align: 2 steps" in cards["align/final"]
    assert all("clinical decision-making" in text and "## How to load" in text for text in cards.values())
    assert not (tmp_path / "finetune" / "final" / "adapter").exists() and "LLM trained fully" in card
    result = subprocess.run([sys.executable, "-c", LOAD_AND_ANSWER, str(model_dir)], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]

    # `voxlm evaluate` on the folder the quickstart left reproduces the numbers it printed.
    closed = evaluate(str(model_dir), str(tmp_path / "data"), "vqa-closed", limit=4, shuffle_buffer=EVAL_SHUFFLE_BUFFER)
    printed = next(r for r in results if r["task"] == "closed VQA")
    assert closed["metrics"]["accuracy_m3d"] == printed["value"] and closed["num_samples"] == 4
    groups = closed["metrics"]["per_question"]
    assert groups and all(question.endswith("?") and "A." not in question for question in groups)
    rec = evaluate(str(model_dir), str(tmp_path / "data"), "rec", limit=2)
    assert rec["num_samples"] == 2 and 0.0 <= rec["metrics"]["iou"] <= 1.0
    reg = evaluate(str(model_dir), str(tmp_path / "data"), "reg", limit=2, max_new_tokens=4)
    assert 0.0 <= reg["metrics"]["bleu_1"] <= 1.0
    retrieval = evaluate(str(tmp_path / "clip" / "final"), str(tmp_path / "data"), "retrieval", limit=4,
                         shuffle_buffer=EVAL_SHUFFLE_BUFFER)
    printed = next(r for r in results if r["metric"] == "recall@5")
    assert retrieval["metrics"]["i2t_r@5"] == printed["value"]
