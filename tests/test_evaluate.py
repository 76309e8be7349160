"""eval: PSNR per horizon bucket against the truth and two baselines, world health, and the job end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mlaconvert.checkpoints.builtin import make_tiny_wan
from mlaconvert.checkpoints.formats import save_native
from mlaconvert.errors import MlaconvertError
from mlaconvert.evaluation import health, world
from mlaconvert.evaluation.agreement import MIN_MSE
from mlaconvert.evaluation.evaluate import (
    EvalSettings, buckets, copy_last, frame_sse, psnr_db, psnr_report, run_eval, static_background,
)
from mlaconvert.inference.sampling import SamplerSettings
from mlaconvert.modeling.config import SamplerDefaults, WanConfig

WORLD = world.WorldSettings(size=16, max_radius=3.0)


def numpy_psnr(mse: float) -> float:
    return 10 * np.log10(4 / max(mse, MIN_MSE))


def test_identical_clips_give_the_floored_psnr_and_a_constant_offset_the_exact_one():
    truth = torch.rand(3, 3, 10, 4, 4) - 0.5
    report = psnr_report({"model": frame_sse(truth, truth)}, 3 * 3 * 4 * 4, 2, [(2, 5), (5, 10)])
    assert [h["psnr_db"] for h in report["horizons"]] == [numpy_psnr(0.0)] * 2
    d = 0.125
    report = psnr_report({"model": frame_sse(truth + d, truth)}, 3 * 3 * 4 * 4, 2, [(2, 5), (5, 10)])
    for h in report["horizons"]:
        assert h["psnr_db"] == pytest.approx(10 * math.log10(4 / d**2), abs=1e-9)
    assert report["per_frame"]["psnr_db"] == pytest.approx([10 * math.log10(4 / d**2)] * 8, abs=1e-9)


def test_a_bucket_pools_the_squared_error_of_all_its_clips_and_frames():
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(4, 3, 12, 5, 5, generator=g) * 2 - 1
    scale = torch.linspace(0.01, 1.0, 12)[None, None, :, None, None]  # error grows along the clip
    pred = truth + scale * torch.randn(truth.shape, generator=g)
    spans = [(3, 7), (7, 12)]
    report = psnr_report({"model": frame_sse(pred, truth)}, 3 * 5 * 5 * 4, 3, spans)
    t, p = truth.numpy().astype(np.float64), pred.numpy().astype(np.float64)
    for h, (a, b) in zip(report["horizons"], spans):
        pooled = numpy_psnr(np.mean((p[:, :, a:b] - t[:, :, a:b]) ** 2))
        per_frame = np.mean([numpy_psnr(np.mean((p[:, :, f] - t[:, :, f]) ** 2)) for f in range(a, b)])
        assert h["psnr_db"] == pytest.approx(pooled, abs=1e-9)
        assert abs(pooled - per_frame) > 0.05  # the two definitions differ here, so the test tells them apart
    psnr_frames = [numpy_psnr(np.mean((p[:, :, f] - t[:, :, f]) ** 2)) for f in range(3, 12)]
    assert report["per_frame"]["psnr_db"] == pytest.approx(psnr_frames, abs=1e-9)
    assert psnr_db(0.04) == pytest.approx(numpy_psnr(0.04))


def test_copy_last_and_background_baselines_match_numpy():
    truth = torch.rand(2, 3, 9, 4, 5) * 2 - 1
    prefix = 4  # even: numpy's median is the mean of the middle two values
    t = truth.numpy()
    last = copy_last(truth, prefix).numpy()
    np.testing.assert_array_equal(last[:, :, :prefix], t[:, :, :prefix])
    np.testing.assert_array_equal(last[:, :, prefix:], np.repeat(t[:, :, prefix - 1 : prefix], 5, axis=2))
    background = static_background(truth, prefix).numpy()
    np.testing.assert_array_equal(background[:, :, :prefix], t[:, :, :prefix])
    expected = np.sort(t[:, :, :prefix], axis=2)[:, :, 1:3].mean(axis=2, keepdims=True)
    np.testing.assert_allclose(background[:, :, prefix:], np.repeat(expected, 5, axis=2), atol=1e-7)


def test_buckets_default_clipped_and_checked():
    assert buckets(3, 243) == [(3, 21), (21, 60), (60, 120), (120, 243)]
    assert buckets(3, 30) == [(3, 21), (21, 30)]
    assert buckets(3, 12) == [(3, 12)]
    assert buckets(6, 70, (10, 70)) == [(6, 10), (10, 70)]
    for edges in [(3, 10), (10, 8), (10, 80), (10, 10, 20)]:
        with pytest.raises(MlaconvertError, match="bucket edges"):
            buckets(3, 70, edges)


def _separated(state: world.Balls) -> np.ndarray:
    """(B,) whether every pair of present balls is more than a pixel apart, rim to rim."""
    gap = np.linalg.norm(state.position[:, :, None] - state.position[:, None, :], axis=-1)
    gap = gap - state.radius[:, :, None] - state.radius[:, None, :]
    pair = state.present[:, :, None] & state.present[:, None, :] & ~np.eye(state.present.shape[1], dtype=bool)
    return ~(pair & (gap <= 1.0)).any(axis=(1, 2))


def test_ball_detection_recovers_the_truth_where_balls_are_apart():
    settings = world.WorldSettings()
    start = world.new_worlds(48, seed=3, settings=settings)
    state, frames, apart = start, [], []
    for _ in range(40):
        frames.append(world.render(state))
        apart.append(_separated(state))
        state = world.advance(state)
    video, apart = torch.stack(frames, dim=2), np.stack(apart, axis=1)
    det = health.detect_balls(video, health.background_colour(video[:, :, :3]), health.min_area(settings))
    right = det.count == start.count[:, None]
    assert apart.mean() > 0.5 and right[apart].mean() >= 0.95
    assert det.colour_error[apart].sum() / det.count[apart].sum() < 0.02  # RGB units: the palette colours exactly
    speed = health.speeds(det, health.caption_colours(start))
    truth_speed = health.true_speeds(start, health.caption_colours(start))[:, None, :]
    error = np.abs(speed - truth_speed)[np.isfinite(speed)]
    assert np.median(error) < 0.25 and np.median(truth_speed[np.isfinite(truth_speed)]) > 0.5


def test_health_sees_a_ball_that_vanished():
    start = world.new_worlds(16, seed=1, settings=WORLD)
    video, _ = world.simulate(start, 12)
    fewer = world.Balls(start.position, start.velocity, start.radius, start.colour,
                        start.present & (np.arange(start.present.shape[1]) < start.count[:, None] - 1), start.background, start.size)
    gone, _ = world.simulate(fewer, 12)
    video = torch.cat([video[:, :, :3], gone[:, :, 3:]], dim=2)  # the last ball vanishes after the prefix
    det = health.detect_balls(video, health.background_colour(video[:, :, :3]), health.min_area(WORLD))
    report = health.health(det, start, 3, [(3, 12)])
    assert report["horizons"][0]["count_kept"] == 0.0 and len(report["per_frame"]["count_kept"]) == 9
    assert report["horizons"][0]["balls"] < start.count.mean()


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    config = WanConfig(dim=48, ffn_dim=96, num_heads=2, num_layers=2, in_dim=3, out_dim=3, text_dim=32, text_len=16,
                       freq_dim=16, vae_stride=(1, 1, 1), text_encoder="captions", world=WORLD,
                       sampler=SamplerDefaults(steps=2, shift=1.0, chunk=3, window=9))
    folder = tmp_path_factory.mktemp("world") / "model"
    save_native(config, make_tiny_wan(0, config), folder)
    return str(folder)


SMALL = EvalSettings(clips=3, frames=6, batch=2, edges=(5, 9), agreement_clips=2)


def test_run_eval_on_a_world_model_writes_the_report_and_refuses_to_overwrite(world_model, tmp_path):
    out = tmp_path / "eval"
    report = run_eval(world_model, out, settings=SMALL, device="cpu")
    saved = json.loads((out / "eval.json").read_text())
    assert saved["schema"] == "mlaconvert.eval/1" and saved["model"] == world_model and saved["prefix_frames"] == 3
    assert [h["frames"] for h in saved["horizons"]] == [[3, 5], [5, 9]]
    assert {"psnr_db", "baseline_psnr_db", "background_psnr_db"} <= set(saved["horizons"][0]) and "teacher_psnr_db" not in saved["horizons"][0]
    assert saved["truth"]["kind"] == "world" and saved["truth"]["seed"] == 0 and len(saved["truth"]["captions"]) == 3
    assert saved["noise_seeds"] == [0, 1] and saved["agreement"] is None and set(saved["health"]) == {"truth", "model"}
    assert all(len(v) == 6 for v in saved["per_frame"].values())
    assert len(saved["health"]["model"]["per_frame"]["count_kept"]) == 6
    assert saved["health"]["truth"]["horizons"][0]["colour_error"] < 0.05  # truth is on the palette
    assert report["horizons"] == saved["horizons"]
    for name in ("eval.png", "strip.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(MlaconvertError, match="already exists"):
        run_eval(world_model, out, settings=SMALL, device="cpu")


def test_eval_compiles_the_model_and_its_teacher_when_asked(world_model, tmp_path, monkeypatch):
    from mlaconvert.modeling.model import WanModel

    compiled = []
    monkeypatch.setattr(WanModel, "compile_blocks", lambda self: compiled.append(self))
    sampler = SamplerSettings(chunk=3, window=9, timesteps=(1000.0, 500.0), shift=1.0, compile=True)
    run_eval(world_model, tmp_path / "eval", teacher=world_model, settings=SMALL, sampler=sampler, device="cpu")
    assert len(compiled) == 2 and compiled[0] is not compiled[1]


def test_a_teacher_with_the_same_weights_matches_the_model_figure_for_figure(world_model, tmp_path):
    report = run_eval(world_model, tmp_path / "eval", teacher=world_model, settings=SMALL, device="cpu")
    for h in report["horizons"]:
        assert h["teacher_psnr_db"] == h["psnr_db"] < numpy_psnr(0.0)
    assert report["per_frame"]["teacher_psnr_db"] == report["per_frame"]["psnr_db"]
    assert report["health"]["teacher"] == report["health"]["model"]
    assert report["agreement"]["clips"] == 2 and max(report["agreement"]["flow_relative_error"]) == 0.0


def test_eval_on_a_data_folder_and_the_inputs_it_refuses(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"latents": torch.randn(2, 4, 7, 4, 4, generator=g), "prompt_embeds": torch.randn(2, 32, 64, generator=g)},
              str(data / "a.safetensors"))
    report = run_eval("builtin:tiny-wan", tmp_path / "eval", data=data, settings=EvalSettings(frames=240), device="cpu")
    assert report["frames"] == 4 and [h["frames"] for h in report["horizons"]] == [[3, 7]]  # clipped to the data
    assert report["health"] is None and report["truth"]["kind"] == "data" and report["truth"]["clips"] == 2
    assert (tmp_path / "eval" / "strip.png").is_file()
    with pytest.raises(MlaconvertError, match="no world"):
        run_eval("builtin:tiny-wan", tmp_path / "e2", device="cpu")
    with pytest.raises(MlaconvertError, match="7 frames"):
        run_eval("builtin:tiny-wan", tmp_path / "e3", data=data, settings=EvalSettings(prefix=7), device="cpu")
    with pytest.raises(MlaconvertError, match="bucket edges"):
        run_eval("builtin:tiny-wan", tmp_path / "e4", data=data, settings=EvalSettings(edges=(5, 9)), device="cpu")
