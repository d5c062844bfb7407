"""Writes `reference.json`: M3D-Bench's numbers on fixed inputs, computed by the benchmark's own code.

    python tests/m3d_bench/make_reference.py --evaluate EVALUATE_GIT --nmt NMT_GIT --m3d M3D_GIT

The three arguments are git directories of the public repositories (e.g. `/work/.mirror/<owner>+<name>/repo`):
huggingface/evaluate (the `bleu`, `rouge` and `meteor` metric scripts that M3D's `Bench/eval` scripts load),
tensorflow/nmt (`nmt/scripts/bleu.py`, which `evaluate`'s `bleu` imports from GitHub at load time) and BAAI-DCAI/M3D
(`Bench/utils.py`: `extract_box_from_text`, `calculate_iou`; `Bench/eval/metrics.py`: `BinaryDice`;
`Bench/eval/eval_itr.py`: `calculate_recall`). Their files are read from the commits named in the output, into a
temporary folder, and run unchanged, except:

- `evaluate`'s `bleu.py` names the URL of TF-NMT's `bleu.py` in a comment that `evaluate.load` downloads; the comment
  is pointed at the local copy instead.
- M3D's modules import what their functions do not use (`rouge`, its datasets, its CLIP model); those imports get
  empty stand-ins. `eval_itr.py` takes `torch` from its `from LaMed.src.model.CLIP import *`, so that stand-in holds
  `torch`.
- `evaluate`'s `meteor` calls `nltk.download` (no network here: it fails and goes on) and then reads nltk's data:
  the English punkt_tab model and WordNet 3.0, both as voxlm provides them offline
  (`voxlm.evaluation.metrics.load_punkt`, `load_wordnet`: nltk's own reader over Debian's `wordnet-base`): the data,
  not voxlm's metric code, is shared. `nltk.corpus.wordnet`, the default of `meteor_score`'s `wordnet` argument, is
  loaded with that reader the way nltk's lazy corpus loader loads itself (it takes the reader's class and state).

Every text pair is scored one at a time, as M3D's scripts do, after M3D's `postprocess_text` (stripped texts, the
reference as a one-item list).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent

# Report sentences and short answers as M3D-Cap and M3D-VQA hold them: punctuation, numbers, units, casing,
# abbreviations, several sentences, empty and one-word texts.
TEXT_PAIRS = [
    ("Left kidney.", "The left kidney"),
    ("The left kidney", "Left kidney."),
    ("No acute intracranial hemorrhage.", "No acute intracranial hemorrhage."),
    ("There is no intracranial hemorrhage", "No intracranial hemorrhage is seen."),
    ("A 3.5 cm mass in the right hepatic lobe.", "Right hepatic lobe mass measuring 3.5 cm."),
    ("Dr. Smith reviewed the scan; e.g. the liver is normal.", "The liver is normal, e.g. no focal lesion."),
    ("Axial", "axial"),
    ("Coronal plane.", "Axial"),
    ("", "The lungs are clear."),
    ("The lungs are clear.", ""),
    ("Findings: Mild cardiomegaly. Impression: No acute process.",
     "Impression: mild cardiomegaly, no acute cardiopulmonary process."),
    ("Hemorrhages in the left frontal lobe and the right parietal lobe.",
     "Hemorrhage in the left frontal lobe."),
    ("Multiple hypodense lesions, largest 2.1 x 1.8 cm, in segment VII.",
     "Multiple hypodense liver lesions; the largest measures 2.1 x 1.8 cm in segment 7."),
    ("The patient's C5-C6 disc shows mild bulging.", "Mild disc bulge at C5-C6."),
    ("Status post right nephrectomy. No recurrence.", "S/p right nephrectomy without evidence of recurrence."),
    ("Contrast-enhanced CT (portal venous phase) of the abdomen.", "Portal venous phase contrast-enhanced CT."),
    ("It is a pneumothorax on the left side.", "Left-sided pneumothorax."),
    ("Stomach", "The stomach."),
    ("Pancreas, body and tail.", "The body and tail of the pancreas"),
    ("No fracture. No dislocation. Soft tissues are unremarkable.",
     "No acute fracture or dislocation; unremarkable soft tissues."),
    ("Enlarged lymph nodes (up to 1.5 cm) in the mediastinum, i.e. lymphadenopathy.",
     "Mediastinal lymphadenopathy with nodes up to 1.5cm."),
    ("Arterial phase", "Non-contrast"),
    ("The aorta is of normal caliber.", "Normal caliber of the abdominal aorta."),
    ("Bilateral pleural effusions, larger on the right.", "Bilateral pleural effusions, right greater than left."),
    ("HEMORRHAGE IN THE LEFT BASAL GANGLIA.", "Hemorrhage in the left basal ganglia."),
    ("A cyst (10 mm) in the left kidney's upper pole.", "10-mm cyst, upper pole of the left kidney."),
    ("Dr. Lee: no change since 01/02/2020.", "No interval change since January 2, 2020."),
    ("The gallbladder is distended with stones.", "Cholelithiasis with gallbladder distension."),
    ("   Spleen is normal in size.   ", "Normal spleen size."),
    ("Mass effect with 5 mm midline shift to the right.", "There is a 5-mm rightward midline shift."),
    ("Degenerative changes, e.g. osteophytes, at L4/L5.", "Osteophytes at L4-L5 (degenerative)."),
    ("Small amount of free fluid in the pelvis. Otherwise normal.", "Trace pelvic free fluid."),
    ("Yes.", "No."),
    ("B. Right", "B. Right"),
    ("The answer is C. Liver", "C. Liver"),
    ("Thyroid nodules: 3; the largest is 12 mm!", "Three thyroid nodules, the largest 12 mm."),
]

# Model answers and reference answers in M3D's positioning format (`[x1, y1, z1, x2, y2, x2]` in [0, 1]), with and
# without voxlm's box tokens, and answers without a parseable box.
BOX_PAIRS = [
    ("The liver is at [0.1, 0.2, 0.3, 0.5, 0.6, 0.7].", "[0.1, 0.2, 0.3, 0.5, 0.6, 0.7]"),
    ("<bx_start>[0.125, 0.250, 0.250, 0.500, 0.750, 0.625]<bx_end>", "[0.1, 0.25, 0.3, 0.5, 0.7, 0.6]"),
    ("Here: [0.2, 0.2, 0.2, 0.4, 0.4, 0.4] and [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]", "[0.3, 0.3, 0.3, 0.6, 0.6, 0.6]"),
    ("[0.6, 0.6, 0.6, 0.9, 0.9, 0.9]", "[0.1, 0.1, 0.1, 0.3, 0.3, 0.3]"),
    ("[0.1, 0.2, 0.3, 0.5, 0.6]", "[0.1, 0.2, 0.3, 0.5, 0.6, 0.7]"),
    ("[0.1,0.2,0.3,0.5,0.6,0.7]", "[0.1, 0.2, 0.3, 0.5, 0.6, 0.7]"),
    ("No box here.", "[0.1, 0.2, 0.3, 0.5, 0.6, 0.7]"),
    ("[1, 0, 0.5, 1, 1, 1]", "[0.5, 0.5, .25, 1, 1, 1]"),
    ("[-0.1, 0.2, 0.3, 0.5, 0.6, 0.7]", "[0.0, 0.2, 0.3, 0.5, 0.6, 0.7]"),
    ("[0.2, 0.2, 0.2, 0.2, 0.4, 0.4]", "[0.2, 0.2, 0.2, 0.4, 0.4, 0.4]"),
]


def git_file(git_dir: str, path: str, destination: Path) -> str:
    """Write `path` at HEAD of `git_dir` to `destination`; return that commit."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(subprocess.run(["git", f"--git-dir={git_dir}", "show", f"HEAD:{path}"],
                                           check=True, capture_output=True).stdout)
    return subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def import_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def stand_in(name: str, **attributes) -> None:
    """An empty module for an import that the functions used here do not need."""
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module


