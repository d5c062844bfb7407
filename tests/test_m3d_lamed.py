"""`voxlm convert m3d-lamed` against M3D's own code: the tiny LaMed checkpoints (Llama and Phi-3, with SegVol) that
`tests/m3d_lamed/make_lamed.py` made with BAAI-DCAI/M3D, laid out like the released Hub repos, convert to voxlm
folders whose logits, greedy tokens, `[SEG]` masks and prompts equal what M3D computed; the folders load with the
Auto classes and through remote code, and `voxlm predict` answers with them and writes the mask."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_remote_code import run_without_voxlm
from tiny_models import ForceAnswer
from transformers import AutoModel, AutoProcessor, GenerationConfig, LogitsProcessorList

import voxlm  # noqa: F401  (registers the Auto classes)
from voxlm.cli import main
from voxlm.data import write_phantom_dataset
from voxlm.modeling.convert_m3d import M3D_LAMED_CONSTANTS
from voxlm.modeling.modeling_segvol import SegVolHead

FIXTURES = Path(__file__).parent / "m3d_lamed"
KINDS = ["llama", "phi3"]


def reference(kind: str) -> tuple[dict, dict]:
    """M3D's inputs and outputs for a fixture, and the file's metadata."""
    with safe_open(FIXTURES / f"lamed_{kind}_reference.safetensors", "pt") as saved:
        return {name: saved.get_tensor(name) for name in saved.keys()}, saved.metadata()


def tiny_constants_file(tmp_path) -> Path:
    """`--config` for the tiny fixtures: the values make_lamed.py used for the numbers M3D hard-codes."""
    values = json.loads((FIXTURES / "m3d_constants.json").read_text())["values"]
    path = tmp_path / "m3d_constants.json"
    path.write_text(json.dumps({name: values[name] for name in M3D_LAMED_CONSTANTS}))
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """Each fixture converted by the command line, as a user converts a released checkpoint."""
    root = tmp_path_factory.mktemp("converted")
    constants = tiny_constants_file(root)
    for kind in KINDS:
        main(["convert", "m3d-lamed", str(FIXTURES / f"lamed_{kind}"), str(root / kind), "--config", str(constants)])
    return {kind: root / kind for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_converted_lamed_gives_m3d_logits_greedy_tokens_and_segvol_masks(converted, kind):
    tensors, _ = reference(kind)
    model = AutoModel.from_pretrained(converted[kind]).eval()
    assert isinstance(model.seg_head, SegVolHead) and model.config.seg_config.prompt_token == "previous"
    image, input_ids = tensors["image"], tensors["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=image).logits
    assert (logits - tensors["logits"]).abs().max() < 1e-4
    greedy = model.generate(input_ids=input_ids, pixel_values=image, max_new_tokens=8, min_new_tokens=8,
                            do_sample=False)
    assert torch.equal(greedy[:, input_ids.shape[1]:], tensors["greedy_ids"])
    prompt, answer = tensors["seg_prompt_ids"], tensors["seg_answer_ids"][0].tolist()
    generated = model.generate(input_ids=prompt, pixel_values=image, max_new_tokens=len(answer), do_sample=False,
                               return_masks=True,
                               logits_processor=LogitsProcessorList([ForceAnswer(prompt.shape[1], answer)]))
    assert generated.sequences[0, prompt.shape[1]:].tolist() == answer
    assert (generated.masks[0][None] - tensors["seg_mask_logits"]).abs().max() < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_converted_processor_writes_m3d_prompts(converted, kind):
    tensors, metadata = reference(kind)
    processor = AutoProcessor.from_pretrained(converted[kind])
    assert processor.prompt_layout == "m3d"
    for question, ids in ((metadata["question"], tensors["input_ids"]), (metadata["seg_question"],
                                                                          tensors["seg_prompt_ids"])):
        inputs = processor(images=np.random.rand(8, 16, 16).astype(np.float32), text=question)
        assert torch.equal(inputs["input_ids"], ids), (inputs["input_ids"], ids)


def test_converted_folder_is_complete_and_names_its_source(converted):
    folder = converted["llama"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 5  # one output shard per source shard
    assert (folder / "modeling_segvol.py").is_file() and (folder / "processing_voxlm.py").is_file()
    card = (folder / "README.md").read_text()
    assert "tests/m3d_lamed/lamed_llama" in card and "BAAI-DCAI/M3D" in card and "SegVol" in card
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "voxlm" and config["image_token_id"] == 198
    generation = GenerationConfig.from_pretrained(folder)
    assert generation.eos_token_id == 2


def test_converted_folder_without_voxlm_generates_the_same_tokens(converted, mni_path, tmp_path):
    folder = converted["phi3"]
    _, metadata = reference("phi3")
    remote, texts = run_without_voxlm("voxlm", folder, metadata["question"], [mni_path], tmp_path)
    assert texts["classes"][-2].rsplit(".", 1)[1] == "VoxLMForConditionalGeneration"
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    inputs = processor(images=mni_path, text=metadata["question"])
    torch.testing.assert_close(remote["pixel_values.0"], inputs["pixel_values"], rtol=0, atol=0)
    assert torch.equal(remote["generated.0"], model.generate(**inputs, max_new_tokens=8, do_sample=False))


def test_voxlm_predict_answers_with_a_converted_model_and_writes_its_mask(converted, mni_path, tmp_path, capsys):
    folder = tmp_path / "always-seg"
    # A copy whose generation always writes [SEG], so that the random tiny model's answer asks for a mask.
    for file in converted["llama"].iterdir():
        (folder / file.name).parent.mkdir(exist_ok=True)
        (folder / file.name).write_bytes(file.read_bytes())
    generation = GenerationConfig.from_pretrained(folder)
    seg_token_id = json.loads((folder / "config.json").read_text())["seg_token_id"]
    generation.sequence_bias = [[[seg_token_id], 100.0]]
    generation.save_pretrained(folder)
    mask_path = tmp_path / "mask.nii.gz"
    main(["predict", str(mni_path), "--question", "Segment the liver.", "--model", str(folder),
          "--mask-out", str(mask_path), "--max-new-tokens", "3", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["answer"].count("[SEG]") == 3 and result["has_seg"] and result["mask_path"] == str(mask_path)
    mask, source = nib.load(mask_path), nib.load(mni_path)
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)


def test_a_converted_model_fine_tunes_with_lora_and_trains_segvol(converted, tmp_path):
    from voxlm.training import finetune
    from voxlm.training.mllm import MLLMSettings
    from voxlm.training.settings import load_settings, parse_overrides

    write_phantom_dataset(tmp_path / "data", num_cases=4, shape=(16, 32, 32), rows_per_shard=16, test_fraction=0.0)
    settings = load_settings(MLLMSettings, None, parse_overrides([
        f"init_from={converted['llama']}", f"data.path={tmp_path / 'data'}", "data.tasks={seg: 1.0}",
        "run.batch_size=2", "run.max_steps=2", "run.tracker=null", "lora.r=4", "lora.alpha=8",
        f"run.output_dir={tmp_path / 'finetune'}",
    ]))
    tuned = AutoModel.from_pretrained(finetune.train(settings) / "model")
    before = AutoModel.from_pretrained(converted["llama"])
    changed = {name for name, value in tuned.state_dict().items() if not torch.equal(value, before.state_dict()[name])}
    assert any(name.startswith("seg_head.mask_decoder.") for name in changed)
    assert any(name.startswith("language_model.") for name in changed)  # the merged LoRA update
    assert AutoProcessor.from_pretrained(tmp_path / "finetune" / "final" / "model").prompt_layout == "m3d"


def test_a_source_that_is_not_lamed_is_refused_naming_the_field(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    config = json.loads((FIXTURES / "lamed_llama" / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "vision_select_feature": "cls_patch"}))
    with pytest.raises(SystemExit, match="`vision_select_feature` = 'cls_patch' is not supported"):
        main(["convert", "m3d-lamed", str(source), str(tmp_path / "out")])
    (source / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(SystemExit, match="`model_type` 'llama' is not an M3D-LaMed model"):
        main(["convert", "m3d-lamed", str(source), str(tmp_path / "out")])
