"""VoxLMProcessor: a volume processor and a tokenizer that build M3D prompts, training labels, and parse answers.

Prompt: `<im_patch>` x `num_image_tokens`, then the question, inside the tokenizer's chat template (a user turn) when
it has one. Image tokens are real added special tokens that the model finds by id (never by position). A study of S
series holds `S * num_image_tokens + S - 1` placeholders: the model fills them with each series' tokens and a learned
separator between series (`VoxLMConfig.num_study_image_tokens`).
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
        max_study_scans (`int`, *optional*, defaults to 1): most series of a study per prompt
            (`VoxLMConfig.max_study_scans`); larger studies are refused with a `VolumeError`.
        system_prompt (`str`, *optional*): a system turn for chat templates; `None` keeps the template's default.
        chat_template (`str`, *optional*): overrides the tokenizer's chat template.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 256,
        image_token: str = IMAGE_TOKEN,
        max_study_scans: int = 1,
        system_prompt: str | None = None,
        chat_template=None,
        **kwargs,
    ):
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        self.max_study_scans = int(max_study_scans)
        self.system_prompt = system_prompt
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {image_token!r} token; call add_voxlm_tokens(tokenizer) first")

    def num_study_image_tokens(self, num_scans: int) -> int:
        """Placeholders of a study prompt: `num_image_tokens` per series and one separator between series (the count
        `VoxLMConfig.num_study_image_tokens` gives)."""
        return num_scans * self.num_image_tokens + num_scans - 1

    def build_prompt(self, question: str, num_image_tokens: int | None = None) -> str:
        """The text of one prompt: image placeholders (`num_image_tokens`, default one volume's) and the question, in
        the chat template when there is one."""
        content = self.image_token * (num_image_tokens or self.num_image_tokens) + question
        if self.tokenizer.chat_template is None:
            return content
        messages = [{"role": "user", "content": content}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def tokenize(
        self, questions: list[str], answers: list[str] | None, image_token_counts: list[int] | None = None,
        max_length: int | None = None,
    ) -> list[tuple[list[int], list[int]]]:
        """Per sample, `(input_ids, labels)`: labels are `-100` on the prompt and cover the answer and EOS.
        `image_token_counts` gives each prompt's placeholders (studies); default: `num_image_tokens` each.
        `max_length`: as in [`tokenize_one`]."""
        samples = []
        for index, question in enumerate(questions):
            count = None if image_token_counts is None else image_token_counts[index]
            answer = None if answers is None else answers[index]
            input_ids, labels, _ = self.tokenize_one(question, answer, count, max_length)
            samples.append((input_ids, labels))
        return samples

    def tokenize_one(
        self, question: str, answer: str | None = None, num_image_tokens: int | None = None,
        max_length: int | None = None,
    ) -> tuple[list[int], list[int], bool]:
        """One sample's `(input_ids, labels, truncated)`.

        Args:
            question (`str`), answer (`str`, *optional*): the texts; `None` for the answer builds a generation prompt.
            num_image_tokens (`int`, *optional*): the prompt's placeholders (default: one volume's).
            max_length (`int`, *optional*): most tokens of prompt and answer; a longer answer is cut to fit
                (`truncated` is then `True`), a prompt longer than this is refused.

        Raises:
            `ValueError`: a text that is not a string, a question holding the image placeholder, or a prompt longer
            than `max_length`.
        """
        for name, text in (("question", question), ("answer", answer)):
            if not isinstance(text, str) and not (name == "answer" and text is None):
                raise ValueError(f"the {name} must be text, got {type(text).__name__}")
        expected = num_image_tokens or self.num_image_tokens
        use_bos = self.tokenizer.chat_template is None
        prompt_ids = self.tokenizer(self.build_prompt(question, expected), add_special_tokens=use_bos)["input_ids"]
        count = prompt_ids.count(self.image_token_id)
        if count != expected:
            raise ValueError(
                f"The prompt holds {count} image tokens instead of {expected}: the question must not "
                f"contain {self.image_token!r}, and the tokenizer must keep it as one special token"
            )
        if max_length is not None and len(prompt_ids) > max_length:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens, more than max_length={max_length}")
        if answer is None:
            return prompt_ids, [IGNORE_INDEX] * len(prompt_ids), False
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        room = None if max_length is None else max_length - len(prompt_ids)
        truncated = room is not None and len(answer_ids) > room
        if truncated:
            answer_ids = answer_ids[:room]
        return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids, truncated

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
        studies=None,
        padding_side: str | None = None,
        max_length: int | None = None,
        return_tensors: str = "pt",
        **kwargs,
    ):
        """Build model inputs.

        Args:
            images (*optional*): one volume or a list (paths, arrays, tensors, `Volume`s); adds `pixel_values`.
            text (`str` or `list[str]`): the questions.
            answers (`str` or `list[str]`, *optional*): target answers; adds `labels` for training.
            masks (*optional*): target masks on the volumes' grids (for studies: on each study's first series); adds
                `seg_masks` and `has_mask`.
            studies (*optional*): instead of `images`, whole studies: with one question (`text` a `str`), one study (a
                DICOM folder or `.zip` of several series, a list of files, a `Study`); with a list of questions, a list
                of as many studies. Adds `pixel_values (B, S, 1, D, H, W)` and `scan_mask (B, S)` (and with
                `return_metadata=True`, `series_descriptions` beside `metadata`), and each prompt gets the
                placeholders of its number of series.
            padding_side (`str`, *optional*): `"left"` (the default without answers, for generation) or `"right"`
                (the default with answers, for training).
            max_length (`int`, *optional*): most tokens per sample; longer answers are cut, longer prompts refused.
            **kwargs: passed to the volume processor (`modality`, `window`, `return_metadata`).

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, `pixel_values` (with images or studies), `labels` (with
            answers), and for studies `scan_mask`: all of them model inputs, so `model.generate(**features)` works
            (`metadata` and `series_descriptions`, asked for with `return_metadata=True`, must be popped first).
        """
        if text is None:
            raise ValueError("VoxLMProcessor needs `text` (the questions)")
        if images is not None and studies is not None:
            raise ValueError("Give `images` (one volume per question) or `studies` (one study per question), not both")
        questions = [text] if isinstance(text, str) else list(text)
        if answers is not None:
            answers = [answers] if isinstance(answers, str) else list(answers)
            if len(answers) != len(questions):
                raise ValueError(f"{len(answers)} answers were given for {len(questions)} questions")
        padding_side = padding_side or ("left" if answers is None else "right")
        image_features, counts = None, None
        if studies is not None:
            image_features = self.process_studies(studies, isinstance(text, str), len(questions), masks, kwargs)
            counts = [self.num_study_image_tokens(int(n)) for n in image_features["scan_mask"].sum(dim=1)]
            if not kwargs.get("return_metadata"):
                del image_features["series_descriptions"]
        elif images is not None:
            image_features = self.image_processor(images, masks=masks, return_tensors=return_tensors, **kwargs)
            if image_features["pixel_values"].shape[0] != len(questions):
                raise ValueError(f"{image_features['pixel_values'].shape[0]} volumes for {len(questions)} questions")
        data = self.pad(self.tokenize(questions, answers, counts, max_length), padding_side)
        if answers is None:
            del data["labels"]
        if image_features is not None:
            data.update(image_features)
        extras = {key: data.pop(key) for key in ("metadata", "series_descriptions") if key in data}
        features = BatchFeature(data=data, tensor_type=return_tensors)
        features.update(extras)
        return features

    def process_studies(self, studies, single: bool, num_questions: int, masks, kwargs: dict):
        """The volume processor's study batch for `__call__`: one study per question, at most `max_study_scans`
        series each."""
        if single:
            studies = [studies]
            masks = None if masks is None else [masks]
        elif not isinstance(studies, (list, tuple)) or len(studies) != num_questions:
            count = len(studies) if isinstance(studies, (list, tuple)) else 1
            raise ValueError(f"{count} studies for {num_questions} questions: give a list with one study per question")
        return self.image_processor.preprocess_studies(studies, masks=masks, max_series=self.max_study_scans, **kwargs)

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
