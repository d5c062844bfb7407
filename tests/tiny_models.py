"""Tiny configs shared by the model tests (STYLE.md rule 13): volume (1, 8, 16, 16), patch (2, 4, 4), width 32."""

import torch
from transformers import LogitsProcessor

from voxlm.modeling import VoxLMConfig, VoxViTConfig

IMAGE_TOKEN_ID, SEG_TOKEN_ID, BOX_START_TOKEN_ID, BOX_END_TOKEN_ID = 4, 5, 6, 7
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2
VOCAB_SIZE = 99

TEXT_CONFIGS = {
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "phi3": dict(model_type="phi3", num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2),
}


def tiny_vision_config(**overrides) -> VoxViTConfig:
    settings = dict(
        image_size=(8, 16, 16),
        patch_size=(2, 4, 4),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    settings.update(overrides)
    return VoxViTConfig(**settings)


def tiny_text_config(kind: str = "llama", **overrides) -> dict:
    settings = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB_SIZE,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        max_position_embeddings=128,
        **TEXT_CONFIGS[kind],
    )
    settings.update(overrides)
    return settings


def tiny_voxlm_config(kind: str = "llama", seg: bool = True, **overrides) -> VoxLMConfig:
    settings = dict(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(kind),
        seg_config=dict(hidden_size=32, num_attention_heads=4, intermediate_size=64) if seg else None,
        image_token_id=IMAGE_TOKEN_ID,
        seg_token_id=SEG_TOKEN_ID,
        box_start_token_id=BOX_START_TOKEN_ID,
        box_end_token_id=BOX_END_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )
    settings.update(overrides)
    return VoxLMConfig(**settings)


# The demo and CLI tests (tests/test_inference_cli.py, tests/test_space.py) load models from folders, as users do.
DEMO_IMAGE_SIZE = [8, 32, 32]
DEMO_VISION = dict(patch_size=[2, 8, 8], hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=4)
DEMO_MAX_STUDY_SCANS = 2
DEMO_SEG_QUESTION = "Segment the brain in this CT."
DEMO_SEG_ANSWER = "It is [SEG]."


def save_demo_voxlm(folder, steps: int = 45, seed: int = 0):
    """A tiny VoxLM (tiny Llama with SmolLM2's tokenizer) that answers `DEMO_SEG_QUESTION` with `DEMO_SEG_ANSWER` on
    any volume or study of up to `DEMO_MAX_STUDY_SCANS` series, and segments what it was trained to: saved with its
    processor to `folder`.

    Its projector is zeroed and frozen, so the LLM is blind to the image and its greedy answer is the same for every
    volume (a tiny model trained on two phantoms does not generalise, and the tests feed it MRI and DICOM too); the
    segmentation head still reads the encoder's patch features, and is trained for a few steps on brain masks
    (0-100 HU) of two phantoms, a target large enough to be learnt in a few steps, so its masks are not empty. The
    batch holds each phantom alone (a one-series study, the same as the volume) and the two as one two-series study
    (mask on its first series), so study prompts, which hold more image placeholders, get the same answer.
    Returns the phantom volumes `(D, H, W)` it was trained on."""
    import torch

    from voxlm.training.assemble import PretrainedParts, build_voxlm
    from voxlm.data import generate_case

    model, processor = build_voxlm(PretrainedParts(llm="tiny-llama"), dict(
        vision_config={**DEMO_VISION, "image_size": DEMO_IMAGE_SIZE, "max_scans": DEMO_MAX_STUDY_SCANS},
        seg_config=dict(hidden_size=32, num_attention_heads=4, intermediate_size=64),
        max_study_scans=DEMO_MAX_STUDY_SCANS), seed=seed)
    for parameter in model.multi_modal_projector.parameters():
        parameter.data.zero_()
        parameter.requires_grad_(False)
    volumes = [generate_case(s, shape=(16, 48, 48)).volume for s in range(2)]
    masks = [((v > 0) & (v < 100)).astype("uint8") for v in volumes]
    studies = [[volume] for volume in volumes] + [list(volumes)]
    batch = processor(studies=studies, text=[DEMO_SEG_QUESTION] * len(studies),
                      answers=[DEMO_SEG_ANSWER] * len(studies), masks=masks + masks[:1])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return volumes


