"""Evaluation: M3D-Bench metrics (exact) and the standard variants."""

from .metrics import (
    MetricDataMissingError,
    box_iou_3d,
    closed_vqa_accuracy,
    closed_vqa_correct,
    dice,
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
    "retrieval_recall",
    "text_metrics",
    "zero_shot_scores",
]
