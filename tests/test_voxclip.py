"""VoxCLIP: each loss term against a hand computation, the model's features and save/load, the offline error, and
its training stage: two processes train like one on the same global batch, and a killed run resumes exactly."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_vision_config

from voxlm.modeling import VoxCLIPConfig, VoxCLIPModel
from voxlm.modeling.losses import infonce_loss, inter_patient_loss, inter_patient_targets, siglip_loss
from voxlm.modeling.modeling_voxclip import TextEncoderNotFoundError
from voxlm.data import write_phantom_dataset


def unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_infonce_matches_a_hand_computation():
    images, texts, scale = unit([[1, 0], [0.6, 0.8], [0, 1]]), unit([[0.8, 0.6], [0, 1], [1, 1]]), torch.tensor(1.0)
    logits = math.e * images @ texts.T
    expected = 0.0
    for i in range(3):
        expected -= math.log(logits[i].exp()[i] / logits[i].exp().sum()) / 6
        expected -= math.log(logits[:, i].exp()[i] / logits[:, i].exp().sum()) / 6
    assert infonce_loss(images, texts, scale).item() == pytest.approx(expected, rel=1e-5)


def test_siglip_matches_a_hand_computation():
    images, texts = unit([[1, 0], [0, 1]]), unit([[1, 0], [1, 1]])
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-1.0)
    logits = 10 * images @ texts.T - 1
    expected = -sum(
        math.log(torch.sigmoid((1 if i == j else -1) * logits[i, j]).item()) for i in range(2) for j in range(2)
    ) / 2
    assert siglip_loss(images, texts, scale, bias).item() == pytest.approx(expected, rel=1e-5)


def test_inter_patient_targets_apply_mg3d_thresholds_and_l1():
    angle = lambda degrees: [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]  # noqa: E731
    texts = unit([angle(0), angle(20), angle(60)])  # cos 0.94 (>= 0.9), cos 0.5 (<= 0.6), cos(40) = 0.77
    targets = inter_patient_targets(texts, 0.6, 0.9)
    assert targets[0, 1] == 1.0 and targets[0, 2] == 0.0
    assert targets[1, 2].item() == pytest.approx(math.cos(math.radians(40)), rel=1e-5)
    assert torch.equal(targets, targets.T) and torch.all(targets.diagonal() == 1)
    images = unit([[1, 0], [1, 0], [0, 1]])
    expected = ((images @ images.T) - targets).abs().mean()
    assert inter_patient_loss(images, targets).item() == pytest.approx(expected.item())
    assert inter_patient_loss(texts, (texts @ texts.T)).item() == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def tiny_clip(minilm_dir):
    torch.manual_seed(0)
    return VoxCLIPModel.from_vision_text_pretrained(
        None, str(minilm_dir), vision_config=tiny_vision_config(), projection_dim=16, text_pooling="mean",
        inter_patient_loss_weight=0.5,
    )


def test_features_losses_and_save_load(tiny_clip, minilm_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    import voxlm  # noqa: F401

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    text = tokenizer(["left subdural hematoma", "normal head ct", "right fracture"], padding=True, return_tensors="pt",
                     return_token_type_ids=False)
    pixel_values = torch.rand(3, 1, 8, 16, 16)
    output = tiny_clip(**text, pixel_values=pixel_values, return_loss=True)
    assert output.image_embeds.shape == (3, 16) and output.logits_per_image.shape == (3, 3)
    torch.testing.assert_close(output.image_embeds.norm(dim=-1), torch.ones(3))
    expected = output.contrastive_loss + 0.5 * output.inter_patient_loss
    torch.testing.assert_close(output.loss, expected)
    tiny_clip.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    tiny_clip.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.get_image_features(pixel_values), tiny_clip.get_image_features(pixel_values))
        torch.testing.assert_close(loaded.get_text_features(**text), tiny_clip.get_text_features(**text))


def test_config_that_cannot_work_names_the_field():
    with pytest.raises(ValueError, match="contrastive_loss"):
        VoxCLIPConfig(contrastive_loss="triplet")
    with pytest.raises(ValueError, match="inter_patient_thresholds"):
        VoxCLIPConfig(inter_patient_thresholds=(0.9, 0.6))


def test_text_encoder_that_cannot_load_offline_says_how_to_fix_it():
    with pytest.raises(TextEncoderNotFoundError, match="microsoft/BiomedNLP-BiomedBERT.*local folder"):
        VoxCLIPModel.from_vision_text_pretrained(
            None, "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract", vision_config=tiny_vision_config()
        )


TRAIN_ARGS = [
    "model.vision_config={image_size: [8,16,16], patch_size: [2,4,4], hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 4}",
    "model.projection_dim=16",
    "pretrained.text_dropout=0.0",
    "data.shuffle_buffer=0",
    "run.tracker=null",
    "run.learning_rate=1e-3",
]


@pytest.fixture(scope="module")
def clip_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-data")
    write_phantom_dataset(folder, num_cases=24, shape=(16, 32, 32), rows_per_shard=4, test_fraction=0.0)
    return folder


def history(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "pretrain-clip_history.jsonl").read_text().splitlines()]


def run_stage(args, extra_env=None, launcher=()):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(extra_env or {}))
    command = [*launcher, "-m", "voxlm.training.train_clip", *args] if launcher else [
        sys.executable, "-m", "voxlm.training.train_clip", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


# The terms computed over the gathered global batch (the masked terms draw their masks per process, so they are not).
@pytest.mark.parametrize("terms", [[], ["model.inter_patient_loss_weight=1.0"]], ids=["infonce", "inter-patient"])
def test_two_processes_train_like_one_on_the_global_batch(tmp_path, terms):
    # Two shards of two reports: each of two processes streams one shard, one process streams both in order.
    write_phantom_dataset(tmp_path / "data", num_cases=4, shape=(16, 32, 32), rows_per_shard=2, test_fraction=0.0)
    common = [f"data.path={tmp_path / 'data'}", "run.max_steps=1", *TRAIN_ARGS, *terms]
    single = run_stage([*common, "run.batch_size=4", f"run.output_dir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    # Note: `accelerate launch --cpu --num_processes 2` starts two independent single-process runs (accelerate 1.x
    # launches multi-CPU jobs only through MPI); `--multi_gpu` on a machine without GPUs runs torchrun with gloo.
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
    double = run_stage([*common, "run.batch_size=2", f"run.output_dir={tmp_path / 'two'}"], launcher=launcher)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = history(tmp_path / "one")[0]["loss"], history(tmp_path / "two")[0]["loss"]
    assert abs(one - two) < 1e-5, (one, two)


def test_killed_run_resumes_on_the_same_loss_curve(clip_data, tmp_path):
    common = [f"data.path={clip_data}", "run.max_steps=8", "run.batch_size=4", "run.checkpoint_every=2", *TRAIN_ARGS]
    reference = run_stage([*common, f"run.output_dir={tmp_path / 'straight'}"])
    assert reference.returncode == 0, reference.stderr[-3000:]
    interrupted = tmp_path / "interrupted"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "voxlm.training.train_clip", *common,
                                f"run.output_dir={interrupted}"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        log = interrupted / "pretrain-clip_history.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 5:  # steps 1-5 done: a checkpoint at 4 exists
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = run_stage([*common, f"run.output_dir={interrupted}", "run.resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = {record["step"]: record["loss"] for record in history(tmp_path / "straight")}
    records = history(interrupted)
    restart = next(i for i in range(1, len(records)) if records[i]["step"] <= records[i - 1]["step"])
    after_resume = records[restart:]  # the resumed run continues from the last checkpoint (an even step)
    assert after_resume[0]["step"] % 2 == 1 and [r["step"] for r in after_resume][-1] == 8
    for record in after_resume:
        assert abs(record["loss"] - expected[record["step"]]) < 1e-5, record


def test_unknown_vision_tower_is_named():
    from voxlm.modeling import VoxCLIPConfig

    with pytest.raises(ValueError, match="'ct_fm' is no voxlm vision tower; choose one of \\['voxvit'"):
        VoxCLIPConfig(vision_config={"model_type": "ct_fm"})
