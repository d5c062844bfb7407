"""`voxlm convert med3dvlm` on a tiny Med3DVLM made by Med3DVLM's own code (tests/med3dvlm/make_med3dvlm.py): the
converted VoxLM gives Med3DVLM's logits and greedy tokens on the same volume and prompt, its processor writes the
prompt Med3DVLM's model reads, and the folder loads through the Auto classes and `trust_remote_code`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

import voxlm  # noqa: F401  (registers the Auto classes)
from voxlm.conversion import convert_med3dvlm
from voxlm.conversion.cli import CONVERTER_FUNCTIONS
from voxlm.modeling.convert_med3dvlm import convert_mixer_key
from voxlm.modeling.modeling_dcformer_siglip import DCFormerSiglipVisionModel
from voxlm.modeling.modeling_voxlm import MixerProjector

from tiny_models import mllm_settings, remote_voxlm_outputs

HERE = Path(__file__).parent
SOURCE = HERE / "med3dvlm" / "med3dvlm"
ATOL = 1e-4


@pytest.fixture(scope="module")
def reference():
    tensors = load_file(HERE / "med3dvlm" / "reference.safetensors")
    with safe_open(HERE / "med3dvlm" / "reference.safetensors", "pt") as saved:
        question = saved.metadata()["question"]
    return {**tensors, "pixel_values": tensors["volume_uint8"].float() / 255, "question": question}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Converted with demo.py's prompt (no space before the question), which the reference used."""
    folder = convert_med3dvlm(SOURCE, tmp_path_factory.mktemp("med3dvlm") / "out",
                              {"prompt_layout": "med3dvlm_caption"})
    return folder, AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def test_converted_model_gives_med3dvlm_logits_and_greedy_tokens(converted, reference):
    _, model, processor = converted
    assert isinstance(model.vision_tower, DCFormerSiglipVisionModel)
    assert isinstance(model.multi_modal_projector, MixerProjector)
    input_ids = torch.tensor([processor.tokenize_one(reference["question"])[0]])  # (1, L)
    assert input_ids.shape == reference["input_ids"].shape
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=reference["pixel_values"]).logits
        generated = model.generate(input_ids=input_ids, pixel_values=reference["pixel_values"], max_new_tokens=8,
                                   do_sample=False)
    torch.testing.assert_close(logits, reference["logits"], atol=ATOL, rtol=0)
    assert generated[:, input_ids.shape[1]:].tolist() == reference["generated"].tolist()


def test_prompt_is_what_med3dvlm_reads(converted, reference):
    """Med3DVLM keeps token 0 (`<im_patch>` as text) and overwrites tokens 1..N: the converted prompt holds its ids
    outside the overwritten span, the placeholders inside it."""
    _, model, processor = converted
    ids = processor.tokenize_one(reference["question"])[0]
    source = reference["input_ids"][0].tolist()
    count = model.config.num_image_tokens
    image_token = processor.tokenizer.convert_tokens_to_ids("<im_patch>")
    assert ids[0] == source[0] == image_token
    assert ids[1:count + 1] == [model.config.image_token_id] * count and image_token not in ids[1:]
    assert ids[count + 1:] == source[count + 1:]


def test_vqa_layout_puts_the_space_before_the_question(converted, tmp_path, reference):
    """`prompt_layout="med3dvlm"` (the default): Med3DVLM's VQA text `"<im_patch>" * N + " " + question`."""
    _, model, caption_processor = converted
    folder = convert_med3dvlm(SOURCE, tmp_path / "vqa")
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.prompt_layout == "med3dvlm"
    tokenizer, count = processor.tokenizer, model.config.num_image_tokens
    source = tokenizer("<im_patch>" * count + " " + reference["question"])["input_ids"]  # mllm_dataset.py
    ids = processor.tokenize_one(reference["question"])[0]
    assert ids[count + 1:] == source[count + 1:] and len(ids) == len(source)
    assert ids != caption_processor.tokenize_one(reference["question"])[0]


