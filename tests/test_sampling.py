"""The streaming sampler: schedule, a cache-free reference rollout, reproducibility, the CLI and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mlaconvert.checkpoints.builtin import TINY_WAN
from mlaconvert.checkpoints.hub import load_source
from mlaconvert.conversion.convert import ConvertSettings, convert_source
from mlaconvert.errors import MlaconvertError
from mlaconvert.inference.sampling import (
    SamplerSettings,
    check_video_size,
    denoising_timesteps,
    latent_frames_for,
    rollout,
    warp_timesteps,
)
from mlaconvert.modeling.config import SamplerDefaults
from mlaconvert.modeling.model import load_model


@pytest.fixture(scope="module")
def mla_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("mla") / "tiny-mla"
    convert_source("builtin:tiny-wan", out, ConvertSettings(dc=48, rope_dim=16, measure=False))
    return out


def tiny_model(spec: str):
    ckpt = load_source(spec)
    return load_model(ckpt.config, ckpt.state_dict).eval()


def test_schedule_and_durations():
    assert warp_timesteps((1000, 750, 500, 250), 5.0) == pytest.approx([1000.0, 937.5, 833.3333333, 625.0])
    assert latent_frames_for(60) == 240 and latent_frames_for(5) == 20
    assert check_video_size(480, 832, TINY_WAN) == (60, 104)
    with pytest.raises(MlaconvertError, match="multiples of 16"):
        check_video_size(480, 830, TINY_WAN)
    # A model on pixels (stride 1) needs only the patch to divide the size.
    assert check_video_size(64, 48, TINY_WAN.replace(vae_stride=(1, 1, 1))) == (64, 48)


def test_steps_count_denoising_steps_and_default_to_the_models_own():
    assert denoising_timesteps(4) == (1000.0, 750.0, 500.0, 250.0) and denoising_timesteps(1) == (1000.0,)
    assert SamplerSettings.for_model(TINY_WAN).timesteps == (1000.0, 750.0, 500.0, 250.0)
    own = TINY_WAN.replace(sampler=SamplerDefaults(steps=2, shift=1.0, chunk=2, window=6, sink=2, positions="reindex"))
    s = SamplerSettings.for_model(own)
    assert (s.timesteps, s.shift, s.chunk, s.window, s.sink, s.positions) == ((1000.0, 500.0), 1.0, 2, 6, 2, "reindex")
    told = SamplerSettings.for_model(own, sink=0, positions="absolute")
    assert (told.sink, told.positions) == (0, "absolute")
    assert SamplerSettings.for_model(own, steps=5, chunk=3).timesteps == (1000.0, 800.0, 600.0, 400.0, 200.0)
    assert SamplerSettings.for_model(own, timesteps=[500]).timesteps == (500.0,)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(steps=2, timesteps=[1000, 500]), "--steps and --timesteps"),
        (dict(steps=0), "--steps must be at least 1"),
        (dict(timesteps=[500, 1000]), "descending"),
        (dict(timesteps=[1000, 0]), "descending values in"),
        (dict(shift=0.0), "--shift must be positive"),
    ],
)
def test_bad_sampler_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(MlaconvertError, match=message):
        SamplerSettings.for_model(TINY_WAN, **kwargs)


def test_sample_cli_steps_is_the_number_of_denoising_steps(cli, tmp_path):
    base = ["sample", "builtin:tiny-wan", "--random-text", "--frames", "3", "--height", "32", "--width", "32", "--window", "3",
            "--device", "cpu"]
    r = cli(*base, "--steps", "2", "-o", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    settings = json.loads((tmp_path / "a" / "run.json").read_text())["settings"]
    assert settings["timesteps"] == [1000.0, 500.0] and settings["shift"] == 5.0
    r = cli(*base, "--timesteps", "900", "--shift", "1", "-o", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    settings = json.loads((tmp_path / "b" / "run.json").read_text())["settings"]
    assert settings["timesteps"] == [900.0] and settings["warped_timesteps"] == [900.0]
    r = cli(*base, "--steps", "2", "--timesteps", "1000,500", "-o", str(tmp_path / "c"))
    assert r.returncode == 1 and "--steps and --timesteps" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_sample_compiles_the_blocks_it_loads_when_asked(cli, tmp_path, monkeypatch):
    from mlaconvert.modeling.model import WanModel

    compiled = []
    monkeypatch.setattr(WanModel, "compile_blocks", lambda self: compiled.append(self.config.num_layers))
    base = ["builtin:tiny-wan", "--height", "32", "--width", "32", "--window", "3", "--device", "cpu"]
    r = cli("sample", *base, "--random-text", "--frames", "3", "-o", str(tmp_path / "a"))
    assert r.returncode == 0 and compiled == []
    r = cli("sample", *base, "--random-text", "--frames", "3", "--compile", "-o", str(tmp_path / "b"))
    assert r.returncode == 0 and len(compiled) == 1
    assert json.loads((tmp_path / "b" / "run.json").read_text())["settings"]["compile"] is True


def reference_rollout(model, text, noise, settings: SamplerSettings):
    """Self-Forcing's loop without any cache: every step reruns the clean past at t = 0 block-causally."""
    sigmas = [t / 1000 for t in warp_timesteps(settings.timesteps, settings.shift)]
    gen = torch.Generator().manual_seed(settings.seed)  # the re-noising draws, in the sampler's order
    b, frames = noise.shape[0], noise.shape[2]
    done = []
    for start in range(0, frames, settings.chunk):
        n = min(settings.chunk, frames - start)
        x = noise[:, :, start : start + n]
        past = torch.cat(done, dim=2) if done else noise[:, :, :0]
        for i, sigma in enumerate(sigmas):
            seq = torch.cat([past, x], dim=2)
            t = torch.cat([torch.zeros(b, past.shape[2]), torch.full((b, n), sigma * 1000)], dim=1)
            flow = model(seq, t, text, chunk_frames=settings.chunk)[:, :, -n:]
            x0 = x - sigma * flow
            if i + 1 < len(sigmas):
                x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * torch.randn(x0.shape, generator=gen)
        done.append(x0)
    return torch.cat(done, dim=2)


