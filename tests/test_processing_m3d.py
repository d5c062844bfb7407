"""M3D-LaMed's inputs: the volume preprocessing of M3D's data scripts (run here with MONAI's transforms, composed as
those scripts compose them) and the prompt layout of its training and evaluation code (BAAI-DCAI/M3D@63e72005)."""

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import set_track_meta
from monai.transforms import (
    Compose,
    CropForeground,
    CropForegroundd,
    EnsureTyped,
    Resize,
    Resized,
    ScaleIntensityRangePercentilesd,
)

from voxlm.processing import VoxLMProcessor, VoxVolumeProcessor, add_voxlm_tokens, m3d_volume_processor, read_volume

SIZE = (16, 32, 32)
QUESTION = "Where is the lesion?"
ANSWER = "In the left lobe."


def save_nifti(array, affine, path):
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


@pytest.fixture(scope="module")
def zero_border_path(tmp_path_factory):
    """A volume whose positive contents (an MRI-like blob on a textured box) sit in a zero border of uneven width,
    stored with flipped axes (LPS-like) so that the reader reorients it."""
    rng = np.random.default_rng(0)
    volume = np.zeros((40, 50, 36), np.float32)
    volume[4:31, 9:47, 3:30] = rng.uniform(100, 400, (27, 38, 27))
    volume[10:20, 20:30, 8:18] += 600
    path = tmp_path_factory.mktemp("zero-border") / "zero_border.nii.gz"
    return save_nifti(volume, np.diag([-1.2, -0.9, 2.0, 1.0]), path)


@pytest.fixture(params=["mni", "zero_border"])
def volume_path(request, mni_path, zero_border_path):
    return {"mni": mni_path, "zero_border": zero_border_path}[request.param]


def blob_mask(path, tmp_path):
    """A ball in the volume's bright part, saved on the volume's own grid (and affine)."""
    image = nib.load(path)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in image.shape), indexing="ij"), axis=-1)
    centre = np.array(image.shape) * np.array([0.35, 0.5, 0.4])
    mask = (np.linalg.norm(grid - centre, axis=-1) < min(image.shape) / 6).astype(np.uint8)
    return save_nifti(mask, image.affine, tmp_path / "mask.nii.gz")


def m3d_min_max(image: np.ndarray) -> np.ndarray:
    """`m3d_cap_data_prepare.py` lines 107-108 (and `m3d_seg_data_prepare.py` lines 52-53)."""
    image = image - image.min()
    return image / np.clip(image.max(), a_min=1e-8, a_max=None)


def m3d_seg_normalize(image: np.ndarray) -> np.ndarray:
    """`m3d_seg_data_preprocess.py` `normalize`: percentiles and moments of the voxels above the mean."""
    flat = image.flatten()
    above = flat[flat > np.mean(flat)]
    upper, lower = np.percentile(above, 99.95), np.percentile(above, 0.05)
    return (np.clip(image, lower, upper) - np.mean(above)) / max(np.std(above), 1e-8)


def m3d_cap_reference(canonical: np.ndarray, size) -> torch.Tensor:
    """M3D-Cap's volume: min-max, then the script's Compose (`m3d_cap_data_prepare.py` lines 22-25)."""
    transform = Compose([CropForeground(), Resize(spatial_size=list(size), mode="bilinear")])
    return torch.as_tensor(transform(m3d_min_max(canonical[np.newaxis]))).float()


def m3d_masked_reference(dataset: str, canonical: np.ndarray, mask: np.ndarray, size):
    """M3D-Seg's (`m3d_seg_data_prepare.py` lines 14-21, after `normalize` and min-max) or M3D-RefSeg's
    (`m3d_refseg_data_prepare.py` lines 11-17) image and mask."""
    if dataset == "seg":
        set_track_meta(False)
        transform = Compose([
            EnsureTyped(keys=["image", "label"], track_meta=False),
            CropForegroundd(keys=["image", "label"], source_key="image"),
            Resized(keys=["image", "label"], spatial_size=list(size), mode=["bilinear", "nearest"]),
        ])
        items = transform({"image": m3d_min_max(m3d_seg_normalize(canonical[np.newaxis])), "label": mask[np.newaxis]})
        set_track_meta(True)
        return torch.as_tensor(items["image"]).float(), torch.as_tensor(items["label"]).float()
    transform = Compose([
        ScaleIntensityRangePercentilesd(keys=["image"], lower=0.5, upper=99.5, b_max=1.0, b_min=0.0, clip=True),
        CropForegroundd(keys=["image", "seg"], source_key="image"),
        Resized(keys=["image", "seg"], spatial_size=list(size), mode=["trilinear", "nearest"]),
    ])
    items = transform({"image": canonical[np.newaxis], "seg": mask[np.newaxis]})
    return torch.as_tensor(items["image"]).float(), torch.as_tensor(items["seg"]).float()


