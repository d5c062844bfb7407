"""VoxLMProcessor: a volume processor and a tokenizer that build M3D prompts, training labels, and parse answers.

Prompt: `<im_patch>` x `num_image_tokens`, then the question, inside the tokenizer's chat template (a user turn) when
it has one. Image tokens are real added special tokens that the model finds by id (never by position).
"""

from __future__ import annotations

import re

import torch
from transformers import AddedToken
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

IMAGE_TOKEN = "<im_patch>"
BOX_START_TOKEN = "<bx_start>"
BOX_END_TOKEN = "<bx_end>"
SEG_TOKEN = "[SEG]"
IGNORE_INDEX = -100
BOX_PATTERN = re.compile(re.escape(BOX_START_TOKEN) + r"\s*\[([^\]]*)\]\s*" + re.escape(BOX_END_TOKEN))


def add_voxlm_tokens(tokenizer) -> dict[str, int]:
    """Add voxlm's tokens to a tokenizer (idempotent) and return their ids, as `VoxLMConfig` stores them.

    `<im_patch>`, `<bx_start>`, `<bx_end>` are special tokens; `[SEG]` is a normal token (M3D), so it survives
    `skip_special_tokens` in decoded answers. A tokenizer without a pad token gets its EOS token as pad.
    """
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in (IMAGE_TOKEN, BOX_START_TOKEN, BOX_END_TOKEN)], special_tokens=True)
    tokenizer.add_tokens([AddedToken(SEG_TOKEN, normalized=False)])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return {
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "seg_token_id": tokenizer.convert_tokens_to_ids(SEG_TOKEN),
        "box_start_token_id": tokenizer.convert_tokens_to_ids(BOX_START_TOKEN),
        "box_end_token_id": tokenizer.convert_tokens_to_ids(BOX_END_TOKEN),
        "pad_token_id": tokenizer.pad_token_id,
    }


def format_box(box) -> str:
    """A box `(z1, y1, x1, z2, y2, x2)` in [0, 1] (D-H-W order) as M3D's text: `<bx_start>[0.125, ...]<bx_end>`."""
    values = [float(v) for v in box]
    if len(values) != 6:
        raise ValueError(f"A box needs 6 numbers (z1, y1, x1, z2, y2, x2), got {len(values)}")
    return BOX_START_TOKEN + "[" + ", ".join(f"{min(max(v, 0.0), 1.0):.3f}" for v in values) + "]" + BOX_END_TOKEN


def parse_boxes(text: str) -> list[list[float]]:
    """Every well-formed `<bx_start>[six numbers]<bx_end>` in a text, as lists of floats; malformed ones are skipped."""
    boxes = []
    for match in BOX_PATTERN.finditer(text):
        try:
            values = [float(v) for v in match.group(1).split(",")]
        except ValueError:
            continue
        if len(values) == 6:
            boxes.append(values)
    return boxes


