"""VoxCLIP's MG-3D and COLIPRI terms: each loss against a hand computation, the modules built only when their weight
is above 0, the gradients each term gives (and does not give), paired / image-only rows, save and load, and the
collator's and the stage's handling of image-only rows and MLM masking; the attention implementation each attention
follows, and the parameters kept from weight decay."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_vision_config

import voxlm  # noqa: F401  (registers the Auto classes)
from voxlm.modeling import VoxCLIPConfig, VoxCLIPModel
from voxlm.modeling.losses import (
    masked_reconstruction_loss,
    normalized_patches,
    report_generation_labels,
    token_cross_entropy,
)
from voxlm.modeling.losses import infonce_loss
from voxlm.modeling import modeling_voxclip, modeling_voxvit
from voxlm.modeling.modeling_voxclip import random_patch_masking

TINY_TEXT = dict(model_type="bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                 vocab_size=99, max_position_embeddings=64)
TINY_DECODER = dict(volume_decoder_hidden_size=16, volume_decoder_heads=2, volume_decoder_intermediate_size=32)
ALL_TERMS = dict(mvr_loss_weight=0.5, mim_loss_weight=2.0, mlm_loss_weight=3.0, report_gen_loss_weight=0.25,
                 inter_patient_loss_weight=1.5)


def tiny_clip(**weights) -> VoxCLIPModel:
    torch.manual_seed(0)
    config = VoxCLIPConfig(vision_config=tiny_vision_config(), text_config=TINY_TEXT, projection_dim=8,
                           text_pooling="mean", **TINY_DECODER, **weights)
    return VoxCLIPModel(config).eval()  # eval: no dropout, so two passes with one seed agree


def batch(has_report=(True, True, False), seed: int = 0) -> dict:
    """Three rows of random volumes and 6-token reports (`[CLS]=1 ... [SEP]=2`, padding 0); image-only rows get the
    empty report `[CLS] [SEP]` as the collator gives them. Token 3 is `[MASK]`; MLM targets at positions 1 and 3."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 99, (3, 6), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 1, 2
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, 4:], attention_mask[1, 4:] = torch.tensor([2, 0]), torch.tensor([1, 0])  # a shorter report
    has_report = torch.tensor(has_report)
    for row in torch.nonzero(~has_report).flatten():
        input_ids[row] = torch.tensor([1, 2, 0, 0, 0, 0])
        attention_mask[row] = torch.tensor([1, 1, 0, 0, 0, 0])
    mlm_labels = torch.full_like(input_ids, -100)
    mlm_labels[:, [1, 3]] = input_ids[:, [1, 3]]
    mlm_labels[~has_report] = -100
    mlm_input_ids = torch.where(mlm_labels != -100, torch.full_like(input_ids, 3), input_ids)
    return dict(input_ids=input_ids, attention_mask=attention_mask, has_report=has_report,
                pixel_values=torch.rand(3, 1, 8, 16, 16, generator=generator), mlm_input_ids=mlm_input_ids,
                mlm_labels=mlm_labels)


def run(model, inputs, seed: int = 0):
    torch.manual_seed(seed)  # the patch masking draws from the global generator
    return model(**inputs, return_loss=True)


# --- losses by hand -------------------------------------------------------------------------------------------------


def test_token_cross_entropy_averages_over_labelled_positions_only():
    logits = torch.tensor([[[2.0, 0.0], [5.0, -5.0], [0.0, 1.0]]])  # (1, 3, 2)
    labels = torch.tensor([[0, -100, 0]])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (1 + math.e))) / 2
    assert token_cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    # No target at all (an image-only batch): 0, not NaN, and still differentiable.
    logits.requires_grad_(True)
    empty = token_cross_entropy(logits, torch.full((1, 3), -100))
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_report_generation_labels_shift_left_and_skip_padding_and_image_only_rows():
    input_ids = torch.tensor([[1, 7, 8, 2, 0], [1, 9, 2, 0, 0], [1, 2, 0, 0, 0]])
    attention_mask = (input_ids != 0).long()
    labels = report_generation_labels(input_ids, attention_mask, torch.tensor([True, True, False]))
    assert labels.tolist() == [[7, 8, 2, -100, -100], [9, 2, -100, -100, -100], [-100] * 5]


