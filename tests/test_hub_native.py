"""A saved VoxLM handled as transformers users handle any model: half precision on CPU, config overrides at load,
`AutoModelForCausalLM`, the multimodal chat template, the `image-text-to-text` pipeline on a NIfTI path, and the HF
`Trainer` with voxlm's collator and default arguments."""

import nibabel as nib
import numpy as np
import pytest
import torch
from tiny_models import DEMO_SEG_ANSWER, DEMO_SEG_QUESTION, DEMO_VISION
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    Trainer,
    TrainingArguments,
    pipeline,
)

import voxlm  # noqa: F401  (registers the Auto classes)
from voxlm.data import InstructionCollator, PreprocessedStream, generate_case, stream_rows, write_phantom_dataset
from voxlm.processing import VoxLMPipeline


@pytest.fixture(scope="module")
def case_path(tmp_path_factory):
    """A phantom head CT as a NIfTI file of shape (16, 48, 48) with an anisotropic affine."""
    path = tmp_path_factory.mktemp("case") / "case.nii.gz"
    nib.save(nib.Nifti1Image(generate_case(3, shape=(16, 48, 48)).volume, np.diag([0.8, 0.8, 2.0, 1.0])), path)
    return path


def seg_conversation(volume_item: dict) -> list[dict]:
    return [{"role": "user", "content": [volume_item, {"type": "text", "text": DEMO_SEG_QUESTION}]}]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_generate_on_cpu(demo_model_dirs, case_path, dtype):
    folder = demo_model_dirs[0]
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=dtype).eval()
    assert model.multi_modal_projector.linear_1.weight.dtype == dtype
    inputs = processor(images=str(case_path), text=DEMO_SEG_QUESTION)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_masks=True)
    answer = processor.post_process_generation(output.sequences[:, inputs["input_ids"].shape[1]:])[0]
    assert answer["text"] == DEMO_SEG_ANSWER
    assert output.masks[0].dtype == dtype and torch.isfinite(output.masks[0].float()).all()


def test_config_overrides_at_load_reach_the_llm_and_are_validated(demo_model_dirs):
    folder = demo_model_dirs[0]
    inputs = {"input_ids": torch.tensor([[1, 2, 3]])}
    model = AutoModel.from_pretrained(folder, use_cache=False).eval()
    assert model.config.use_cache is False and model.language_model.config.use_cache is False
    with torch.no_grad():
        output = model(**inputs)
    assert output.get("cache") is None and output.get("past_key_values") is None and output.hidden_states is None
    model = AutoModel.from_pretrained(folder, output_hidden_states=True).eval()
    with torch.no_grad():
        output = model(**inputs)
    assert len(output.hidden_states) == model.config.text_config.num_hidden_layers + 1
    with pytest.raises(ValueError, match="`max_study_scans` must be an int >= 1, got 0"):
        AutoModel.from_pretrained(folder, max_study_scans=0)
    with pytest.raises(ValueError, match=r"`max_study_scans` \(3\) exceeds the scans the encoder takes"):
        AutoModel.from_pretrained(folder, max_study_scans=3)


def test_every_auto_class_of_the_hub_card_loads_the_generation_model(demo_model_dirs):
    folder = demo_model_dirs[0]
    for auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        assert type(auto_class.from_pretrained(folder)).__name__ == "VoxLMForConditionalGeneration"


