"""Metrics against hand computations and reference libraries; perfect predictions score the maximum, empty the minimum."""

import math

import numpy as np
import pytest
from nltk.translate.bleu_score import sentence_bleu as nltk_sentence_bleu

from voxlm.evaluation import box_iou_3d, closed_vqa_correct, dice, retrieval_recall, text_metrics, zero_shot_scores
from voxlm.evaluation.metrics import meteor, rouge, sentence_bleu, tokenize_13a

REFERENCE = "There is a large acute subdural hematoma along the left convexity."
PREDICTION = "There is a subdural hematoma on the left."


def test_bleu_1_by_hand():
    # 13a tokens: prediction 9 (with the final "."), reference 12; matches: there is a subdural hematoma the left . = 8
    assert len(tokenize_13a(PREDICTION)) == 9 and len(tokenize_13a(REFERENCE)) == 12
    expected = 8 / 9 * math.exp(1 - 12 / 9)
    assert sentence_bleu(PREDICTION, REFERENCE, max_order=1) == pytest.approx(expected)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_bleu_n_matches_nltk_without_smoothing(order):
    weights = tuple([1 / order] * order)
    expected = nltk_sentence_bleu([tokenize_13a(REFERENCE)], tokenize_13a(PREDICTION), weights=weights)
    assert sentence_bleu(PREDICTION, REFERENCE, max_order=order) == pytest.approx(expected, abs=1e-9)


def test_perfect_and_empty_predictions_bound_every_text_metric():
    perfect = text_metrics([REFERENCE], [REFERENCE])
    empty = text_metrics([""], [REFERENCE])
    for name in ("bleu_1", "bleu_4", "rouge_1", "rouge_l"):
        assert perfect[name] == pytest.approx(1.0) and empty[name] == 0.0, name
    assert perfect["meteor"] > 0.99 and empty["meteor"] == 0.0


def test_rouge_1_by_hand():
    # unigram overlap 7 of 8 prediction tokens and 11 reference tokens (rouge_score drops punctuation, lowercases)
    precision, recall = 7 / 8, 7 / 11
    assert rouge(PREDICTION, REFERENCE) == pytest.approx(2 * precision * recall / (precision + recall))


def test_meteor_uses_wordnet_synonyms():
    # nltk matches synonyms after stemming, so the pair must survive the Porter stemmer ("sick" / "ill").
    assert meteor("the patient is sick", "the patient is ill") == pytest.approx(1 - 0.5 * (1 / 4) ** 3)
    assert meteor("the patient is table", "the patient is ill") < 0.8


@pytest.mark.parametrize(
    "output, answer, correct",
    [
        ("B. Right", "B. Right", True),
        ("The answer is B.", "B. Right", True),
        ("B", "B. Right", False),  # no period after the letter
        ("Bleed. B", "B. Right", False),  # a letter inside a word does not count
        ("A. Left B. Right", "B. Right", True),  # several letters: M3D's rule accepts any occurrence
        ("Right", "B. Right", False),
        ("Yes.", "Yes.", True),
        ("No, there is none.", "Yes.", False),
    ],
)
def test_closed_vqa_follows_m3d_rule_on_tricky_outputs(output, answer, correct):
    assert closed_vqa_correct(output, answer) is correct


def test_retrieval_recall_on_a_crafted_similarity():
    similarity = np.array([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.0, 0.9, 0.5]])
    recall = retrieval_recall(similarity, ks=(1, 2))
    assert recall["i2t_r@1"] == pytest.approx(1 / 3) and recall["i2t_r@2"] == pytest.approx(1.0)
    assert recall["t2i_r@1"] == pytest.approx(2 / 3)  # text 1: image 2 scores higher; texts 0 and 2 rank first
    assert retrieval_recall(np.eye(5))["i2t_r@1"] == 1.0


