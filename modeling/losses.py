"""Losses of voxlm's models, kept out of the models' `forward` so each can be tested and weighted on its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, averaged over the positions whose label is not `IGNORE_INDEX`.

    Args:
        logits (`torch.Tensor` of shape `(B, L, V)`): LM logits.
        labels (`torch.Tensor` of shape `(B, L)`): token ids, `-100` where no loss is wanted; shifted here.
    """
    shift_logits = logits[:, :-1].float()  # (B, L - 1, V)
    shift_labels = labels[:, 1:].to(logits.device)  # (B, L - 1)
    return F.cross_entropy(shift_logits.flatten(0, 1), shift_labels.flatten(), ignore_index=IGNORE_INDEX)


def _binary_targets(targets: torch.Tensor) -> torch.Tensor:
    # Note: M3D-Seg masks use -1 for "unlabelled"; LaMed/src/model/loss.py treats it as background, and so do we.
    return targets.float().clamp(min=0.0)


def dice_loss(mask_logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss on sigmoid probabilities, one Dice per sample, averaged (M3D's `BinaryDiceLoss`).

    Args:
        mask_logits (`torch.Tensor` of shape `(B, 1, D, H, W)`): predicted logits.
        targets (`torch.Tensor` of shape `(B, 1, D, H, W)`): binary masks (`-1` counts as 0).
        smooth (`float`, defaults to 1.0): added to numerator and denominator, so empty masks score 1.
    """
    probs = mask_logits.float().sigmoid().flatten(1)  # (B, D * H * W)
    targets = _binary_targets(targets).flatten(1)
    numerator = 2 * (probs * targets).sum(dim=1) + smooth
    denominator = probs.sum(dim=1) + targets.sum(dim=1) + smooth
    return (1 - numerator / denominator).mean()


def bce_loss(mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over voxels (`-1` targets count as 0).

    Args:
        mask_logits (`torch.Tensor` of shape `(B, 1, D, H, W)`): predicted logits.
        targets (`torch.Tensor` of shape `(B, 1, D, H, W)`): binary masks.
    """
    return F.binary_cross_entropy_with_logits(mask_logits.float(), _binary_targets(targets))