def test_processor_feeds_the_training_volume_layout(converted):
    folder, model, processor = converted
    volume = np.random.default_rng(0).uniform(-1000, 400, (40, 70, 90)).astype(np.float32)
    inputs = processor(images=[volume], text=["Where is the lesion?"])
    assert inputs["pixel_values"].shape == (1, 1, *model.config.vision_config.image_size)
    assert 0 <= float(inputs["pixel_values"].min()) and float(inputs["pixel_values"].max()) <= 1
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == model.config.num_image_tokens
    card = (folder / "README.md").read_text()
    assert "only for research purposes" in card and "MIT" in card


def test_shards_convert_one_by_one_and_fill_the_model_exactly(converted):
    folder, model, _ = converted
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2  # the fixture is saved in 2 shards, as the 7B in several
    assert set(index["weight_map"]) == set(model.state_dict())


def test_mixer_keys_map_to_voxlm_names():
    assert convert_mixer_key("model.mm_projector.high_mixer.1.mlp1.mm_projector.1.1.weight") == \
        "multi_modal_projector.streams.1.1.token_mlp.2.weight"
    assert convert_mixer_key("model.mm_projector.low_mixer.0.ln2.bias") == \
        "multi_modal_projector.streams.0.0.channel_norm.bias"
    assert convert_mixer_key("model.mm_projector.something.else") is None


def test_a_config_voxlm_does_not_reproduce_is_refused(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for file in SOURCE.iterdir():
        (source / file.name).write_bytes(file.read_bytes())
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "mm_projector_type": "mlp"}))
    with pytest.raises(ValueError, match="mm_projector_type"):
        convert_med3dvlm(source, tmp_path / "out")
    assert CONVERTER_FUNCTIONS["med3dvlm"] == "convert_med3dvlm"


def test_folder_loads_without_voxlm_through_remote_code(converted, reference, tmp_path):
    folder, model, _ = converted
    volume = tmp_path / "volume.npy"
    np.save(volume, (reference["pixel_values"][0, 0] * 1400 - 1000).numpy())  # Hounsfield-like
    remote = remote_voxlm_outputs(folder, reference["question"], volume, tmp_path)
    with torch.no_grad():
        expected = model.generate(input_ids=remote["input_ids.0"], pixel_values=remote["pixel_values.0"],
                                  max_new_tokens=8, do_sample=False)
    assert torch.equal(remote["generated.0"], expected)
    assert remote["input_ids.0"][0, 0] == reference["input_ids"][0, 0]  # `<im_patch>` as text, as Med3DVLM's


def test_converted_model_answers_through_predict_and_finetunes_with_voxlm_stages(converted, tmp_path):
    from voxlm.data import write_phantom_dataset
    from voxlm.inference import predict
    from voxlm.training import finetune

    folder, model, processor = converted
    volume = np.random.default_rng(1).uniform(-1000, 400, (20, 40, 60)).astype(np.float32)
    prediction = predict(volume, "Is there a lesion?", model, processor, max_new_tokens=3)
    assert isinstance(prediction.text, str) and prediction.mask is None
    write_phantom_dataset(tmp_path / "data", num_cases=4, shape=(16, 32, 32), rows_per_shard=16, test_fraction=0.0)
    tuned = finetune.train(mllm_settings([f"data.path={tmp_path / 'data'}", "run.batch_size=2", "run.tracker=null",
                                          "run.max_steps=2", "data.tasks={vqa: 1.0}", f"init_from={folder}",
                                          "lora.r=4", "lora.alpha=8", f"run.output_dir={tmp_path / 'finetune'}"]))
    again = AutoModel.from_pretrained(tuned / "model").eval()
    assert again.config.projector_type == "mixer"
    assert AutoProcessor.from_pretrained(tuned / "model").prompt_layout == "med3dvlm_caption"
