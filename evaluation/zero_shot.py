"""Zero-shot classification with a VoxCLIP, of a volume or of a whole study: each class is the mean embedding of several
prompts (a prompt ensemble), since single prompts give unstable results (as Merlin and HLIP users report)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES = (
    "{}.",
    "Findings: {}.",
    "Impression: {}.",
    "Non-contrast head CT showing {}.",
    "The scan demonstrates {}.",
)


@torch.no_grad()
def class_embeddings(clip_model, processor, class_prompts: dict[str, list[str]], templates=DEFAULT_TEMPLATES):
    """One normalised embedding per class: the mean over its prompts x templates, normalised again.

    Args:
        clip_model (`VoxCLIPModel`): the pre-trained pair.
        processor (`VoxCLIPProcessor`): its processor, which tokenizes the prompts.
        class_prompts (`dict[str, list[str]]`): class name -> descriptions (e.g. `{"hemorrhage": ["acute
            intracranial hemorrhage"], "normal": ["no acute intracranial abnormality"]}`).
        templates (`tuple[str, ...]`): sentence templates with one `{}` for the description.

    Returns:
        `torch.Tensor` of shape `(C, P)`, rows in the order of `class_prompts`.
    """
    rows = []
    for prompts in class_prompts.values():
        texts = [template.format(prompt) for prompt in prompts for template in templates]
        tokens = processor(text=texts)
        embeds = F.normalize(clip_model.get_text_features(tokens["input_ids"], tokens["attention_mask"]), dim=-1)
        rows.append(F.normalize(embeds.mean(dim=0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_probabilities(
    clip_model, pixel_values: torch.Tensor, classes: torch.Tensor, scan_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Class probabilities of volumes or of whole studies against class embeddings.

    Args:
        clip_model (`VoxCLIPModel`): the pre-trained pair (a study-mode encoder for studies).
        pixel_values (`torch.Tensor` of shape `(B, C_in, D, H, W)` or `(B, S, C_in, D, H, W)`): volumes, or studies of
            S scans (`StudyCollator` pads them).
        classes (`torch.Tensor` of shape `(C, P)`): normalised class embeddings ([`class_embeddings`]).
        scan_mask (`torch.Tensor` of shape `(B, S)`, *optional*): for studies, `True` on real scans; `None`: all real.

    Returns:
        `torch.Tensor` of shape `(B, C)`: one probability per class, each row summing to 1.
    """
    images = F.normalize(clip_model.get_image_features(pixel_values, scan_mask=scan_mask), dim=-1)  # (B, P)
    return (clip_model.logit_scale.exp() * images @ classes.T).softmax(dim=-1)