def evaluate_metrics(evaluate_git: str, nmt_git: str, folder: Path) -> tuple[dict, str, str]:
    import evaluate

    nmt_commit = git_file(nmt_git, "nmt/scripts/bleu.py", folder / "nmt_bleu.py")
    for metric, files in {"bleu": ("bleu.py", "tokenizer_13a.py"), "rouge": ("rouge.py",),
                          "meteor": ("meteor.py",)}.items():
        for name in files:
            evaluate_commit = git_file(evaluate_git, f"metrics/{metric}/{name}", folder / metric / name)
    bleu_script = folder / "bleu" / "bleu.py"
    bleu_script.write_text(bleu_script.read_text().replace(
        "https://github.com/tensorflow/nmt/blob/master/nmt/scripts/bleu.py", str(folder / "nmt_bleu.py")))
    metrics = {metric: evaluate.load(str(folder / metric)) for metric in ("bleu", "rouge", "meteor")}
    return metrics, evaluate_commit, nmt_commit


def text_scores(metrics: dict) -> list[dict]:
    rows = []
    for prediction, reference in TEXT_PAIRS:
        predictions, references = [prediction.strip()], [[reference.strip()]]  # M3D's postprocess_text
        row = {"prediction": prediction, "reference": reference}
        try:
            row["bleu_1"] = metrics["bleu"].compute(predictions=predictions, references=references,
                                                    max_order=1)["bleu"]
        except ZeroDivisionError:
            row["bleu_1"] = None  # TF-NMT's brevity penalty divides by a length ratio of 0
        row["rouge_1"] = float(metrics["rouge"].compute(predictions=predictions, references=references,
                                                        rouge_types=["rouge1"])["rouge1"])
        row["meteor"] = float(metrics["meteor"].compute(predictions=predictions, references=references)["meteor"])
        rows.append(row)
    return rows