@pytest.mark.parametrize("size", [SIZE, (32, 256, 256)])
def test_m3d_cap_preprocessing_matches_m3d_script(volume_path, size):
    """Min-max over the volume, MONAI's CropForeground on the min-maxed volume, MONAI's Resize(mode="bilinear"),
    which is trilinear in 3D: on the same canonical array, to 1e-4."""
    processor = m3d_volume_processor(image_size=size)
    features = processor(str(volume_path), return_metadata=True)
    reference = m3d_cap_reference(read_volume(volume_path).array, size)
    assert features["pixel_values"].shape == (1, 1, *size)
    torch.testing.assert_close(features["pixel_values"][0], reference, atol=1e-4, rtol=0)
    crop = features["metadata"][0].crop
    assert crop != tuple((0, n) for n in features["metadata"][0].canonical_shape)  # the border was cropped


@pytest.mark.parametrize("dataset", ["seg", "refseg"])
def test_m3d_seg_and_refseg_preprocessing_match_their_scripts_masks_included(volume_path, dataset, tmp_path):
    """Image to 1e-4 and mask exactly as M3D's scripts give them: the mask follows the image's crop and MONAI's
    nearest resize, so it stays aligned with the volume as in M3D's training data."""
    mask_path = blob_mask(volume_path, tmp_path)
    processor = m3d_volume_processor(image_size=SIZE, dataset=dataset)
    features = processor(str(volume_path), masks=[str(mask_path)])
    image, mask = m3d_masked_reference(dataset, read_volume(volume_path).array,
                                       read_volume(mask_path, allow_constant=True).array, SIZE)
    torch.testing.assert_close(features["pixel_values"][0], image, atol=1e-4, rtol=0)
    torch.testing.assert_close(features["seg_masks"][0], (mask > 0).float(), atol=0, rtol=0)
    assert features["seg_masks"].sum() > 0


def test_m3d_masks_map_back_onto_the_source_grid(mni_path, tmp_path):
    """A mask through M3D's crop and nearest resize, mapped back by the crop box in the metadata, lands where it was
    on the file's grid (within the half model voxel that torch's legacy nearest shifts it), and so does its box."""
    mask_path = blob_mask(mni_path, tmp_path)
    source = np.asarray(nib.load(mask_path).dataobj)
    processor = m3d_volume_processor(image_size=(32, 64, 64), dataset="seg")
    features = processor(str(mni_path), masks=[str(mask_path)], return_metadata=True)
    metadata = features["metadata"][0]
    back = processor.postprocess_mask(features["seg_masks"][0], metadata)
    assert back.shape == source.shape
    scale = max((high - low) / n for (low, high), n in zip(metadata.crop, processor.image_size))
    assert np.linalg.norm(np.argwhere(back).mean(0) - np.argwhere(source).mean(0)) <= 0.5 * scale + 0.5
    canonical = read_volume(mask_path, allow_constant=True).array > 0
    present = np.argwhere(features["seg_masks"][0, 0].numpy() > 0)
    box = np.concatenate([present.min(0), present.max(0) + 1]) / np.tile(processor.image_size, 2)
    corners = processor.box_to_canonical(box, metadata)  # (2, 3): low and high corners, voxel centres at integers
    truth = np.argwhere(canonical)
    np.testing.assert_allclose(corners[0], truth.min(0) - 0.5, atol=scale + 0.5)
    np.testing.assert_allclose(corners[1], truth.max(0) + 0.5, atol=scale + 0.5)


def test_m3d_settings_round_trip_and_old_configs_keep_todays_behaviour(mni_path, tmp_path):
    processor = m3d_volume_processor(image_size=SIZE, dataset="seg")
    processor.save_pretrained(tmp_path)
    loaded = VoxVolumeProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert (loaded.intensity_normalization, loaded.mask_resample_mode, loaded.percentiles) == (
        "foreground_percentiles", "nearest", [0.05, 99.95])
    old = VoxVolumeProcessor(image_size=SIZE, modality="MR").to_dict()  # a config saved before these settings
    for field in ("intensity_normalization", "mask_resample_mode"):
        del old[field]
    restored = VoxVolumeProcessor.from_dict(old)
    assert (restored.intensity_normalization, restored.mask_resample_mode) == ("window", "nearest-exact")
    assert restored.resample == "trilinear (masks: nearest-exact)"
    torch.testing.assert_close(restored(str(mni_path))["pixel_values"],
                               VoxVolumeProcessor(image_size=SIZE, modality="MR")(str(mni_path))["pixel_values"],
                               atol=0, rtol=0)