def test_dice_soft_hard_and_m3d_negative_labels():
    target = np.array([[1, 1, 0, -1]])
    probabilities = np.array([[0.8, 0.6, 0.2, 0.0]])
    assert dice(probabilities, target, smooth=0) == pytest.approx(2 * 1.4 / (1.6 + 2))
    assert dice(probabilities, target, threshold=0.5) == pytest.approx(1.0)
    assert dice(np.zeros(4), np.ones(4), smooth=0) == 0.0


def test_box_iou():
    assert box_iou_3d([0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]) == pytest.approx(1.0)
    assert box_iou_3d([0, 0, 0, 0.5, 1, 1], [0.25, 0, 0, 0.75, 1, 1]) == pytest.approx(0.25 / 0.75)
    assert box_iou_3d([0, 0, 0, 0.1, 0.1, 0.1], [0.5, 0.5, 0.5, 1, 1, 1]) == 0.0


def test_zero_shot_scores():
    scores = zero_shot_scores([0, 1, 1, 0], [[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]])
    # positives 0.8, 0.6 against negatives 0.1, 0.7: 3 of 4 pairs ordered; argmax recalls 1/2 and 2/2
    assert scores["macro_auc"] == pytest.approx(0.75) and scores["balanced_accuracy"] == pytest.approx(0.75)


SEED_002_ANSWERS = [
    "No, no ICH currently can be found. Slightly generalized atrophic change of the brain parenchyma with widening "
    "of sulci and dilated ventricular system. A small old infarct in left thalamus. No definite abnormal enhancing "
    "lesions. No obvious midline shifting or intracerebral hemorrhage can be found in this exam.",
    "The appearance of a ventricular shunting catheter. Mild dilatation of ventricular sizes with abnormal hypodense "
    "change in periventricular white matter, in favor of subependymal CSF resorption or mild hydrocephalus. No "
    "significant findings can be identified in the rest of the brain parenchyma. CONCLUSION: atrophy and ventricular "
    "dilatation, recommend follow up examination and if necessary, clinical correlation.",
]


def test_seed_002_example_answers_in_table_1_format():
    from voxlm.evaluation.report import table1

    # Each answer against itself scores the maximum; against the other, BLEU-n equals nltk's on the same tokens.
    perfect = text_metrics(SEED_002_ANSWERS, SEED_002_ANSWERS)
    assert all(perfect[key] == pytest.approx(1.0) for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_1"))
    crossed = text_metrics(SEED_002_ANSWERS, list(reversed(SEED_002_ANSWERS)))
    expected = nltk_sentence_bleu([tokenize_13a(SEED_002_ANSWERS[1])], tokenize_13a(SEED_002_ANSWERS[0]),
                                  weights=(0.5, 0.5))
    second = nltk_sentence_bleu([tokenize_13a(SEED_002_ANSWERS[0])], tokenize_13a(SEED_002_ANSWERS[1]),
                                weights=(0.5, 0.5))
    assert crossed["bleu_2"] == pytest.approx((expected + second) / 2)
    assert 0 < crossed["meteor"] < 1 and 0 < crossed["rouge_1"] < 1
    table = table1({"CQ500": perfect, "PhysioNet": crossed})
    assert table.splitlines()[0] == "| Dataset | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-1 | METEOR |"
    assert table.splitlines()[2].startswith("| CQ500 | 1.000000 | 1.000000")


def test_bertscore_with_a_local_model_or_reported_as_not_computed(minilm_dir):
    from voxlm.evaluation.metrics import bertscore_f1

    same = bertscore_f1([REFERENCE], [REFERENCE], model=str(minilm_dir), num_layers=6)
    other = bertscore_f1([PREDICTION], [REFERENCE], model=str(minilm_dir), num_layers=6)
    assert same["bertscore_f1"] == pytest.approx(1.0, abs=1e-4) and 0 < other["bertscore_f1"] < 1
    missing = bertscore_f1([PREDICTION], [REFERENCE])
    assert missing["bertscore_f1"] is None and "not computed" in missing["bertscore_note"]
    offline = bertscore_f1([PREDICTION], [REFERENCE], model="microsoft/deberta-xlarge-mnli", num_layers=40)
    assert offline["bertscore_f1"] is None and "offline" in offline["bertscore_note"]