def save_demo_voxclip(folder, minilm_dir, seed: int = 0) -> None:
    """A tiny random VoxCLIP (MiniLM text encoder) with its processor (volume processor and tokenizer), saved to
    `folder`."""
    import torch
    from transformers import AutoTokenizer

    from voxlm.modeling import VoxCLIPModel
    from voxlm.processing import VoxCLIPProcessor, VoxVolumeProcessor

    torch.manual_seed(seed)
    model = VoxCLIPModel.from_vision_text_pretrained(
        None, str(minilm_dir), vision_config=VoxViTConfig(image_size=DEMO_IMAGE_SIZE, **DEMO_VISION), projection_dim=16)
    model.save_pretrained(folder)
    processor = VoxCLIPProcessor(VoxVolumeProcessor(image_size=DEMO_IMAGE_SIZE), AutoTokenizer.from_pretrained(minilm_dir))
    processor.save_pretrained(folder)


def tiny_segvol_config(**overrides) -> dict:
    """A tiny SegVol head (`seg_config`) over the tiny volume: its own one-layer ViT of the tiny width."""
    settings = dict(
        head_type="segvol",
        prompt_token="previous",
        hidden_size=32,
        num_attention_heads=8,
        intermediate_size=64,
        image_encoder_config=tiny_vision_config(num_hidden_layers=1).to_dict(),
    )
    settings.update(overrides)
    return settings


class ForceAnswer(LogitsProcessor):
    """Writes a fixed answer, one token per step, whatever the model would."""

    def __init__(self, prompt_length: int, answer: list[int]):
        self.prompt_length, self.answer = prompt_length, answer

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.answer[input_ids.shape[1] - self.prompt_length]] = 0.0
        return forced


def remote_voxlm_outputs(folder, question: str, volume, tmp_path) -> dict:
    """What `tests/remote_code_user.py` (a user without voxlm, `trust_remote_code=True` only) computes for a saved
    VoxLM folder and one volume file: `pixel_values.0`, `input_ids.0`, the greedy `generated.0`. Asserts that it ran
    and that every class it used came from the folder's remote code."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors import safe_open

    output = Path(tmp_path) / "remote.safetensors"
    # A fresh module cache and no voxlm on the path: remote_code_user.py also blocks `import voxlm`.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(Path(tmp_path) / "modules"), "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "remote_code_user.py"), "voxlm", str(folder),
                           str(output), question, str(volume)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    with safe_open(output, "pt") as saved:
        classes = json.loads(saved.metadata()["texts"])["classes"]
        assert all(name.startswith("transformers_modules.") for name in classes), classes
        return {name: saved.get_tensor(name) for name in saved.keys()}


def mllm_settings(pairs):
    """`MLLMSettings` from `key=value` overrides, as `voxlm train align|finetune` parses them."""
    from voxlm.training.mllm import MLLMSettings
    from voxlm.training.settings import load_settings, parse_overrides

    return load_settings(MLLMSettings, None, parse_overrides(pairs))


def run_mllm_stages(root, model_pairs: list[str], num_cases: int, tasks: str | None = None,
                    finetune_pairs: tuple[str, ...] = ()):
    """Two-step `align` (from `model_pairs`) then LoRA `finetune` runs on phantoms written under `root`.

    Returns:
        `(aligned, tuned)`: the stages' output folders.
    """
    from voxlm.data import write_phantom_dataset
    from voxlm.training import finetune, pretrain_projector

    write_phantom_dataset(root / "data", num_cases=num_cases, shape=(16, 32, 32), rows_per_shard=16, test_fraction=0.0)
    common = [f"data.path={root / 'data'}", "run.batch_size=2", "run.tracker=null", "run.max_steps=2",
              *([f"data.tasks={tasks}"] if tasks else [])]
    aligned = pretrain_projector.train(mllm_settings([*common, *model_pairs, f"run.output_dir={root / 'align'}"]))
    tuned = finetune.train(mllm_settings([*common, f"init_from={aligned}", "lora.r=4", "lora.alpha=8",
                                          *finetune_pairs, f"run.output_dir={root / 'finetune'}"]))
    return aligned, tuned