def test_model_card_states_m3d_preprocessing():
    from voxlm.model_cards import preprocessing_summary

    text = preprocessing_summary(m3d_volume_processor(dataset="seg"))
    assert "percentiles 0.05-99.95 of the voxels above the volume's mean, whatever the modality" in text
    assert "[32, 256, 256] (D, H, W) = (S, A, R) (masks: 'nearest' resize)" in text and "Hounsfield" not in text
    assert "the volume's minimum to maximum" in preprocessing_summary(m3d_volume_processor())


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: VoxVolumeProcessor(intensity_normalization="zscore"), "intensity_normalization"),
        (lambda: VoxVolumeProcessor(mask_resample_mode="trilinear"), "mask_resample_mode"),
        (lambda: m3d_volume_processor(dataset="ct_rate"), "dataset"),
    ],
)
def test_bad_m3d_settings_raise_naming_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_the_modality_rule_stays_out_of_m3d_normalisation(mni_path, caplog):
    """M3D's normalisation ignores the modality: an MRI through the M3D processor (whose `modality` is CT) gets no
    warning about CT windows, and a window asked for is reported unused."""
    processor = m3d_volume_processor(image_size=SIZE)
    with caplog.at_level("WARNING"):
        features = processor(str(mni_path), return_metadata=True)
    assert caplog.text == "" and "treats every modality alike" in features["metadata"][0].modality_reason
    with caplog.at_level("WARNING"):
        windowed = processor(str(mni_path), window="lung")
    assert "the CT window 'lung' is not used" in caplog.text
    torch.testing.assert_close(windowed["pixel_values"], features["pixel_values"], atol=0, rtol=0)


# --- prompt layout ---------------------------------------------------------------------------------------------


def m3d_processor(tokenizer, layout="m3d", num_image_tokens=8, **kwargs):
    add_voxlm_tokens(tokenizer)
    return VoxLMProcessor(m3d_volume_processor(image_size=(8, 16, 16)), tokenizer, num_image_tokens=num_image_tokens,
                          prompt_layout=layout, **kwargs)


@pytest.mark.parametrize("layout, separator", [("m3d", " "), ("m3d_caption", "")])
def test_m3d_prompt_is_bos_image_tokens_and_question_without_the_chat_template(smollm2_tokenizer, layout, separator,
                                                                               mni_path):
    """SmolLM2's tokenizer has a chat template and adds no BOS itself: M3D's layout skips the template and puts BOS
    first, then M3D's exact text: `"<im_patch>" * N + " " + question` (`"m3d_caption"`: no space)."""
    processor = m3d_processor(smollm2_tokenizer, layout)
    tokenizer = processor.tokenizer
    assert tokenizer.chat_template is not None and tokenizer("Hi")["input_ids"][0] != tokenizer.bos_token_id
    expected = [tokenizer.bos_token_id] + [processor.image_token_id] * 8 + tokenizer(
        separator + QUESTION, add_special_tokens=False)["input_ids"]
    assert expected[1:] == tokenizer("<im_patch>" * 8 + separator + QUESTION, add_special_tokens=False)["input_ids"]
    single = processor(images=str(mni_path), text=QUESTION)
    assert single["input_ids"][0].tolist() == expected
    assert processor.build_prompt(QUESTION) == "<im_patch>" * 8 + separator + QUESTION
    batch = processor(pixel_values=torch.cat([single["pixel_values"]] * 2), text=["Any mass?", QUESTION])
    assert batch["input_ids"][1].tolist() == expected and batch["attention_mask"][0, 0] == 0  # left padding
    text_only = processor(text=QUESTION)["input_ids"][0].tolist()
    assert text_only == [tokenizer.bos_token_id] + tokenizer(QUESTION, add_special_tokens=False)["input_ids"]