def test_normalized_patches_standardise_each_patch():
    patches = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]]])  # (1, 2, 4)
    std = math.sqrt(5 / 3 + 1e-6)  # unbiased variance of 1..4 is 5/3 (MAE uses torch.var's default)
    expected = torch.tensor([[[-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std], [0.0, 0.0, 0.0, 0.0]]])
    torch.testing.assert_close(normalized_patches(patches), expected)


def test_masked_reconstruction_loss_is_the_mse_of_masked_patches():
    predictions = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [3.0, 0.0]]])  # (1, 3, 2)
    targets = torch.tensor([[[0.0, 0.0], [9.0, 9.0], [0.0, 2.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])  # patch 1 is visible: its error of 81 must not count
    expected = ((1 + 1) / 2 + (9 + 4) / 2) / 2
    assert masked_reconstruction_loss(predictions, targets, mask).item() == pytest.approx(expected)
    assert masked_reconstruction_loss(predictions, targets, torch.zeros(1, 3)).item() == 0.0


def test_random_patch_masking_hides_the_rest():
    keep_ids, mask = random_patch_masking(torch.rand(4, 64), 16)
    assert keep_ids.shape == (4, 16) and mask.shape == (4, 64)
    assert torch.all(mask.sum(dim=1) == 48)
    assert torch.all(mask.gather(1, keep_ids) == 0)
    assert all(len(set(row.tolist())) == 16 for row in keep_ids)
    keep_ids, mask = random_patch_masking(torch.tensor([[0.9, 0.1, 0.5, 0.3]]), 2)  # the two smallest stay visible
    assert keep_ids.tolist() == [[1, 3]] and mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]


# --- configuration and modules --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, prefix",
    [
        ({"mvr_loss_weight": 1.0}, "volume_decoder.layers.0.cross_attn."),
        ({"mim_loss_weight": 1.0}, "volume_decoder.predictor."),
        ({"mlm_loss_weight": 1.0}, "mlm_head."),
        ({"report_gen_loss_weight": 1.0}, "report_decoder."),
    ],
)
def test_a_term_builds_its_modules_only_when_its_weight_is_above_zero(weights, prefix):
    assert any(key.startswith(prefix) for key in tiny_clip(**weights).state_dict())
    assert not any(key.startswith(prefix) for key in tiny_clip().state_dict())


def test_image_only_masked_modelling_has_no_text_guidance():
    assert not any("cross_attn" in key for key in tiny_clip(mim_loss_weight=1.0).state_dict())


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"mvr_loss_weight": -1.0}, "mvr_loss_weight"),
        ({"mim_loss_weight": -0.1}, "mim_loss_weight"),
        ({"mlm_loss_weight": -1.0}, "mlm_loss_weight"),
        ({"report_gen_loss_weight": -1.0}, "report_gen_loss_weight"),
        ({"mvr_loss_weight": 1.0, "mask_ratio": 1.0}, "mask_ratio"),
        ({"mim_loss_weight": 1.0, "mask_ratio": 0.999}, "mask_ratio"),
        ({"mvr_loss_weight": 1.0, "volume_decoder_hidden_size": 18, "volume_decoder_heads": 4}, "volume_decoder_heads"),
        ({"mvr_loss_weight": 1.0, "volume_decoder_layers": 0}, "volume_decoder_layers"),
        ({"mlm_loss_weight": 1.0, "mlm_fusion_layers": 0}, "mlm_fusion_layers"),
        ({"report_gen_loss_weight": 1.0, "report_decoder_layers": 0}, "report_decoder_layers"),
    ],
)
def test_settings_that_cannot_work_name_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        VoxCLIPConfig(vision_config=tiny_vision_config(), text_config=TINY_TEXT, **settings)


def test_masked_volume_terms_need_scan_attention_in_every_block():
    vision = tiny_vision_config(attention_levels=["slice", "scan"])
    VoxCLIPConfig(vision_config=vision, text_config=TINY_TEXT)  # fine without the masked terms
    with pytest.raises(ValueError, match="attention_levels"):
        VoxCLIPConfig(vision_config=vision, text_config=TINY_TEXT, mim_loss_weight=1.0)


