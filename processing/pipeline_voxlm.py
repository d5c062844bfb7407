"""VoxLMPipeline: transformers' `image-text-to-text` pipeline for volumes.

    pipeline("image-text-to-text", model=folder_or_hub_id, trust_remote_code=True)(images="ct.nii.gz", text=question)

A saved VoxLM folder names this class in its config's `custom_pipelines` (`VoxLMConfig`) and carries this file beside
its processor (`VoxLMProcessor.save_pretrained`),
so transformers builds it from the folder (its code included) for that task, without voxlm installed; with voxlm
installed, `pipeline(..., pipeline_class=VoxLMPipeline)` uses this copy instead. The built-in `image-text-to-text`
pipeline reads images with PIL, which knows no NIfTI or DICOM: here volumes go through the model's own processor.
"""

from __future__ import annotations

from transformers import Pipeline

DEFAULT_MAX_NEW_TOKENS = 64


class VoxLMPipeline(Pipeline):
    r"""
    Answers a question about a volume, with boxes and, on request, the `[SEG]` mask on the volume's own grid.

    Call it with `images` (a path to a NIfTI, MHA/NRRD, `.npy`, a DICOM folder or `.zip`, an array, a nibabel image) and
    `text` (the question), or with `text` a conversation in transformers' message format whose image item holds the
    volume (`{"type": "image", "path": ...}`; `VoxLMProcessor.apply_chat_template`).

    Keyword arguments: `max_new_tokens` (default 64), `return_masks` (`bool`: add `mask`, a uint8 array on the input's
    grid, or `None` when the answer holds no `[SEG]`), `generate_kwargs` (`dict`, passed to `generate`; greedy unless
    it says otherwise).

    Returns:
        `dict` (or a list of them for a list of questions) with `generated_text` (`[SEG]` kept), `boxes` (boxes the
        answer holds, `(z1, y1, x1, z2, y2, x2)` in [0, 1] of the model input), and `mask` with `return_masks=True`.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __call__(self, images=None, text=None, **kwargs):
        if text is None:
            raise ValueError("VoxLMPipeline needs `text`: a question, or a conversation whose image item holds the volume")
        if isinstance(text, (list, tuple)) and text and isinstance(text[0], dict):
            return super().__call__({"messages": list(text), "images": images}, **kwargs)
        return super().__call__({"text": text, "images": images}, **kwargs)

    def _sanitize_parameters(self, max_new_tokens=None, return_masks=None, generate_kwargs=None, **kwargs):
        if kwargs:
            raise TypeError(f"VoxLMPipeline got unexpected keyword arguments {sorted(kwargs)}")
        forward_params = {"do_sample": False, **(generate_kwargs or {})}
        forward_params["max_new_tokens"] = max_new_tokens or forward_params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        forward_params["return_masks"] = bool(return_masks)
        return {"return_masks": bool(return_masks)}, forward_params, {"return_masks": bool(return_masks)}

    def preprocess(self, inputs, return_masks: bool = False):
        if "messages" in inputs:
            features = self.processor.apply_chat_template(
                inputs["messages"], images=inputs["images"], add_generation_prompt=True, tokenize=True,
                return_dict=True, return_metadata=return_masks,
            )
        else:
            features = self.processor(images=inputs["images"], text=inputs["text"], return_metadata=return_masks)
        return dict(features)

    def _forward(self, model_inputs, **generate_kwargs):
        metadata = model_inputs.pop("metadata", None)
        prompt_length = model_inputs["input_ids"].shape[1]
        output = self.model.generate(**model_inputs, **generate_kwargs)
        sequences = output.sequences if generate_kwargs["return_masks"] else output
        return {"sequences": sequences[:, prompt_length:], "masks": getattr(output, "masks", None),
                "metadata": metadata}

    def postprocess(self, model_outputs, return_masks: bool = False):
        answers = self.processor.post_process_generation(model_outputs["sequences"])
        results = []
        for index, answer in enumerate(answers):
            result = {"generated_text": answer["text"], "boxes": answer["boxes"]}
            if return_masks:
                logits = model_outputs["masks"][index]
                result["mask"] = None if logits is None else self.processor.image_processor.postprocess_mask(
                    logits.float().sigmoid().cpu(), model_outputs["metadata"][index])
            results.append(result)
        return results[0] if len(results) == 1 else results


__all__ = ["VoxLMPipeline"]
