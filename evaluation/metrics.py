"""M3D-Bench metrics, computed exactly as M3D's `Bench/eval` scripts compute them, and the standard variants beside them.

M3D scores each sample on its own and averages: BLEU through HF `evaluate`'s `bleu` (TensorFlow-NMT BLEU over
sacrebleu's 13a tokens, `max_order=1` for BLEU-1), ROUGE-1 through `rouge_score`, METEOR through nltk. `evaluate`
downloads its metric scripts at run time, so we call the libraries those scripts wrap, offline. Closed VQA counts a
sample right when `"{letter}."` appears in the output; segmentation uses soft Dice on probabilities.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np

WORDNET_SYSTEM_FOLDER = Path("/usr/share/wordnet")  # Debian's `wordnet-base`
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


class MetricDataMissingError(RuntimeError):
    """A metric's data (WordNet for METEOR, a model for BERTScore) is not installed; the message says how to get it."""


def tokenize_13a(text: str) -> list[str]:
    """sacrebleu's 13a tokenization (what `evaluate`'s `bleu` uses)."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text).split()


def sentence_bleu(prediction: str, reference: str, max_order: int = 4) -> float:
    """BLEU of one prediction against one reference, as TensorFlow NMT's `compute_bleu` (no smoothing) computes it."""
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
    folder = Path.home() / ".cache" / "voxlm" / "wordnet"
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


def meteor(prediction: str, reference: str) -> float:
    """METEOR of one pair (nltk, on whitespace tokens as `evaluate`'s `meteor` passes them)."""
    from nltk.translate.meteor_score import meteor_score

    return float(meteor_score([reference.split()], prediction.split(), wordnet=load_wordnet()))


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


def dice(probabilities, targets, threshold: float | None = None, smooth: float = 1e-5) -> float:
    """Dice of one mask: soft on probabilities (M3D) or hard after `threshold`; `-1` targets count as 0 (M3D)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.clip(np.asarray(targets, dtype=np.float64), 0, None)
    if threshold is not None:
        probabilities = (probabilities > threshold).astype(np.float64)
    return float((2 * (probabilities * targets).sum() + smooth) / (probabilities.sum() + targets.sum() + smooth))


def box_iou_3d(box_a, box_b) -> float:
    """IoU of two boxes `(z1, y1, x1, z2, y2, x2)`."""
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    overlap = np.clip(np.minimum(a[3:], b[3:]) - np.maximum(a[:3], b[:3]), 0, None).prod()
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