class VoxLMProcessor(ProcessorMixin):
    r"""
    Volume processor + tokenizer for VoxLM.

    Args:
        image_processor (`VoxVolumeProcessor`): turns volumes into `pixel_values`.
        tokenizer (`PreTrainedTokenizerBase`): the LLM's tokenizer, with voxlm's tokens added (`add_voxlm_tokens`).
        num_image_tokens (`int`, *optional*, defaults to 256): `<im_patch>` tokens per volume
            (`VoxLMConfig.num_image_tokens`).
        image_token (`str`, *optional*, defaults to `"<im_patch>"`): the placeholder token.
        system_prompt (`str`, *optional*): a system turn for chat templates; `None` keeps the template's default.
        chat_template (`str`, *optional*): overrides the tokenizer's chat template.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 256,
        image_token: str = IMAGE_TOKEN,
        system_prompt: str | None = None,
        chat_template=None,
        **kwargs,
    ):
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        self.system_prompt = system_prompt
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {image_token!r} token; call add_voxlm_tokens(tokenizer) first")

    def build_prompt(self, question: str) -> str:
        """The text of one prompt: image placeholders and the question, in the chat template when there is one."""
        content = self.image_token * self.num_image_tokens + question
        if self.tokenizer.chat_template is None:
            return content
        messages = [{"role": "user", "content": content}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def tokenize(self, questions: list[str], answers: list[str] | None) -> list[tuple[list[int], list[int]]]:
        """Per sample, `(input_ids, labels)`: labels are `-100` on the prompt and cover the answer and EOS."""
        use_bos = self.tokenizer.chat_template is None
        samples = []
        for index, question in enumerate(questions):
            prompt_ids = self.tokenizer(self.build_prompt(question), add_special_tokens=use_bos)["input_ids"]
            count = prompt_ids.count(self.image_token_id)
            if count != self.num_image_tokens:
                raise ValueError(
                    f"The prompt holds {count} image tokens instead of {self.num_image_tokens}: the question must not "
                    f"contain {self.image_token!r}, and the tokenizer must keep it as one special token"
                )
            if answers is None:
                samples.append((prompt_ids, [IGNORE_INDEX] * len(prompt_ids)))
                continue
            answer_ids = self.tokenizer(answers[index], add_special_tokens=False)["input_ids"]
            answer_ids = answer_ids + [self.tokenizer.eos_token_id]
            samples.append((prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids))
        return samples

    def pad(self, samples, padding_side: str) -> dict[str, torch.Tensor]:
        """Pad `(input_ids, labels)` pairs to one length on the given side."""
        width = max(len(ids) for ids, _ in samples)
        input_ids = torch.full((len(samples), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, (ids, targets) in enumerate(samples):
            span = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids)
            labels[row, span] = torch.tensor(targets)
            attention_mask[row, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def __call__(
        self,
        images=None,
        text=None,
        answers=None,
        masks=None,
        padding_side: str | None = None,
        return_tensors: str = "pt",
        **kwargs,
    ):
        """Build model inputs.

        Args:
            images (*optional*): one volume or a list (paths, arrays, tensors, `Volume`s); adds `pixel_values`.
            text (`str` or `list[str]`): the questions.
            answers (`str` or `list[str]`, *optional*): target answers; adds `labels` for training.
            masks (*optional*): target masks on the volumes' grids; adds `seg_masks` and `has_mask`.
            padding_side (`str`, *optional*): `"left"` (the default without answers, for generation) or `"right"`
                (the default with answers, for training).
            **kwargs: passed to the volume processor (`modality`, `window`, `return_metadata`).

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, `pixel_values` (with images), `labels` (with answers).
        """
        if text is None:
            raise ValueError("VoxLMProcessor needs `text` (the questions)")
        questions = [text] if isinstance(text, str) else list(text)
        if answers is not None:
            answers = [answers] if isinstance(answers, str) else list(answers)
            if len(answers) != len(questions):
                raise ValueError(f"{len(answers)} answers were given for {len(questions)} questions")
        padding_side = padding_side or ("left" if answers is None else "right")
        data = self.pad(self.tokenize(questions, answers), padding_side)
        if answers is None:
            del data["labels"]
        if images is not None:
            image_features = self.image_processor(images, masks=masks, return_tensors=return_tensors, **kwargs)
            if image_features["pixel_values"].shape[0] != len(questions):
                raise ValueError(f"{image_features['pixel_values'].shape[0]} volumes for {len(questions)} questions")
            data.update(image_features)
        metadata = data.pop("metadata", None)
        features = BatchFeature(data=data, tensor_type=return_tensors)
        if metadata is not None:
            features["metadata"] = metadata
        return features

    def post_process_generation(self, generated) -> list[dict]:
        """Answers from generated ids (without the prompt) or texts: clean text, parsed boxes, whether `[SEG]` appears.

        Returns:
            `list[dict]`: per sample `{"text": str, "boxes": list[list[float]], "has_seg": bool}`.
        """
        if torch.is_tensor(generated) or (generated and not isinstance(generated[0], str)):
            raw = self.tokenizer.batch_decode(generated, skip_special_tokens=False)
        else:
            raw = list(generated)
        results = []
        special = [t for t in self.tokenizer.all_special_tokens if t not in (BOX_START_TOKEN, BOX_END_TOKEN)]
        for text in raw:
            for token in special:
                text = text.replace(token, "")
            boxes = parse_boxes(text)
            clean = text.replace(BOX_START_TOKEN, "").replace(BOX_END_TOKEN, "").strip()
            results.append({"text": clean, "boxes": boxes, "has_seg": SEG_TOKEN in text})
        return results


__all__ = ["VoxLMProcessor", "add_voxlm_tokens", "format_box", "parse_boxes"]
