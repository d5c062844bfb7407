"""A Hub user without voxlm: loads saved voxlm folders with `trust_remote_code=True` only, in a process where
`import voxlm` fails, and writes what they compute to a safetensors file that `tests/test_remote_code.py` compares
with what voxlm computes itself.

    python remote_code_user.py voxlm VOXLM_FOLDER OUT.safetensors QUESTION VOLUME [VOLUME ...]
    python remote_code_user.py voxclip VOXCLIP_FOLDER OUT.safetensors REPORT VOLUME [VOLUME ...]

For each VOLUME `i` (a NIfTI path, a DICOM folder): `pixel_values.i`, and for a VoxLM `input_ids.i`, the greedy
`generated.i` and the pipeline's `pipeline_mask.i` (`[SEG]` answers only); for a VoxCLIP `image_embeds.i`, and
`text_embeds` of the REPORT.
"""

import importlib.abc
import json
import sys


class NoVoxlm(importlib.abc.MetaPathFinder):
    """Makes `voxlm` unimportable, as on a machine where it is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "voxlm" or name.startswith("voxlm."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: this process plays a user without voxlm)")
        return None


sys.meta_path.insert(0, NoVoxlm())

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModel, AutoProcessor, pipeline  # noqa: E402


def class_name(instance) -> str:
    """`module.Class` of an object: remote code lives in transformers' dynamic modules."""
    return f"{type(instance).__module__}.{type(instance).__name__}"


def voxlm_outputs(folder: str, question: str, volumes: list[str]) -> tuple[dict, dict]:
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    answerer = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    tensors, texts = {}, {}
    for index, volume in enumerate(volumes):
        inputs = processor(images=volume, text=question)
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        answer = answerer(images=volume, text=question, max_new_tokens=8,
                          return_masks=model.config.seg_config is not None)  # masks need a seg head
        tensors[f"pixel_values.{index}"] = inputs["pixel_values"]
        tensors[f"input_ids.{index}"] = inputs["input_ids"]
        tensors[f"generated.{index}"] = generated
        if answer.get("mask") is not None:
            tensors[f"pipeline_mask.{index}"] = torch.from_numpy(answer["mask"])
        texts[str(index)] = answer["generated_text"]
    texts["classes"] = [class_name(processor), class_name(processor.image_processor), class_name(model),
                        class_name(answerer)]
    return tensors, texts


def voxclip_outputs(folder: str, report: str, volumes: list[str]) -> tuple[dict, dict]:
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    tensors = {}
    with torch.no_grad():
        for index, volume in enumerate(volumes):
            pixel_values = processor(images=volume)["pixel_values"]
            tensors[f"pixel_values.{index}"] = pixel_values
            tensors[f"image_embeds.{index}"] = model.get_image_features(pixel_values)
        tokens = processor(text=[report])
        tensors["text_embeds"] = model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
    return tensors, {"classes": [class_name(processor), class_name(processor.image_processor), class_name(model)]}


if __name__ == "__main__":
    kind, folder, output, text, *volumes = sys.argv[1:]
    tensors, texts = (voxlm_outputs if kind == "voxlm" else voxclip_outputs)(folder, text, volumes)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, output,
              metadata={"texts": json.dumps(texts)})