def test_config_round_trip_keeps_the_terms(tmp_path):
    config = tiny_clip(**ALL_TERMS).config
    config.save_pretrained(tmp_path)
    loaded = VoxCLIPConfig.from_pretrained(tmp_path)
    for field in ("mvr_loss_weight", "mim_loss_weight", "mlm_loss_weight", "report_gen_loss_weight", "mask_ratio",
                  "volume_decoder_hidden_size", "mlm_fusion_layers", "report_decoder_layers"):
        assert getattr(loaded, field) == getattr(config, field), field


# --- the model ------------------------------------------------------------------------------------------------------


def test_reconstruction_terms_decode_the_encoders_pass_over_the_kept_patches():
    model = tiny_clip(mvr_loss_weight=1.0, mim_loss_weight=1.0)
    inputs = batch()
    patch_noise = torch.rand(3, 64)
    with torch.no_grad():
        output = model(**inputs, patch_noise=patch_noise, return_loss=True)
        keep_ids, mask = random_patch_masking(patch_noise, model.config.num_visible_patches)  # (3, 16), (3, 64)
        visible = model.vision_model(inputs["pixel_values"], keep_ids=keep_ids).last_hidden_state  # (3, 17, 32)
        text_states = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
        predictions = model.volume_decoder(visible, keep_ids, text_states, inputs["attention_mask"],
                                           inputs["has_report"])
    targets = normalized_patches(modeling_voxvit.patchify(inputs["pixel_values"], (2, 4, 4)))  # (3, 64, 32)
    paired = inputs["has_report"].float()[:, None]
    torch.testing.assert_close(output.mvr_loss, masked_reconstruction_loss(predictions, targets, mask * paired),
                               rtol=0, atol=0)
    torch.testing.assert_close(output.mim_loss, masked_reconstruction_loss(predictions, targets, mask * (1 - paired)),
                               rtol=0, atol=0)


LOSS_NAMES = ("loss", "contrastive_loss", "inter_patient_loss", "mvr_loss", "mim_loss", "mlm_loss", "report_gen_loss")


def test_eager_and_sdpa_attention_give_the_same_losses():
    model = tiny_clip(**ALL_TERMS)
    sdpa = run(model, batch())
    model.set_attn_implementation("eager")
    parts = (model, model.vision_model, model.text_model)
    assert [part.config._attn_implementation for part in parts] == ["eager"] * 3
    eager = run(model, batch())
    for name in LOSS_NAMES + ("image_embeds", "text_embeds"):
        torch.testing.assert_close(getattr(eager, name), getattr(sdpa, name), atol=1e-5, rtol=1e-5, msg=name)