@pytest.mark.parametrize("kind", ["dense", "mla"])
def test_rollout_equals_the_cache_free_reference(kind, mla_export):
    model = tiny_model("builtin:tiny-wan" if kind == "dense" else str(mla_export))
    settings = SamplerSettings(chunk=2, window=8, seed=3)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 4, 7, 4, 6, generator=g)  # 7 frames: the last chunk is shorter
    text = torch.randn(2, 32, 64)
    with torch.no_grad():
        expected = reference_rollout(model, text, noise, settings)
    got = rollout(model, text, frames=7, latent_size=(4, 6), settings=settings, noise=noise)
    torch.testing.assert_close(got.latents, expected, atol=1e-4, rtol=1e-4)
    assert len(got.chunk_seconds) == 4


def test_seeded_rollout_is_bit_reproducible(mla_export):
    model = tiny_model(str(mla_export))
    text = torch.randn(1, 32, 64)
    settings = SamplerSettings(chunk=3, window=6, sink=1, seed=11)
    a = rollout(model, text, frames=12, latent_size=(4, 4), settings=settings).latents
    b = rollout(model, text, frames=12, latent_size=(4, 4), settings=settings).latents
    assert torch.equal(a, b)
    c = rollout(model, text, frames=12, latent_size=(4, 4), settings=SamplerSettings(chunk=3, window=6, sink=1, seed=12)).latents
    assert not torch.equal(a, c)



