"""Model-facing evaluation: batched greedy generation (left padding) over dataset rows, scored with `metrics`."""

from __future__ import annotations

from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .metrics import closed_vqa_accuracy, dice, m3d_dice, retrieval_recall


def batched(iterable, size: int):
    iterator = iter(iterable)
    while batch := list(islice(iterator, size)):
        yield batch


@torch.no_grad()
def generate_answers(model, processor, samples: list[dict], max_new_tokens: int = 16, return_masks: bool = False):
    """Greedy answers (and mask logits) for preprocessed samples (`pixel_values`, `question`)."""
    inputs = processor(text=[sample["question"] for sample in samples], padding_side="left",
                       pixel_values=torch.stack([sample["pixel_values"] for sample in samples]))
    inputs = {key: value.to(model.device) for key, value in inputs.items()}
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_masks=return_masks)
    sequences = output.sequences if return_masks else output
    answers = processor.post_process_generation(sequences[:, inputs["input_ids"].shape[1] :])
    return answers, (output.masks if return_masks else None)


def accuracy_by(predictions: list[dict], key: str) -> dict[str, dict]:
    """`closed_vqa_accuracy` and the sample count of each group of predictions with the same `key`, in order of
    appearance; predictions without it are left out."""
    groups = {}
    for prediction in predictions:
        if prediction.get(key) is not None:
            groups.setdefault(prediction[key], []).append(prediction)
    return {name: {**closed_vqa_accuracy([p["output"] for p in group], [p["answer"] for p in group]),
                   "num_samples": len(group)} for name, group in groups.items()}


def evaluate_closed_vqa(model, processor, samples, batch_size: int = 8, max_new_tokens: int = 8) -> dict:
    """M3D's closed-VQA accuracy and exact match over samples with `question_type == "closed"`: overall, per question
    category (`question_category`: M3D-VQA's plane, phase, organ, abnormality, location, as M3D's paper tabulates
    them; the phantoms' abnormality and location), and per question (the question up to its "?", so the choices of
    multiple-choice questions do not split groups)."""
    outputs, answers, predictions = [], [], []
    model.eval()
    for batch in tqdm(list(batched(samples, batch_size)), desc="closed VQA"):
        generated, _ = generate_answers(model, processor, batch, max_new_tokens)
        outputs += [g["text"] for g in generated]
        answers += [sample["answer"] for sample in batch]
        predictions += [{"id": s["id"], "question": s["question"].split("?")[0] + "?", "output": g["text"],
                         "answer": s["answer"], "question_category": s.get("question_category")}
                        for s, g in zip(batch, generated)]
    return {**closed_vqa_accuracy(outputs, answers), "per_category": accuracy_by(predictions, "question_category"),
            "per_question": accuracy_by(predictions, "question"), "num_samples": len(outputs),
            "predictions": predictions}


def evaluate_segmentation(model, processor, samples, batch_size: int = 4, max_new_tokens: int = 8) -> dict:
    """M3D's soft Dice (`m3d_dice`) and the hard Dice at 0.5 of the masks the model writes `[SEG]` for; an answer
    without `[SEG]` has an all-zero mask."""
    soft, hard = [], []
    model.eval()
    for batch in tqdm(list(batched(samples, batch_size)), desc="segmentation"):
        _, masks = generate_answers(model, processor, batch, max_new_tokens, return_masks=True)
        for sample, mask in zip(batch, masks):
            target = sample["seg_masks"].numpy()
            probabilities = np.zeros_like(target) if mask is None else mask.sigmoid().cpu().numpy()
            soft.append(m3d_dice(probabilities, target))
            hard.append(dice(probabilities, target, threshold=0.5))
    return {"dice_soft": float(np.mean(soft)), "dice_hard": float(np.mean(hard)), "num_samples": len(soft)}


@torch.no_grad()
def evaluate_retrieval(clip_model, processor, samples, pool_size: int = 100) -> dict:
    """Image-report retrieval recall among the first `pool_size` pairs (M3D-Bench uses 2,000)."""
    samples = list(islice(samples, pool_size))
    clip_model.eval()
    text = processor(text=[s["report"] for s in samples])  # truncated to the processor's `max_length`
    image_embeds = torch.cat([
        clip_model.get_image_features(torch.stack([s["pixel_values"] for s in batch]))
        for batch in batched(samples, 16)
    ])
    text_embeds = clip_model.get_text_features(text["input_ids"], text["attention_mask"])
    similarity = F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T
    return {**retrieval_recall(similarity.numpy()), "pool_size": len(samples)}


def evaluate_open_text(model, processor, samples, batch_size: int = 8, max_new_tokens: int = 64) -> dict:
    """Report generation and open VQA: M3D-Bench text metrics of greedy answers against the references."""
    from .metrics import text_metrics

    outputs, references = [], []
    model.eval()
    for batch in tqdm(list(batched(samples, batch_size)), desc="open text"):
        generated, _ = generate_answers(model, processor, batch, max_new_tokens)
        outputs += [g["text"] for g in generated]
        references += [sample["answer"] for sample in batch]
    return {**text_metrics(outputs, references), "num_samples": len(outputs)}


def evaluate_positioning(model, processor, samples, batch_size: int = 8, max_new_tokens: int = 48) -> dict:
    """Referring expression comprehension (REC): the first box of each answer, found as M3D finds it
    (`m3d_box_from_text`), against the sample's box. M3D's score (`m3d_box_iou`, over the enclosing box) and the IoU,
    each as a mean and as the share above 0.5; an answer without a box (M3D writes an IoU of -1) counts as 0 in both
    and is counted in `missing_boxes`."""
    from .metrics import box_iou_3d, m3d_box_from_text, m3d_box_iou

    scores = {"iou": [], "iou_m3d": []}
    missing = 0
    model.eval()
    for batch in tqdm(list(batched(samples, batch_size)), desc="positioning"):
        generated, _ = generate_answers(model, processor, batch, max_new_tokens)
        for answer, sample in zip(generated, batch):
            box = m3d_box_from_text(answer["text"])
            missing += box is None
            scores["iou"].append(0.0 if box is None else box_iou_3d(box, sample["box"]))
            scores["iou_m3d"].append(0.0 if box is None else m3d_box_iou(box, sample["box"]))
    results = {}
    for name, values in scores.items():
        results[name] = float(np.mean(values)) if values else 0.0
        results[name.replace("iou", "acc@0.5")] = float(np.mean([v > 0.5 for v in values])) if values else 0.0
    return {**results, "missing_boxes": missing, "num_samples": len(scores["iou"])}