def test_from_pretrained_attention_implementation_reaches_the_decoders_and_the_encoder(tmp_path, monkeypatch):
    tiny_clip(**ALL_TERMS).save_pretrained(tmp_path)
    model = VoxCLIPModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    calls = {}
    for module in (modeling_voxclip, modeling_voxvit):  # the decoders' and the VoxViT's eager attention
        def spy(*args, _eager=module.eager_attention_forward, _name=module.__name__, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _eager(*args, **kwargs)
        monkeypatch.setattr(module, "eager_attention_forward", spy)
    run(model, batch())
    assert calls.get(modeling_voxclip.__name__, 0) > 0 and calls.get(modeling_voxvit.__name__, 0) > 0, calls
    with pytest.raises(ValueError, match="does not support"):
        VoxCLIPModel.from_pretrained(tmp_path, attn_implementation="flex_attention")


@pytest.mark.parametrize(
    "weights, decoders",
    [({}, set()), (ALL_TERMS, {"volume_decoder.mask_token", "report_decoder.position_embeddings.weight"})],
    ids=["contrastive", "all-terms"],
)
def test_no_weight_decay_lists_the_encoders_and_the_decoders_embeddings(weights, decoders):
    model = tiny_clip(**weights)
    names = model.no_weight_decay()
    assert names == {"vision_model.patch_embedding.position_embeddings", "vision_model.cls_token"} | decoders
    parameters = dict(model.named_parameters())
    assert all(parameters[name].dim() >= 2 for name in names), {name: parameters[name].shape for name in names}


def test_loss_is_the_weighted_sum_of_the_components():
    output = run(tiny_clip(**ALL_TERMS), batch())
    components = {name: getattr(output, name) for name in ("contrastive_loss", "inter_patient_loss", "mvr_loss",
                                                           "mim_loss", "mlm_loss", "report_gen_loss")}
    assert all(value is not None and torch.isfinite(value) and value > 0 for value in components.values()), components
    expected = (components["contrastive_loss"] + 1.5 * components["inter_patient_loss"] + 0.5 * components["mvr_loss"]
                + 2.0 * components["mim_loss"] + 3.0 * components["mlm_loss"] + 0.25 * components["report_gen_loss"])
    torch.testing.assert_close(output.loss, expected)
    assert tiny_clip().forward(**batch(), return_loss=True).mvr_loss is None


def test_contrastive_terms_use_the_paired_rows_only():
    inputs = batch(has_report=(True, True, False))
    output = run(tiny_clip(), inputs)
    expected = infonce_loss(output.image_embeds[:2], output.text_embeds[:2], tiny_clip().logit_scale)
    torch.testing.assert_close(output.contrastive_loss, expected)
    image_only = run(tiny_clip(mim_loss_weight=1.0), batch(has_report=(False, False, False)))
    assert image_only.contrastive_loss.item() == 0.0 and image_only.mim_loss > 0
    image_only.loss.backward()  # finite, and no NaN reaches the parameters


def test_each_masked_volume_term_reads_only_its_own_rows():
    model = tiny_clip(mvr_loss_weight=1.0, mim_loss_weight=1.0)
    assert run(model, batch(has_report=(True, True, True))).mim_loss.item() == 0.0
    assert run(model, batch(has_report=(False, False, False))).mvr_loss.item() == 0.0


def test_reconstruction_is_text_guided_for_mvr_and_not_for_mim():
    inputs, other_report = batch(), batch()
    other_report["input_ids"][0, 1:5] = torch.tensor([10, 11, 12, 13])
    mvr = tiny_clip(mvr_loss_weight=1.0)
    assert run(mvr, inputs).mvr_loss != run(mvr, other_report).mvr_loss  # same masks (seed), other report
    mim = tiny_clip(mim_loss_weight=1.0)
    unpaired, other_unpaired = batch(has_report=(False, False, False)), batch(has_report=(False, False, False))
    other_unpaired["input_ids"][0, 1] = 7
    torch.testing.assert_close(run(mim, unpaired).mim_loss, run(mim, other_unpaired).mim_loss, rtol=0, atol=0)


def test_mlm_ignores_targets_on_image_only_rows():
    inputs = batch(has_report=(True, True, False))
    inputs["mlm_labels"][:2] = -100
    inputs["mlm_labels"][2, 1] = 17  # a target on the image-only row: must not count
    assert run(tiny_clip(mlm_loss_weight=1.0), inputs).mlm_loss.item() == 0.0
    with pytest.raises(ValueError, match="mlm_input_ids"):
        tiny_clip(mlm_loss_weight=1.0)(**{**batch(), "mlm_input_ids": None}, return_loss=True)


def test_report_decoder_is_causal_and_reads_the_volume():
    model = tiny_clip(report_gen_loss_weight=1.0)
    inputs = batch()
    changed_volume = {**inputs, "pixel_values": torch.rand(3, 1, 8, 16, 16)}
    assert run(model, inputs).report_gen_loss != run(model, changed_volume).report_gen_loss
    embeds = model.text_model.get_input_embeddings()(inputs["input_ids"])  # (3, 6, 32)
    later = embeds.clone()
    later[:, 4:] = 0.0
    image_tokens = torch.rand(3, 65, 32)
    labels = torch.zeros(3, 6, dtype=torch.long)
    with torch.no_grad():
        logits, _ = model.report_decoder(embeds, image_tokens, None, labels, model.word_embeddings())  # (18, V)
        logits_later, _ = model.report_decoder(later, image_tokens, None, labels, model.word_embeddings())
    logits, logits_later = logits.view(3, 6, -1), logits_later.view(3, 6, -1)
    torch.testing.assert_close(logits[:, :4], logits_later[:, :4])  # positions 0-3 never see tokens 4-5
    assert not torch.allclose(logits[:, 4:], logits_later[:, 4:])


GRADIENT_CASES = {
    "mim_loss with mvr on": (
        {"mim_loss_weight": 1.0, "mvr_loss_weight": 1.0},
        ["volume_decoder.mask_token", "volume_decoder.predictor", "vision_model.blocks"],
        ["volume_decoder.layers.0.cross_attn", "text_model", "visual_projection"],  # image-only rows: text gated off
    ),
    "contrastive_loss": (
        {},
        ["visual_projection", "text_projection", "logit_scale", "vision_model.blocks", "text_model.encoder"],
        [],
    ),
    "mvr_loss": (
        {"mvr_loss_weight": 1.0},
        ["volume_decoder.mask_token", "volume_decoder.layers.0.cross_attn", "volume_decoder.predictor",
         "vision_model.patch_embedding", "vision_model.blocks", "text_model.encoder"],
        ["visual_projection", "text_projection", "logit_scale"],
    ),
    "mim_loss": (
        {"mim_loss_weight": 1.0},
        ["volume_decoder.mask_token", "volume_decoder.predictor", "vision_model.patch_embedding",
         "vision_model.blocks"],
        ["text_model", "visual_projection", "text_projection", "logit_scale"],
    ),
    "mlm_loss": (
        {"mlm_loss_weight": 1.0},
        ["mlm_head.fusion.0.cross_attn", "mlm_head.transform", "mlm_head.bias", "text_model.encoder",
         "text_model.embeddings.word_embeddings", "vision_model.blocks"],
        ["visual_projection", "text_projection", "logit_scale"],
    ),
    "report_gen_loss": (
        {"report_gen_loss_weight": 1.0},
        ["report_decoder.layers.0.self_attn", "report_decoder.layers.0.cross_attn",
         "report_decoder.position_embeddings",
         "report_decoder.bias", "text_model.embeddings.word_embeddings", "vision_model.blocks"],
        ["text_model.encoder", "visual_projection", "text_projection", "logit_scale"],
    ),
}


@pytest.mark.parametrize("term", sorted(GRADIENT_CASES))
def test_each_term_trains_the_right_parameters(term):
    weights, trained, untouched = GRADIENT_CASES[term]
    model = tiny_clip(**weights)
    # The image-only masked term reads the image-only row, the others the paired rows; the last row is image-only.
    output = run(model.train(), batch(has_report=(True, True, False)))
    names, parameters = zip(*model.named_parameters())
    loss = getattr(output, term.split()[0])
    gradients = dict(zip(names, torch.autograd.grad(loss, parameters, allow_unused=True)))
    moved = {name for name, grad in gradients.items() if grad is not None and grad.abs().sum() > 0}
    for prefix in trained:
        assert any(name.startswith(prefix) for name in moved), f"{term} gives no gradient to {prefix}"
    for prefix in untouched:
        assert not any(name.startswith(prefix) for name in moved), f"{term} gives a gradient to {prefix}"


def test_save_and_load_with_every_term(tmp_path):
    from transformers import AutoModel

    model = tiny_clip(**ALL_TERMS)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, VoxCLIPModel) and loaded.config.mlm_loss_weight == 3.0
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        torch.testing.assert_close(restored[key], original[key], rtol=0, atol=0, msg=key)
    expected, actual = run(model, batch()), run(loaded, batch())
    for name in ("loss", "mvr_loss", "mim_loss", "mlm_loss", "report_gen_loss"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), rtol=0, atol=0)
    plain = tiny_clip()
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in model.parameters())


