"""VoxCLIPProcessor: a VoxCLIP's volume processor and its text encoder's tokenizer, saved and loaded as one.

Every image or report embedding (training's evaluation, zero-shot classification, retrieval, the Space) tokenizes
reports here, so they all truncate at the length the model was trained on, which the processor saves.
"""

from __future__ import annotations

from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin


class VoxCLIPProcessor(ProcessorMixin):
    r"""
    Volume processor + text tokenizer for VoxCLIP.

    Args:
        image_processor (`VoxVolumeProcessor`): turns volumes into `pixel_values`.
        tokenizer (`PreTrainedTokenizerBase`): the text encoder's tokenizer.
        max_length (`int`, *optional*, defaults to 128): reports are truncated to this many tokens (the contrastive
            collator's `max_length` in training).
    """

    def __init__(self, image_processor=None, tokenizer=None, max_length: int = 128, **kwargs):
        self.max_length = int(max_length)
        if self.max_length < 2:
            raise ValueError(f"`max_length` must hold at least the two special tokens, got {max_length}")
        super().__init__(image_processor, tokenizer)

    def __call__(self, images=None, text=None, modality: str | None = None, window=None,
                 return_tensors: str = "pt", **kwargs) -> BatchFeature:
        """Volumes and / or reports -> model inputs.

        Args:
            images (*optional*): one volume or a list (paths, nibabel images, arrays, tensors, `Volume`s); adds
                `pixel_values (B, 1, D, H, W)`.
            text (`str` or `list[str]`, *optional*): reports; adds `input_ids` and `attention_mask`, padded to the
                longest and truncated to `max_length`.
            modality (`str`, *optional*), window (*optional*): the volume processor's per-call settings.

        Returns:
            `BatchFeature` with the inputs `VoxCLIPModel.get_image_features` / `get_text_features` take.
        """
        if kwargs:
            raise TypeError(f"VoxCLIPProcessor got unexpected arguments {sorted(kwargs)}")
        if images is None and text is None:
            raise ValueError("Give `images` (volumes), `text` (reports) or both")
        data = {}
        if images is not None:
            data.update(self.image_processor(images, modality=modality, window=window, return_tensors=return_tensors))
        if text is not None:
            data.update(self.tokenizer(text, padding=True, truncation=True, max_length=self.max_length,
                                       return_tensors=return_tensors, return_token_type_ids=False))
        return BatchFeature(data=data, tensor_type=return_tensors)
