"""Evaluation: M3D-Bench metrics as its own code computes them (`M3D_BENCH_AUDIT.md`) and the standard variants."""

from .metrics import (
    MetricDataMissingError,
    box_iou_3d,
    closed_vqa_accuracy,
    closed_vqa_correct,
    dice,
    m3d_box_from_text,
    m3d_box_iou,
    m3d_dice,
    meteor,
    retrieval_recall,
    text_metrics,
    zero_shot_scores,
)

__all__ = [
    "MetricDataMissingError",
    "box_iou_3d",
    "closed_vqa_accuracy",
    "closed_vqa_correct",
    "dice",
    "m3d_box_from_text",
    "m3d_box_iou",
    "m3d_dice",
    "meteor",
    "retrieval_recall",
    "text_metrics",
    "zero_shot_scores",
]
