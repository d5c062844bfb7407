"""VoxLMProcessor: a volume processor and a tokenizer that build M3D prompts, training labels, and parse answers.

Prompt (`prompt_layout`): `<im_patch>` x `num_image_tokens`, then the question, inside the tokenizer's chat template (a
user turn) when it has one (`"chat"`), or as M3D-LaMed was trained, BOS, the placeholders, a space and the question,
with no chat template (`"m3d"`; `"m3d_caption"` without the space); a question without a volume gets no placeholders.
Image tokens are real added special tokens that the model finds by id (never by position). A study of S series holds
`S * num_image_tokens + S - 1` placeholders: the model fills them with each series' tokens and a learned separator
between series (`VoxLMConfig.num_study_image_tokens`).

Conversations (`apply_chat_template`) take transformers' multimodal messages: a content item `{"type": "image"}` (with
the volume under `path`, `url` or `image`, or given as `images=`) becomes that volume's placeholders, so any LLM's own
chat template renders them, and the prompt is the one `processor(images=..., text=...)` builds.
"""

from __future__ import annotations

import re

import torch
from transformers import AddedToken
from transformers.image_processing_utils import BatchFeature
from transformers.dynamic_module_utils import custom_object_save
from transformers.processing_utils import ProcessorMixin

from .pipeline_voxlm import VoxLMPipeline

IMAGE_TOKEN = "<im_patch>"
BOX_START_TOKEN = "<bx_start>"
BOX_END_TOKEN = "<bx_end>"
SEG_TOKEN = "[SEG]"
IGNORE_INDEX = -100
# `prompt_layout` -> what stands between a volume's placeholders and the question. Note: M3D writes
# "<im_patch>" * 256 + " " + question for VQA, boxes and segmentation (LaMed/src/dataset/multi_dataset.py lines 315,
# 425, 578, 756, 925, 1054, and Bench/dataset/multi_dataset.py, which Bench/eval/eval_vqa.py and the others tokenize),
# but "<im_patch>" * 256 + question for captions (multi_dataset.py line 197; Bench's CapDataset) and in its demos
# (LaMed/src/demo/demo.py line 57). `None`: the chat layout, placeholders and question side by side in a user turn.
# Med3DVLM writes the same texts (mirthAI/Med3DVLM src/dataset/mllm_dataset.py: VQA `image_tokens + " " + question`,
# captions `image_tokens + prompt_question`; src/demo/demo.py `image_tokens + question`).
PROMPT_LAYOUT_SEPARATORS = {"chat": None, "m3d": " ", "m3d_caption": "", "med3dvlm": " ", "med3dvlm_caption": ""}
M3D_LAYOUTS = ("m3d", "m3d_caption")  # begin with BOS
MED3DVLM_LAYOUTS = ("med3dvlm", "med3dvlm_caption")  # begin with Med3DVLM's `<im_patch>` as text
VOLUME_PROCESSOR_KWARGS = {"modality", "window", "return_metadata"}
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


