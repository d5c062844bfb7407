"""Losses of voxlm's models, kept out of the models' `forward` so each can be tested and weighted on its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy, averaged over the positions whose label is not `IGNORE_INDEX`, or summed and divided
    by `num_items_in_batch` (transformers' convention under gradient accumulation: the labelled tokens of every
    micro-batch of an optimizer step, so that each token weighs the same however the answers fall into micro-batches).

    Args:
        logits (`torch.Tensor` of shape `(B, L, V)`, or `(B, K, V)` with `positions`): LM logits.
        labels (`torch.Tensor` of shape `(B, L)`): token ids, `-100` where no loss is wanted; shifted here.
        positions (`torch.LongTensor` of shape `(K,)`, *optional*): the sequence positions that `logits` hold (as
            computed with `logits_to_keep`, see `label_positions`); `None`: every position.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): the divisor of the summed loss; `None`: this
            batch's labelled tokens.
    """
    if positions is None:
        # (B, L - 1, V), (B, L - 1)
        return token_cross_entropy(logits[:, :-1], labels[:, 1:].to(logits.device), num_items_in_batch)
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, positions.to(labels.device) + 1]  # (B, K): the next token
    return token_cross_entropy(logits, targets.to(logits.device), num_items_in_batch)


def num_label_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The tokens `causal_lm_loss` predicts in a batch (`labels (B, L)`: the shifted labels that are not
    `IGNORE_INDEX`): what `num_items_in_batch` counts."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """The sequence positions whose next token carries a label in some row: the only logits a training step needs.

    An answer is a few tokens after hundreds of image and prompt tokens, so projecting only these positions onto the
    vocabulary (`logits_to_keep`) saves most of the LM head's work and memory.

    Args:
        labels (`torch.Tensor` of shape `(B, L)`): token ids, `-100` where no loss is wanted.

    Returns:
        `torch.LongTensor` of shape `(K,)`: increasing positions in `[0, L - 1)`.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                        num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy averaged over the positions whose label is not `IGNORE_INDEX` (or summed and divided by
    `num_items`); 0 (still attached to the graph) when there is none, as in a batch of image-only rows or an MLM draw
    that masked nothing.

    The MLM loss (MG-3D) and the report-generation loss (COLIPRI) are this function on their own targets.

    Args:
        logits (`torch.Tensor` of shape `(..., V)`): token logits.
        labels (`torch.Tensor` of shape `(...)`): target ids, `-100` where no loss is wanted.
    """
    losses = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="sum")
    if num_items is None:
        num_items = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return losses / num_items


def report_generation_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, has_report: torch.Tensor
) -> torch.Tensor:
    """Next-token targets of a report read left to right: position t predicts token t + 1.

    Args:
        input_ids (`torch.Tensor` of shape `(B, L)`): tokenized reports (right padded, BERT's `[CLS] ... [SEP]`).
        attention_mask (`torch.Tensor` of shape `(B, L)`): 1 on real tokens.
        has_report (`torch.Tensor` of shape `(B,)`): `False` for image-only rows, which get no target.

    Returns:
        `torch.Tensor` of shape `(B, L)`: `input_ids[:, t + 1]` where that token is real and the row has a report,
        else `-100` (always in the last column).
    """
    valid = attention_mask.bool() & has_report.bool()[:, None]  # (B, L)
    targets = input_ids.masked_fill(~valid, IGNORE_INDEX)  # (B, L)
    return F.pad(targets[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, L - 1) -> (B, L)


def normalized_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's reconstruction targets: each patch standardised by its own mean and variance (`norm_pix_loss`).

    Args:
        patches (`torch.Tensor` of shape `(B, N, P)`): flattened patches (from `patchify`).
        eps (`float`, defaults to 1e-6): added to the variance (MAE's value), so a constant patch becomes zeros.
    """
    mean = patches.mean(dim=-1, keepdim=True)  # (B, N, 1)
    var = patches.var(dim=-1, keepdim=True, unbiased=True)  # MAE's torch.var default (unbiased)
    return (patches - mean) / (var + eps).sqrt()


def masked_reconstruction_loss(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE per patch (mean over its voxels), averaged over the patches where `mask` is 1 (MAE); 0 when none is.

    Args:
        predictions (`torch.Tensor` of shape `(B, N, P)`): the decoder's patches.
        targets (`torch.Tensor` of shape `(B, N, P)`): the targets (`normalized_patches`).
        mask (`torch.Tensor` of shape `(B, N)`): 1 on the patches that count (masked patches of the selected rows).
    """
    per_patch = (predictions.float() - targets.float()).pow(2).mean(dim=-1)  # (B, N)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


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


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor across processes, keeping gradients (identity in a single process).

    With every process computing the loss over the global batch, `all_gather`'s backward (a sum over processes) and
    DDP's gradient averaging give exactly the gradients of one process holding the whole batch.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(features), dim=0)


def infonce_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): pair i of the batch is the positive of row i and of column i.

    Args:
        image_embeds (`torch.Tensor` of shape `(N, P)`), text_embeds (`torch.Tensor` of shape `(N, P)`): L2-normalised.
        logit_scale (`torch.Tensor`): the log temperature; logits are `exp(logit_scale) * cosine`.
    """
    logits = logit_scale.exp() * image_embeds @ text_embeds.T  # (N, N)
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def siglip_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: every pair is a binary problem (positive on the diagonal), summed per image.

    Args:
        image_embeds (`torch.Tensor` of shape `(N, P)`), text_embeds (`torch.Tensor` of shape `(N, P)`): L2-normalised.
        logit_scale (`torch.Tensor`), logit_bias (`torch.Tensor`): logits are `exp(scale) * cosine + bias`.
    """
    logits = logit_scale.exp() * image_embeds @ text_embeds.T + logit_bias  # (N, N)
    signs = 2 * torch.eye(logits.shape[0], device=logits.device) - 1
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


def inter_patient_targets(text_embeds: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """MG-3D's soft targets from report-report cosine similarity.

    Note: our reading of MG-3D (arXiv 2412.05876): pairs at or above `high` describe the same findings and are
    positives (target 1), pairs at or below `low` are unrelated (target 0), and pairs in between keep their
    similarity as a soft target.

    Args:
        text_embeds (`torch.Tensor` of shape `(N, P)`): L2-normalised report embeddings (detached by the caller).
        low (`float`), high (`float`): the two thresholds (0.6 and 0.9 in MG-3D).
    """
    similarity = text_embeds @ text_embeds.T  # (N, N)
    targets = torch.where(similarity >= high, torch.ones_like(similarity), similarity)
    return torch.where(similarity <= low, torch.zeros_like(similarity), targets)


def inter_patient_loss(image_embeds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L1 between image-image cosine similarity `(N, N)` and the soft targets (MG-3D's inter-patient term)."""
    return (image_embeds @ image_embeds.T - targets).abs().mean()
