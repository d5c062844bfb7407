"""The scaling study: the power-law fit recovers a known law, each axis is fitted only where it has 3 points, and a
2 x 2 grid of real pretrain-clip runs goes end to end (JSON with every run, a PNG plot)."""

import json

import numpy as np
import pytest

from voxlm.training.scaling import fit_axes, fit_power_law, power_law


@pytest.mark.parametrize("a, b, c", [(5.0, 0.7, 1.2), (40.0, 0.3, 0.05), (2.0, 1.5, 3.0)])
def test_fit_recovers_a_known_power_law(a, b, c):
    sizes = np.array([10, 30, 100, 300, 1000, 3000, 10000], dtype=float)
    fit = fit_power_law(sizes, power_law(sizes, a, b, c))
    assert fit["a"] == pytest.approx(a, rel=1e-3) and fit["b"] == pytest.approx(b, rel=1e-3)
    assert fit["c"] == pytest.approx(c, rel=1e-3, abs=1e-4)


def test_fit_tolerates_noise_and_refuses_too_few_points():
    rng = np.random.default_rng(0)
    sizes = np.geomspace(20, 20000, 12)
    losses = power_law(sizes, 8.0, 0.5, 2.0) * (1 + 0.005 * rng.standard_normal(sizes.shape))
    fit = fit_power_law(sizes, losses)
    assert fit["b"] == pytest.approx(0.5, abs=0.05) and fit["c"] == pytest.approx(2.0, abs=0.05)
    with pytest.raises(ValueError, match="at least 3 distinct sizes"):
        fit_power_law([10, 20], [1.0, 0.8])


def test_grid_fits_each_axis_with_enough_points():
    law = {64: (6.0, 0.5, 1.0), 128: (5.0, 0.6, 0.8)}
    runs = [dict(data_size=n, width=w, vision_parameters=1000 * w, eval_loss=float(power_law(n, *law[w])))
            for n in (25, 50, 100, 200) for w in law]
    fits = fit_axes(runs)
    for width, (a, b, c) in law.items():
        assert fits["data"][str(width)]["b"] == pytest.approx(b, rel=1e-3)
    assert all("skipped" in fit for fit in fits["parameters"].values())  # 2 widths: nothing to fit a, b, c to


def test_two_by_two_grid_end_to_end(tmp_path, tiny_text_encoder_dir):
    from voxlm.training import train_clip
    from voxlm.training.settings import load_settings
    from voxlm.training.scaling import ScalingSettings, run_scaling

    clip = load_settings(train_clip.ClipSettings, None, {
        "model.vision_config": "{image_size: [8,16,16], patch_size: [2,4,4], num_hidden_layers: 1}",
        "model.projection_dim": "16",
        "pretrained.text": str(tiny_text_encoder_dir),
        "data.shuffle_buffer": "0",
        "run.max_steps": "2", "run.batch_size": "4", "run.tracker": "null",
    })
    settings = ScalingSettings(clip=clip, data_sizes=[4, 8], widths=[16, 32], head_dim=16, eval_batches=1,
                               phantoms=16, phantom_shape=[8, 16, 16], output_dir=str(tmp_path))
    result = run_scaling(settings)
    saved = json.loads((tmp_path / "scaling.json").read_text())
    assert saved["runs"] == result["runs"] and len(saved["runs"]) == 4
    assert {(run["data_size"], run["width"]) for run in saved["runs"]} == {(4, 16), (4, 32), (8, 16), (8, 32)}
    assert all(np.isfinite(run["eval_loss"]) for run in saved["runs"])
    by_width = {run["width"]: run["vision_parameters"] for run in saved["runs"]}
    assert by_width[32] > by_width[16]
    for run in saved["runs"]:  # each run trained on its own data size, in its own folder
        history = (tmp_path / "runs" / f"n{run['data_size']}-w{run['width']}" / "pretrain-clip_history.jsonl")
        assert len(history.read_text().splitlines()) == 2
    assert "3 distinct sizes" in saved["fits"]["data"]["16"]["skipped"]  # a 2 x 2 grid cannot fit 3 parameters
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_data_size_larger_than_the_split_is_refused(tmp_path):
    from voxlm.training.scaling import ScalingSettings, prepare_data

    settings = ScalingSettings(data_sizes=[4, 1000], phantoms=8, phantom_shape=[8, 16, 16], output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="`data_sizes` goes up to 1000"):
        prepare_data(settings)


def test_scaling_is_a_train_command():
    from voxlm.cli import build_parser
    from voxlm.training import scaling

    args = build_parser().parse_args(["train", "scaling", "--data-sizes", "4", "8", "16", "--widths", "32", "64",
                                      "--phantoms", "40", "run.max_steps=3"])
    assert args.func is scaling.run_from_args
    assert args.data_sizes == [4, 8, 16] and args.widths == [32, 64] and args.overrides == ["run.max_steps=3"]