@pytest.mark.parametrize("kind", ["dense", "mla"])
def test_sample_cli_writes_latents_and_report(cli, tmp_path, kind, mla_export):
    model = "builtin:tiny-wan" if kind == "dense" else str(mla_export)
    out = tmp_path / "s"
    r = cli("sample", model, "--random-text", "--batch", "2", "--frames", "6", "--height", "64", "--width", "48",
                "--window", "6", "--device", "cpu", "-o", str(out))
    assert r.returncode == 0, r.stderr
    latents = load_file(str(out / "latents.safetensors"))["latents"]
    assert latents.shape == (2, 4, 6, 8, 6) and torch.isfinite(latents).all()
    report = json.loads((out / "run.json").read_text())
    assert report["attention"] == kind and report["latent_frames"] == 6 and len(report["chunk_seconds"]) == 2
    assert report["cached_values_per_token"] == ([384, 384] if kind == "dense" else [64, 64])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--height", "60"], "multiples of 16"),
        (["--window", "2"], "at least --chunk"),
        (["--sink", "20"], "must fit in --window"),
        (["--device", "cuda"], "no CUDA device"),
        ([], "exactly one of --prompt"),
        (["--seconds", "0"], "--frames and --seconds both"),
    ],
)
def test_sample_bad_input_gives_one_line(cli, tmp_path, args, message):
    base = ["sample", "builtin:tiny-wan", "-o", str(tmp_path / "s"), "--frames", "3"]
    if args != []:
        base.append("--random-text")
    if "--device" not in args:
        base += ["--device", "cpu"]
    r = cli(*base, *args)
    if torch.cuda.is_available() and "--device" in args:
        pytest.skip("this machine has CUDA")
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_sample_streams_through_a_vae_into_an_mp4(cli, tmp_path):
    """The sampler's VAE path: a tiny Wan VAE (4 latent channels, like the builtin) decodes chunk by chunk."""
    diffusers = pytest.importorskip("diffusers")
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, latents_mean=[0.1] * 4, latents_std=[1.5] * 4
    )
    vae.save_pretrained(tmp_path / "repo" / "vae")
    out = tmp_path / "s"
    r = cli("sample", "builtin:tiny-wan", "--random-text", "--frames", "6", "--height", "64", "--width", "48",
            "--window", "6", "--device", "cpu", "--vae", str(tmp_path / "repo"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    reader = imageio_ffmpeg.read_frames(str(out / "video.mp4"))
    meta = next(reader)
    assert tuple(meta["size"]) == (48, 64)
    assert sum(1 for _ in reader) == 1 + 4 * 5  # the first latent frame decodes to one video frame, the rest to four


def test_seconds_must_be_positive(cli, tmp_path):
    r = cli("sample", "builtin:tiny-wan", "--random-text", "--seconds", "0", "--device", "cpu", "-o", str(tmp_path / "s"))
    assert r.returncode == 1 and "--seconds must be positive" in r.stderr and not (tmp_path / "s").exists()


def test_compiled_blocks_share_their_compiled_code_whatever_the_depth(monkeypatch):
    """Every block runs Block.forward, whose compiled forms must not grow with the layers: a guard on the layer's
    index once made one per layer, and past torch's limit the blocks ran uncompiled, unseen."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from mlaconvert.checkpoints.builtin import TINY_WAN
    from mlaconvert.inference.bench import random_model
    from mlaconvert.modeling.model import Block

    compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **options: compile(self, backend="eager", **options))
    settings = SamplerSettings(chunk=2, window=4, timesteps=(1000.0,))
    entries = []
    for layers in (2, 4):  # the first block takes a strided input, the others a contiguous one: two forms each
        torch._dynamo.reset()
        model = random_model(TINY_WAN.replace(num_layers=layers), torch.device("cpu"), torch.float32, 0)
        model.compile_blocks()
        rollout(model, torch.randn(1, TINY_WAN.text_len, TINY_WAN.text_dim), frames=2, latent_size=(4, 6), settings=settings)
        entries.append(len(_debug_get_cache_entry_list(Block.forward.__code__)))
    assert entries[0] == entries[1] > 0