REMOTE_LOSSES = """
import importlib.abc, sys
class BlockVoxlm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "voxlm" or name.startswith("voxlm."):
            raise ImportError("voxlm is blocked in this process")
sys.meta_path.insert(0, BlockVoxlm())
import torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert not type(model).__module__.startswith("voxlm"), type(model).__module__
output = model(**torch.load(sys.argv[1] + "/inputs.pt", weights_only=True), return_loss=True)
names = ("loss", "mvr_loss", "mim_loss", "mlm_loss", "report_gen_loss")
torch.save({name: getattr(output, name).detach() for name in names}, sys.argv[1] + "/remote.pt")
"""


def test_every_term_runs_from_the_saved_code_without_voxlm(tmp_path):
    import subprocess
    import sys

    model = tiny_clip(**ALL_TERMS)
    model.save_pretrained(tmp_path)
    inputs = {**batch(), "patch_noise": torch.rand(3, 64)}  # the masks come with the inputs, as from the collator
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "remote.py").write_text(REMOTE_LOSSES)
    result = subprocess.run([sys.executable, "-I", str(tmp_path / "remote.py"), str(tmp_path)], capture_output=True,
                            text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "remote.pt", weights_only=True)
    with torch.no_grad():
        local = model(**inputs, return_loss=True)
    for name, value in remote.items():
        torch.testing.assert_close(value, getattr(local, name), rtol=0, atol=1e-5, msg=name)