def test_chat_template_with_a_volume_item_builds_the_processor_prompt(demo_model_dirs, case_path):
    processor = AutoProcessor.from_pretrained(demo_model_dirs[0])
    conversation = seg_conversation({"type": "image", "path": str(case_path)})
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == processor.build_prompt(
        DEMO_SEG_QUESTION)
    expected = processor(images=str(case_path), text=DEMO_SEG_QUESTION)
    for features in (
        processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True),
        processor.apply_chat_template(seg_conversation({"type": "image"}), images=str(case_path),
                                      add_generation_prompt=True, tokenize=True, return_dict=True),
    ):
        assert torch.equal(features["input_ids"], expected["input_ids"])
        assert torch.equal(features["attention_mask"], expected["attention_mask"])
        torch.testing.assert_close(features["pixel_values"], expected["pixel_values"], rtol=0, atol=0)
    two_volumes = [{"role": "user", "content": [{"type": "image", "path": str(case_path)}] * 2}]
    with pytest.raises(ValueError, match="more than one volume"):
        processor.apply_chat_template(two_volumes, tokenize=True)
    with pytest.raises(ValueError, match="1 image items but 0 volumes"):
        processor.apply_chat_template(seg_conversation({"type": "image"}), tokenize=True)


@pytest.mark.parametrize("how", [dict(pipeline_class=VoxLMPipeline), dict(trust_remote_code=True)])
def test_image_text_to_text_pipeline_answers_about_a_nifti_path(demo_model_dirs, case_path, how):
    answer = pipeline("image-text-to-text", model=str(demo_model_dirs[0]), **how)
    result = answer(images=str(case_path), text=DEMO_SEG_QUESTION, return_masks=True)
    assert result["generated_text"] == DEMO_SEG_ANSWER and result["boxes"] == []
    mask = result["mask"]
    assert mask.shape == nib.load(case_path).shape and mask.dtype == np.uint8 and 0 < mask.sum() < mask.size
    chat = answer(text=seg_conversation({"type": "image", "path": str(case_path)}), max_new_tokens=8)
    assert chat == {"generated_text": DEMO_SEG_ANSWER, "boxes": []}


def test_hf_trainer_with_voxlm_collator_and_default_arguments(tmp_path):
    from voxlm.training.assemble import PretrainedParts, build_voxlm

    data = write_phantom_dataset(tmp_path / "phantoms", num_cases=4, shape=(16, 32, 32))
    model, processor = build_voxlm(PretrainedParts(llm="tiny-llama"), dict(
        vision_config={**DEMO_VISION, "image_size": [8, 32, 32]},
        seg_config=dict(hidden_size=32, num_attention_heads=4, intermediate_size=64)))
    before = model.seg_head.state_dict()["mask_token"].clone()
    collator, batch_keys = InstructionCollator(processor), []

    def collate(samples):
        batch = collator(samples)
        batch_keys.append(sorted(batch))
        return batch

    trainer = Trainer(
        model=model, args=TrainingArguments(tmp_path / "run", max_steps=2, per_device_train_batch_size=2, report_to=[]),
        train_dataset=PreprocessedStream(stream_rows(str(data), "seg", "train"), processor), data_collator=collate,
        processing_class=processor,
    )
    assert trainer.train().global_step == 2
    # The Trainer's column filter kept the masks, so the seg head trained.
    assert batch_keys[0] == ["attention_mask", "has_mask", "input_ids", "labels", "pixel_values", "seg_masks"]
    assert not torch.equal(model.seg_head.state_dict()["mask_token"], before)
    trainer.save_model(tmp_path / "final")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "final").eval()
    inputs = AutoProcessor.from_pretrained(tmp_path / "final")(images=generate_case(9, shape=(16, 32, 32)).volume,
                                                               text="Where is the lesion?")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)


def test_save_pretrained_writes_a_hub_card_unless_the_folder_has_one(demo_model_dirs, tmp_path):
    from huggingface_hub import ModelCard

    model = AutoModel.from_pretrained(demo_model_dirs[0])
    model.save_pretrained(tmp_path / "plain")
    card = ModelCard.load(tmp_path / "plain" / "README.md")
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.library_name == "transformers"
    assert "trust_remote_code=True" in card.text
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "README.md").write_text("# my own card\n")
    model.save_pretrained(tmp_path / "kept")
    assert (tmp_path / "kept" / "README.md").read_text() == "# my own card\n"