def m3d_scores(m3d_git: str, folder: Path) -> tuple[dict, str]:
    import torch

    commit = git_file(m3d_git, "Bench/utils.py", folder / "Bench" / "utils.py")
    git_file(m3d_git, "Bench/eval/metrics.py", folder / "Bench" / "eval" / "metrics.py")
    git_file(m3d_git, "Bench/eval/eval_itr.py", folder / "Bench" / "eval" / "eval_itr.py")
    stand_in("rouge", Rouge=None)
    stand_in("Bench")
    stand_in("Bench.dataset")
    stand_in("Bench.dataset.multi_dataset", ITRDataset=None)
    for name in ("LaMed", "LaMed.src", "LaMed.src.model"):
        stand_in(name)
    stand_in("LaMed.src.model.CLIP", torch=torch, np=np)
    utils = import_file("m3d_bench_utils", folder / "Bench" / "utils.py")
    metrics = import_file("m3d_bench_metrics", folder / "Bench" / "eval" / "metrics.py")
    itr = import_file("m3d_bench_eval_itr", folder / "Bench" / "eval" / "eval_itr.py")

    boxes = []
    for prediction, answer in BOX_PAIRS:
        predicted, target = utils.extract_box_from_text(prediction), utils.extract_box_from_text(answer)
        iou = utils.calculate_iou(predicted, target) if predicted and target else -1
        boxes.append({"prediction": prediction, "answer": answer, "prediction_box": predicted, "answer_box": target,
                      "iou": float(iou)})

    rng = np.random.default_rng(0)
    dice = []
    for case in range(4):
        logits = rng.normal(0, 3, size=(1, 1, 4, 6, 6)).astype(np.float32)
        target = (rng.random((1, 1, 4, 6, 6)) < 0.3).astype(np.float32)
        if case == 1:
            target[0, 0, 0] = -1  # M3D's "ignore" label, which its Dice counts as background
        if case == 2:
            target[:] = 0  # an empty target
        value = metrics.BinaryDice()(torch.from_numpy(logits), torch.from_numpy(target)).item()
        dice.append({"logits": logits.tolist(), "target": target.tolist(), "dice": value})

    similarity = rng.normal(size=(12, 12)).astype(np.float32)
    similarity[np.arange(12), np.arange(12)] += np.linspace(-1, 2, 12, dtype=np.float32)  # some pairs rank first
    recall = {}
    for k in (1, 5, 10):
        recall[f"image_queries_r@{k}"] = itr.calculate_recall(torch.from_numpy(similarity), k).item()
        recall[f"text_queries_r@{k}"] = itr.calculate_recall(torch.from_numpy(similarity).T, k).item()
    return {"boxes": boxes, "dice": dice, "retrieval": {"similarity": similarity.tolist(), "recall": recall}}, commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluate", required=True, help="git directory of huggingface/evaluate")
    parser.add_argument("--nmt", required=True, help="git directory of tensorflow/nmt")
    parser.add_argument("--m3d", required=True, help="git directory of BAAI-DCAI/M3D")
    args = parser.parse_args()

    import nltk

    from voxlm.evaluation.metrics import load_punkt, load_wordnet

    load_punkt()
    wordnet = load_wordnet()
    nltk.corpus.wordnet.__dict__ = wordnet.__dict__
    nltk.corpus.wordnet.__class__ = wordnet.__class__
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        metrics, evaluate_commit, nmt_commit = evaluate_metrics(args.evaluate, args.nmt, scratch / "evaluate")
        texts = text_scores(metrics)
        m3d, m3d_commit = m3d_scores(args.m3d, scratch / "m3d")
    reference = {
        "made_by": "tests/m3d_bench/make_reference.py",
        "sources": {"huggingface/evaluate": evaluate_commit, "tensorflow/nmt": nmt_commit,
                    "BAAI-DCAI/M3D": m3d_commit, "nltk": nltk.__version__},
        "texts": texts,
        **m3d,
    }
    (HERE / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")


if __name__ == "__main__":
    main()