# --- data: image-only rows and MLM masking --------------------------------------------------------------------------


def test_collator_marks_image_only_rows_and_masks_reports_the_bert_way(minilm_dir):
    from transformers import AutoTokenizer

    from voxlm.data import ContrastiveCollator

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    long_report = " ".join(["left frontal intraparenchymal hemorrhage with surrounding edema"] * 12)
    samples = [{"pixel_values": torch.zeros(1, 2, 2, 2), "report": report}
               for report in (long_report, None, "", "normal head ct")]
    plain = ContrastiveCollator(tokenizer)(samples)
    assert plain["has_report"].tolist() == [True, False, False, True] and "mlm_labels" not in plain
    batch_ = ContrastiveCollator(tokenizer, mlm_probability=0.15, seed=3)(samples)
    labels, masked, original = batch_["mlm_labels"], batch_["mlm_input_ids"], batch_["input_ids"]
    targets = labels != -100
    assert not targets[1:3].any()  # image-only rows: nothing to predict
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    assert not (targets & special).any()  # [CLS], [SEP], [PAD] are never masked
    assert torch.equal(labels[targets], original[targets]) and torch.equal(masked[~targets], original[~targets])
    share = targets[0].sum().item() / (~special[0]).sum().item()
    assert 0.05 < share < 0.3, share  # 15% of the report's tokens
    assert (masked[targets] == tokenizer.mask_token_id).float().mean() > 0.5  # most become [MASK] (BERT's 80%)
    again = ContrastiveCollator(tokenizer, mlm_probability=0.15, seed=3)(samples)
    assert torch.equal(again["mlm_input_ids"], masked)
    noisy = ContrastiveCollator(tokenizer, num_patches=64, seed=3)
    rows = [{**sample, "id": f"row-{index}"} for index, sample in enumerate(samples)]
    others = [{**sample, "id": f"row-{index + 4}"} for index, sample in enumerate(samples)]
    first, second = noisy(rows)["patch_noise"], noisy(others)["patch_noise"]
    assert first.shape == (4, 64) and not torch.equal(first, second)  # a new draw for each batch of other rows ...
    # ... that depends on the seed and the rows only, not on the batches drawn before (a resumed run skips those).
    assert torch.equal(noisy(rows)["patch_noise"], first)
    assert torch.equal(ContrastiveCollator(tokenizer, num_patches=64, seed=3)(rows)["patch_noise"], first)
    assert not torch.equal(ContrastiveCollator(tokenizer, num_patches=64, seed=4)(rows)["patch_noise"], first)


def test_rows_without_a_report_stream_and_collate_as_image_only(tmp_path, minilm_dir):
    from transformers import AutoTokenizer

    from voxlm.processing import VoxVolumeProcessor
    from voxlm.data import ContrastiveCollator, PreprocessedStream, write_phantom_dataset
    from voxlm.data.hub_format import encode_array, write_dataset
    from voxlm.training.train_clip import ClipDataSettings, clip_rows

    volume = encode_array((torch.rand(8, 16, 16) * 80).numpy())
    reports = ["left subdural hematoma", None, "", "normal head ct"]
    rows = [dict(id=f"r{i}", patient_id=f"p{i}", image=volume, modality="CT", report=report, question_type="report",
                 split="train") for i, report in enumerate(reports)]
    write_dataset(rows, tmp_path / "mixed", "rows with and without reports")
    processor = VoxVolumeProcessor(image_size=(8, 16, 16))
    collator = ContrastiveCollator(AutoTokenizer.from_pretrained(minilm_dir))
    samples = list(PreprocessedStream(clip_rows(ClipDataSettings(path=str(tmp_path / "mixed"), shuffle_buffer=0), 0,
                                                1, seed=0), processor))
    assert collator(samples)["has_report"].tolist() == [True, False, False, True]

    write_phantom_dataset(tmp_path / "paired", 6, shape=(8, 16, 16), test_fraction=0.0)
    write_phantom_dataset(tmp_path / "images", 6, shape=(8, 16, 16), seed=100, test_fraction=0.0)
    data = ClipDataSettings(path=str(tmp_path / "paired"), image_only_path=str(tmp_path / "images"), shuffle_buffer=0)
    mixed = list(clip_rows(data, 0, 1, seed=0))
    image_only = [row for row in mixed if row["report"] is None]
    assert image_only and all(row["patient_id"].startswith("phantom-0001") for row in image_only)
    assert all(row["report"] for row in mixed if row["patient_id"].startswith("phantom-0000"))