def test_m3d_training_sample_tokenizes_question_space_answer_as_m3d_does(smollm2_tokenizer):
    """M3D tokenizes `question + " " + answer` as one text, masks the question's length of it and appends EOS
    (LaMed/src/dataset/multi_dataset.py lines 316-333)."""
    processor = m3d_processor(smollm2_tokenizer)
    tokenizer = processor.tokenizer
    m3d_question = "<im_patch>" * 8 + " " + QUESTION
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt = [bos] + tokenizer(m3d_question, add_special_tokens=False)["input_ids"]
    sample = [bos] + tokenizer(m3d_question + " " + ANSWER, add_special_tokens=False)["input_ids"] + [eos]
    batch = processor(pixel_values=torch.zeros(1, 1, 8, 16, 16), text=QUESTION, answers=ANSWER)
    assert batch["input_ids"][0].tolist() == sample
    assert batch["labels"][0].tolist() == [-100] * len(prompt) + sample[len(prompt):]
    assert tokenizer.decode(sample[len(prompt):]) == " " + ANSWER + tokenizer.eos_token


def test_m3d_layout_keeps_a_tokenizers_own_bos_single(smollm2_tokenizer_dir):
    """A tokenizer that adds BOS itself (as Llama-2's does for M3D-LaMed-Llama-2-7B) gets no second one."""
    from transformers import AutoTokenizer

    processor = m3d_processor(AutoTokenizer.from_pretrained(smollm2_tokenizer_dir, add_bos_token=True))
    ids, labels, _ = processor.tokenize_one(QUESTION, ANSWER)
    assert ids[:2] == [processor.tokenizer.bos_token_id, processor.image_token_id] and ids.count(ids[0]) == 1


def test_m3d_layout_for_studies_and_conversations(smollm2_tokenizer, mni_path, tmp_path):
    """A study prompt is its placeholders (two series and a separator) then the question; a conversation with an
    image item is the prompt that `processor(images=..., text=...)` builds, its template unused."""
    processor = m3d_processor(smollm2_tokenizer, max_study_scans=2)
    tokenizer = processor.tokenizer
    other = tmp_path / "other.nii.gz"
    image = nib.load(mni_path)
    save_nifti(np.asarray(image.dataobj)[::-1].copy(), image.affine, other)
    study = processor(studies=[str(mni_path), str(other)], text=QUESTION)
    count = processor.num_study_image_tokens(2)
    assert study["input_ids"][0].tolist() == [tokenizer.bos_token_id] + [processor.image_token_id] * count + tokenizer(
        " " + QUESTION, add_special_tokens=False)["input_ids"]
    content = [{"type": "image", "path": str(mni_path)}, {"type": "text", "text": QUESTION}]
    conversation = [{"role": "system", "content": "You are a radiologist."}, {"role": "user", "content": content}]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == processor.build_prompt(QUESTION)
    rendered = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    direct = processor(images=str(mni_path), text=QUESTION)
    assert rendered["input_ids"].tolist() == direct["input_ids"].tolist()
    torch.testing.assert_close(rendered["pixel_values"], direct["pixel_values"], atol=0, rtol=0)


def test_chat_layout_is_unchanged(smollm2_tokenizer):
    processor = m3d_processor(smollm2_tokenizer, "chat")
    tokenizer = processor.tokenizer
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "<im_patch>" * 8 + QUESTION}], tokenize=False,
                                             add_generation_prompt=True)
    ids, _, _ = processor.tokenize_one(QUESTION)
    assert processor.build_prompt(QUESTION) == rendered
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    sample, labels, _ = processor.tokenize_one(QUESTION, ANSWER)
    assert sample == ids + tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_prompt_layout_round_trips_and_bad_values_raise(smollm2_tokenizer, minilm_dir, tmp_path):
    from transformers import AutoProcessor, AutoTokenizer

    processor = m3d_processor(smollm2_tokenizer, "m3d_caption")
    processor.save_pretrained(tmp_path)
    assert '"prompt_layout": "m3d_caption"' in (tmp_path / "processor_config.json").read_text()
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.prompt_layout == "m3d_caption" and loaded.image_processor.intensity_normalization == "minmax"
    assert loaded.tokenize_one(QUESTION, ANSWER) == processor.tokenize_one(QUESTION, ANSWER)
    with pytest.raises(ValueError, match="prompt_layout"):
        m3d_processor(smollm2_tokenizer, "llava")
    with pytest.raises(ValueError, match="prompt_layout='m3d'.*has none"):  # BERT's tokenizer has no BOS
        m3d_processor(AutoTokenizer.from_pretrained(minilm_dir), "m3d")