def check_call_arguments(text, volume_inputs, padding, max_length, kwargs: dict) -> None:
    """Refuse what `VoxLMProcessor.__call__` cannot honour, rather than drop it."""
    if text is None:
        raise ValueError("VoxLMProcessor needs `text` (the questions)")
    if sum(given is not None for given in volume_inputs) > 1:
        raise ValueError("Give `images` (one volume per question), `studies` (one study per question) or "
                         "`pixel_values` (preprocessed volumes), not several")
    unknown = sorted(set(kwargs) - VOLUME_PROCESSOR_KWARGS)
    if unknown:
        raise TypeError(f"VoxLMProcessor got unexpected keyword arguments {unknown}; the volume processor takes "
                        f"{sorted(VOLUME_PROCESSOR_KWARGS)}")
    if padding not in (True, "longest", "max_length") or (padding == "max_length" and max_length is None):
        raise ValueError(f"padding={padding!r}: VoxLMProcessor pads to the longest sample (True, 'longest') or to "
                         "max_length ('max_length', with max_length set)")


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
        prompt_layout (`str`, *optional*, defaults to `"chat"`): how prompts are written.
            - `"chat"`: the placeholders and the question in a user turn of the chat template (the tokenizer's, when
              it has one; without one, the turns one per line, after the tokenizer's special tokens).
            - `"m3d"`: as M3D-LaMed's released models were trained and evaluated, never in a chat template: the text
              `"<im_patch>" * num_image_tokens + " " + question`, tokenized with the tokenizer's special tokens and
              BOS first (added if the tokenizer does not add it: M3D's splice puts the image features right after the
              first token); a training answer follows as M3D's `question + " " + answer` is tokenized, then EOS.
            - `"m3d_caption"`: the same without the space, as M3D wrote its caption prompts and its demos.
            - `"med3dvlm"`: what Med3DVLM's released model reads (its text is M3D's, `"<im_patch>" * 256 + " " +
              question` for VQA, tokenized by Qwen2's tokenizer, which adds no BOS; its splice keeps the first token
              and overwrites tokens 1..256): the text token `<im_patch>`, then the placeholders (`image_token`, which
              must then be another token, e.g. Qwen2's `<|image_pad|>`), then the question without its first
              token. `"med3dvlm_caption"`: the same without the space (Med3DVLM's captions and demo).
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
        prompt_layout: str = "chat",
        **kwargs,
    ):
        if prompt_layout not in PROMPT_LAYOUT_SEPARATORS:
            raise ValueError(f"`prompt_layout` must be one of {tuple(PROMPT_LAYOUT_SEPARATORS)}, got {prompt_layout!r}")
        self.prompt_layout = prompt_layout
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        self.max_study_scans = int(max_study_scans)
        self.system_prompt = system_prompt
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {image_token!r} token; call add_voxlm_tokens(tokenizer) first")
        if prompt_layout in M3D_LAYOUTS and tokenizer.bos_token_id is None:
            raise ValueError(f"`prompt_layout={prompt_layout!r}` begins prompts with BOS, and the tokenizer has none")
        if prompt_layout in MED3DVLM_LAYOUTS and image_token == IMAGE_TOKEN:
            raise ValueError(f"`prompt_layout={prompt_layout!r}` begins prompts with {IMAGE_TOKEN} as text: the "
                             "placeholders (`image_token`) must be another token")

    @property
    def uses_chat_template(self) -> bool:
        """Whether prompts are rendered with the tokenizer's chat template (`prompt_layout="chat"` and a template)."""
        return self.prompt_layout == "chat" and self.tokenizer.chat_template is not None

    def save_pretrained(self, save_directory, **kwargs):
        """`ProcessorMixin.save_pretrained`, and the code of [`VoxLMPipeline`] beside it: the pipeline that the
        model config's `custom_pipelines` names for `pipeline("image-text-to-text", model=folder,
        trust_remote_code=True)`."""
        saved = super().save_pretrained(save_directory, **kwargs)
        custom_object_save(VoxLMPipeline, save_directory)
        return saved

    def num_study_image_tokens(self, num_scans: int) -> int:
        """Placeholders of a study prompt: `num_image_tokens` per series and one separator between series (the count
        `VoxLMConfig.num_study_image_tokens` gives)."""
        return num_scans * self.num_image_tokens + num_scans - 1

    def render_messages(self, messages: list[dict], add_generation_prompt: bool = True, chat_template=None) -> str:
        """A conversation whose contents are text -> the prompt: the chat template (the tokenizer's, unless one is
        given; the processor's `system_prompt` goes first when the conversation has no system turn), or for a
        tokenizer without one, the contents of the turns that are not system turns, one per line. The M3D layouts
        use no template and no system turn: the contents joined by a space, as M3D joins question and answer."""
        if self.prompt_layout != "chat":
            return " ".join(message["content"] for message in messages if message["role"] != "system")
        template = chat_template or self.tokenizer.chat_template
        if template is None:
            return "\n".join(message["content"] for message in messages if message["role"] != "system")
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def placeholders(self, count: int) -> str:
        """`count` image placeholders and what the layout puts between them and the question ("" for none)."""
        separator = PROMPT_LAYOUT_SEPARATORS[self.prompt_layout] or ""
        return self.image_token * count + separator if count else ""

    def build_prompt(self, question: str, num_image_tokens: int | None = None) -> str:
        """The text of one prompt: image placeholders (`num_image_tokens`, default one volume's; a study's
        `num_study_image_tokens`) and the question, as `prompt_layout` writes them."""
        count = self.num_image_tokens if num_image_tokens is None else num_image_tokens
        return self.render_messages([{"role": "user", "content": self.placeholders(count) + question}])

    def text_ids(self, text: str) -> list[int]:
        """A rendered text's ids: with a chat template as it stands; otherwise with the tokenizer's special tokens
        (BOS first, as M3D's prompts begin), and for the M3D layouts BOS added where the tokenizer adds none; for the
        Med3DVLM layouts, as `med3dvlm_ids` writes them."""
        ids = self.tokenizer(text, add_special_tokens=not self.uses_chat_template)["input_ids"]
        if self.prompt_layout in MED3DVLM_LAYOUTS:
            return self.med3dvlm_ids(ids)
        bos = self.tokenizer.bos_token_id
        if self.prompt_layout in M3D_LAYOUTS and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def med3dvlm_ids(self, ids: list[int]) -> list[int]:
        """`placeholders + text` ids -> what Med3DVLM's model reads: `<im_patch>` (a text token) first, the
        placeholders, and the text without its first token; ids without placeholders stay as they are.

        Note: Med3DVLM tokenizes `"<im_patch>" * N + text` (no BOS: Qwen2) and splices `cat(embeds[:, :1], image,
        embeds[:, N + 1:])` (src/model/vlm_arch.py `prepare_inputs_for_multimodal`): the first `<im_patch>` stays a
        text embedding and the image features overwrite tokens 1..N, the last of which is the text's first token, so
        the model never reads that token. Its released weights were trained so, and are given the same here.
        """
        if self.image_token_id not in ids:
            return ids
        end = len(ids) - ids[::-1].index(self.image_token_id)  # just after the last placeholder
        return [self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), *ids[:end], *ids[end + 1:]]

    def prompt_ids(self, prompt: str, num_image_tokens: int) -> list[int]:
        """A rendered prompt's ids (`text_ids`), checking that it holds `num_image_tokens` placeholders."""
        ids = self.text_ids(prompt)
        count = ids.count(self.image_token_id)
        if count != num_image_tokens:
            raise ValueError(
                f"The prompt holds {count} image tokens instead of {num_image_tokens}: the question must not "
                f"contain {self.image_token!r}, and the tokenizer must keep it as one special token"
            )
        return ids

    def apply_chat_template(self, conversation, chat_template=None, add_generation_prompt: bool = False,
                            tokenize: bool = False, return_dict: bool = False, images=None, return_tensors="pt",
                            **kwargs):
        """Render conversations in transformers' message format, volumes included.

        Args:
            conversation (`list[dict]` or a list of them): messages `{"role": ..., "content": ...}` whose content is
                text or a list of items `{"type": "text", "text": ...}` and `{"type": "image"}`; an image item holds its
                volume under `path`, `url` (a local path or file URL) or `image` (anything `read_volume` takes), or
                the volumes come in `images`, one per conversation. A conversation holds at most one volume (VoxLM
                reads one per sample; a study goes through `processor(studies=...)`).
            chat_template (`str`, *optional*): instead of the tokenizer's.
            add_generation_prompt (`bool`, defaults to `False`): end with the assistant's turn opening, as
                `processor(images=..., text=...)` does.
            tokenize (`bool`, defaults to `False`): return ids (with `return_dict=True`, the model inputs, volumes
                preprocessed, left padded for generation) instead of the prompt texts.
            kwargs: passed to the volume processor (`modality`, `window`).

        Returns:
            The prompt (`str`, or a list for a list of conversations); with `tokenize=True`, `input_ids`, or with
            `return_dict=True` a `BatchFeature` of `input_ids`, `attention_mask` and (with volumes) `pixel_values`.
        """
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        prompts, volumes = [], []
        for messages in conversations:
            rendered = [{**message, "content": self.content_text(message["content"], volumes)} for message in messages]
            prompts.append(self.render_messages(rendered, add_generation_prompt, chat_template))
        if not tokenize:
            return prompts if batched else prompts[0]
        features = self.conversation_features(prompts, volumes, images, return_tensors, kwargs)
        return features if return_dict else features["input_ids"]

    def content_text(self, content, volumes: list) -> str:
        """A message's content as text: image items become the placeholders of one volume, whose source (or `None`
        for a bare `{"type": "image"}`) is appended to `volumes`."""
        if isinstance(content, str):
            return content
        parts = []
        for item in content:
            if item.get("type") == "text":
                parts.append(item["text"])
            elif item.get("type") == "image":
                source = next((item[key] for key in ("path", "url", "image") if item.get(key) is not None), None)
                volumes.append(source.removeprefix("file://") if isinstance(source, str) else source)
                parts.append(self.placeholders(self.num_image_tokens))
            else:
                raise ValueError(f"A content item of type {item.get('type')!r}: VoxLM takes 'text' and 'image' items")
        if parts and content[-1].get("type") == "image":  # no question after the volume: no separator either
            parts[-1] = self.image_token * self.num_image_tokens
        return "".join(parts)

    def conversation_features(self, prompts: list[str], volumes: list, images, return_tensors, kwargs) -> BatchFeature:
        """Model inputs of rendered conversations: ids left padded, the volumes of their image items preprocessed."""
        counts = [prompt.count(self.image_token) // self.num_image_tokens for prompt in prompts]
        if max(counts) > 1:
            raise ValueError("A conversation holds more than one volume; VoxLM reads one per sample (a study goes "
                             "through processor(studies=...))")
        volumes = [volume for volume in volumes if volume is not None]  # a bare {"type": "image"} names no volume
        if images is not None:
            volumes = list(images) if isinstance(images, (list, tuple)) else [images]
        if len(volumes) != sum(counts):
            raise ValueError(f"The conversations hold {sum(counts)} image items but {len(volumes)} volumes were given: "
                             "put each volume in its item (`path`, `url` or `image`) or pass `images`")
        samples = [(ids, [IGNORE_INDEX] * len(ids))
                   for ids in (self.prompt_ids(p, c * self.num_image_tokens) for p, c in zip(prompts, counts))]
        data = self.pad(samples, "left")
        del data["labels"]
        if volumes:
            if 0 < sum(counts) < len(prompts):
                raise ValueError("Either every conversation of a batch holds a volume or none does")
            data.update(self.image_processor(volumes, return_tensors=return_tensors, **kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def tokenize(
        self, questions: list[str], answers: list[str] | None, image_token_counts: list[int] | None = None,
        max_length: int | None = None, truncation: bool = True,
    ) -> list[tuple[list[int], list[int]]]:
        """Per sample, `(input_ids, labels)`: labels are `-100` on the prompt and cover the answer and EOS.
        `image_token_counts` gives each prompt's placeholders (0 for text only); default: `num_image_tokens` each.
        `max_length`: as in [`tokenize_one`]; with `truncation=False` an answer that does not fit is refused."""
        samples = []
        for index, question in enumerate(questions):
            count = None if image_token_counts is None else image_token_counts[index]
            answer = None if answers is None else answers[index]
            input_ids, labels, truncated = self.tokenize_one(question, answer, count, max_length)
            if truncated and not truncation:
                raise ValueError(f"sample {index}: the answer does not fit in max_length={max_length} tokens "
                                 "(truncation=False)")
            samples.append((input_ids, labels))
        return samples

    def tokenize_one(
        self, question: str, answer: str | None = None, num_image_tokens: int | None = None,
        max_length: int | None = None,
    ) -> tuple[list[int], list[int], bool]:
        """One sample's `(input_ids, labels, truncated)`.

        Args:
            question (`str`), answer (`str`, *optional*): the texts; `None` for the answer builds a generation prompt.
            num_image_tokens (`int`, *optional*): the prompt's placeholders (default: one volume's; 0 for a question
                without a volume).
            max_length (`int`, *optional*): most tokens of prompt and answer; a longer answer is cut to fit
                (`truncated` is then `True`), a prompt longer than this is refused.

        Raises:
            `ValueError`: a text that is not a string, a question holding the image placeholder, or a prompt longer
            than `max_length`.
        """
        for name, text in (("question", question), ("answer", answer)):
            if not isinstance(text, str) and not (name == "answer" and text is None):
                raise ValueError(f"the {name} must be text, got {type(text).__name__}")
        expected = self.num_image_tokens if num_image_tokens is None else num_image_tokens
        prompt = self.build_prompt(question, expected)
        prompt_ids = self.prompt_ids(prompt, expected)
        if max_length is not None and len(prompt_ids) > max_length:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens, more than max_length={max_length}")
        if answer is None:
            return prompt_ids, [IGNORE_INDEX] * len(prompt_ids), False
        if self.prompt_layout == "chat":
            answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        else:
            # Note: M3D tokenizes `question + " " + answer` as one text, labels all but the question's length of it
            # and appends EOS (LaMed/src/dataset/multi_dataset.py lines 316-333), so the answer is tokenized after a
            # space.
            sample_ids = self.text_ids(prompt + " " + answer)
            prompt_ids, answer_ids = sample_ids[: len(prompt_ids)], sample_ids[len(prompt_ids) :]
        answer_ids = answer_ids + [self.tokenizer.eos_token_id]
        room = None if max_length is None else max_length - len(prompt_ids)
        truncated = room is not None and len(answer_ids) > room
        if truncated:
            answer_ids = answer_ids[:room]
        return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids, truncated

    def pad(self, samples, padding_side: str, length: int | None = None) -> dict[str, torch.Tensor]:
        """Pad `(input_ids, labels)` pairs to one length (the longest, or `length`) on the given side."""
        width = max([len(ids) for ids, _ in samples] + [length or 0])
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
        pixel_values=None,
        padding_side: str | None = None,
        padding: bool | str = True,
        truncation: bool = True,
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
            pixel_values (`torch.Tensor` of shape `(B, 1, D, H, W)`, *optional*): instead of `images`, volumes this
                processor already preprocessed (e.g. samples of `voxlm.data.PreprocessedStream`), used as they are.
                Without `images`, `studies` or `pixel_values` the prompts hold no image placeholders (text only).
            padding_side (`str`, *optional*): `"left"` (the default without answers, for generation) or `"right"`
                (the default with answers, for training).
            padding (`bool` or `str`, defaults to `True`): `True` / `"longest"` pads to the longest sample,
                `"max_length"` to `max_length`.
            truncation (`bool`, defaults to `True`): with `max_length`, cut answers that do not fit; `False` refuses
                them. A prompt longer than `max_length` is always refused (cutting it would drop image tokens).
            max_length (`int`, *optional*): most tokens per sample.
            **kwargs: passed to the volume processor (`modality`, `window`, `return_metadata`); any other is refused.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, `pixel_values` (with images or studies), `labels` (with
            answers), and for studies `scan_mask`: all of them model inputs, so `model.generate(**features)` works
            (`metadata` and `series_descriptions`, asked for with `return_metadata=True`, must be popped first).
        """
        check_call_arguments(text, (images, studies, pixel_values), padding, max_length, kwargs)
        questions = [text] if isinstance(text, str) else list(text)
        if answers is not None:
            answers = [answers] if isinstance(answers, str) else list(answers)
            if len(answers) != len(questions):
                raise ValueError(f"{len(answers)} answers were given for {len(questions)} questions")
        padding_side = padding_side or ("left" if answers is None else "right")
        image_features, counts = None, [0] * len(questions)
        if pixel_values is not None:
            image_features = {"pixel_values": torch.as_tensor(pixel_values)}
            counts = [self.num_image_tokens] * len(questions)
        elif studies is not None:
            image_features = self.process_studies(studies, isinstance(text, str), len(questions), masks, kwargs)
            counts = [self.num_study_image_tokens(int(n)) for n in image_features["scan_mask"].sum(dim=1)]
            if not kwargs.get("return_metadata"):
                del image_features["series_descriptions"]
        elif images is not None:
            image_features = self.image_processor(images, masks=masks, return_tensors=return_tensors, **kwargs)
            counts = [self.num_image_tokens] * len(questions)
        if image_features is not None and image_features["pixel_values"].shape[0] != len(questions):
            raise ValueError(f"{image_features['pixel_values'].shape[0]} volumes for {len(questions)} questions")
        samples = self.tokenize(questions, answers, counts, max_length, truncation)
        data = self.pad(samples, padding_side, max_length if padding == "max_length" else None)
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