def every_term_overrides(tmp_path, text_dir) -> dict:
    """pretrain-clip settings with every extra term on, on 8 phantoms, every second one without its report."""
    from voxlm.data import generate_case, write_dataset
    from voxlm.data.phantom_dataset import case_rows

    rows = [case_rows(generate_case(seed, shape=(8, 16, 16)), "train")[0] for seed in range(8)]  # the report rows
    for row in rows[1::2]:
        row["report"] = None
    write_dataset(rows, tmp_path / "half-paired", "phantoms, half of them without reports")
    return {
        "model.vision_config": "{image_size: [8,16,16], patch_size: [2,4,4], hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
                               "num_attention_heads: 4}",
        "model.projection_dim": "16",
        "pretrained.text": str(text_dir),
        "pretrained.text_dropout": "0.0",
        "model.volume_decoder_hidden_size": "16", "model.volume_decoder_heads": "2",
        "model.volume_decoder_intermediate_size": "32",
        **{f"model.{name}": "1.0" for name in ("mvr_loss_weight", "mim_loss_weight", "mlm_loss_weight",
                                               "report_gen_loss_weight")},
        "data.path": str(tmp_path / "half-paired"), "data.shuffle_buffer": "0",
        "run.max_steps": "2", "run.batch_size": "4", "run.tracker": "null",
        "run.output_dir": str(tmp_path / "run"),
    }


def history(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "pretrain-clip_history.jsonl").read_text().splitlines()]


def test_pretrain_clip_runs_with_every_term_and_image_only_data(tmp_path, tiny_text_encoder_dir):
    from transformers import AutoModel

    from voxlm.training import train_clip
    from voxlm.training.settings import load_settings

    from voxlm.data import write_phantom_dataset

    # COLIPRI's setting: paired rows (here half of them without a report) mixed with an image-only dataset.
    write_phantom_dataset(tmp_path / "images", 8, shape=(8, 16, 16), seed=100, test_fraction=0.0)
    overrides = every_term_overrides(tmp_path, tiny_text_encoder_dir)
    overrides["data.image_only_path"] = str(tmp_path / "images")
    final = train_clip.train(load_settings(train_clip.ClipSettings, None, overrides))
    records = history(tmp_path / "run")
    assert len(records) == 2
    for name in ("contrastive_loss", "mvr_loss", "mim_loss", "mlm_loss", "report_gen_loss"):
        assert all(math.isfinite(record[name]) for record in records), name
    assert any(record["paired_fraction"] < 1 for record in records)
    loaded = AutoModel.from_pretrained(final)
    assert loaded.volume_decoder is not None and loaded.mlm_head is not None and loaded.report_decoder is not None
    assert F.normalize(loaded.get_image_features(torch.rand(1, 1, 8, 16, 16)), dim=-1).shape == (1, 16)


def test_resumed_run_with_every_term_continues_the_same_loss_curve(tmp_path, tiny_text_encoder_dir):
    from voxlm.training import train_clip
    from voxlm.training.settings import load_settings

    overrides = {**every_term_overrides(tmp_path, tiny_text_encoder_dir), "run.max_steps": "2",
                 "run.checkpoint_every": "1"}
    train_clip.train(load_settings(train_clip.ClipSettings, None, overrides))
    # A run that stopped after step 1: the straight run's step-1 checkpoint (checkpoint_0) without the later one.
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "run" / "checkpoints", stopped / "checkpoints")
    shutil.rmtree(stopped / "checkpoints" / "checkpoint_1")
    resumed = {**overrides, "run.output_dir": str(stopped), "run.resume": "true"}
    train_clip.train(load_settings(train_clip.ClipSettings, None, resumed))
    straight, after_resume = history(tmp_path / "run"), history(stopped)
    assert [record["step"] for record in after_resume] == [2]
    for name in ("loss", "mvr_loss", "mim_loss", "mlm_loss", "report_gen_loss"):  # the same masks were drawn
        assert after_resume[0][name] == pytest.approx(straight[1][name], abs=1e-6), name
