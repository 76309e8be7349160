"""The bouncing-balls world (physics, rendering, captions) and continuation of a rollout after a true prefix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlaconvert.checkpoints.hub import load_source
from mlaconvert.conversion.convert import ConvertSettings, convert_source
from mlaconvert.errors import MlaconvertError
from mlaconvert.evaluation import world
from mlaconvert.inference.sampling import SamplerSettings, rollout, warp_timesteps
from mlaconvert.modeling.model import load_model


def test_bounces_keep_speed_and_balls_inside():
    settings = world.WorldSettings()
    state = world.new_worlds(64, seed=5, settings=settings)
    speed0 = np.linalg.norm(state.velocity, axis=-1)
    bounced = np.zeros(state.velocity.shape, dtype=bool)
    for _ in range(200):
        nxt = world.advance(state)
        bounced |= np.sign(nxt.velocity) != np.sign(state.velocity)
        state = nxt
        r = state.radius[..., None]
        assert (state.position >= r - 1e-9).all() and (state.position <= settings.size - r + 1e-9).all()
    np.testing.assert_allclose(np.linalg.norm(state.velocity, axis=-1), speed0, rtol=1e-12)
    assert bounced.mean() > 0.5  # the walls were actually hit, on both axes


def test_reflection_is_the_mirror_image():
    state = world.new_worlds(1, seed=0)
    state = world.Balls(np.array([[[3.2, 16.0]]]), np.array([[[-1.0, 0.5]]]), np.array([[3.0]]), np.array([[0]]),
                        np.array([[True]]), state.background, state.size)
    nxt = world.advance(state)
    np.testing.assert_allclose(nxt.position, [[[2 * 3.0 - 2.2, 16.5]]])  # 0.2 past the wall comes back as 0.2 inside
    np.testing.assert_allclose(nxt.velocity, [[[1.0, 0.5]]])


def test_same_seed_same_clip_and_the_continuation_is_the_tail():
    a, caps_a, _ = world.clips(3, 10, seed=7)
    b, caps_b, _ = world.clips(3, 10, seed=7)
    assert torch.equal(a, b) and caps_a == caps_b
    assert not torch.equal(a, world.clips(3, 10, seed=8)[0])
    long, _, _ = world.clips(3, 25, seed=7)
    first, state = world.simulate(world.new_worlds(3, 7), 10)
    rest, _ = world.simulate(state, 15)
    assert torch.equal(torch.cat([first, rest], dim=2), long) and torch.equal(first, a)


def test_render_draws_palette_balls_on_the_background_in_order():
    state = world.new_worlds(1, seed=0)
    pos = np.array([[[10.5, 10.5], [12.5, 10.5]]])
    state = world.Balls(pos, np.zeros_like(pos), np.array([[4.0, 4.0]]), np.array([[0, 2]]), np.array([[True, True]]),
                        np.array([[0.1, 0.2, 0.3]]), 32)
    image = (world.render(state)[0] + 1) / 2  # (3, 32, 32) in [0, 1]
    np.testing.assert_allclose(image[:, 30, 30], [0.1, 0.2, 0.3], atol=1e-6)  # far from both: background
    np.testing.assert_allclose(image[:, 7, 10], world.PALETTE["red"], atol=1e-6)  # only the first ball
    np.testing.assert_allclose(image[:, 12, 10], world.PALETTE["blue"], atol=1e-6)  # overlap: the later ball is on top
    assert 0 < float((image[0, 10, :] - 0.1).abs().max()) and ((image >= 0) & (image <= 1)).all()


def test_captions_and_their_embeddings():
    state = world.new_worlds(8, seed=3)
    caps = world.captions(state)
    for cap, n, colours in zip(caps, state.count, state.colour):
        assert cap.startswith(world.NUMBERS[n] + " ball") and cap.split(": ")[1].split(", ") == [world.COLOURS[c] for c in colours[:n]]
    e = world.embed_captions(["two balls: red, blue", "two balls: blue, red", "two balls: red, blue"], 16, 32)
    assert torch.equal(e[0], e[2]) and not torch.equal(e[0], e[1])  # deterministic, and order matters
    assert (e[0, 4:] == 0).all() and (e[0, :4].abs().sum(-1) > 0).all()  # four words
    with pytest.raises(MlaconvertError, match="at most 2"):
        world.embed_captions(["one ball: red"], 2, 32)


@pytest.fixture(scope="module")
def tiny_mla(tmp_path_factory):
    out = tmp_path_factory.mktemp("prefix") / "mla"
    convert_source("builtin:tiny-wan", out, ConvertSettings(dc=48, rope_dim=16, measure=False))
    return str(out)


def forced_reference(model, text, prefix, noise, settings: SamplerSettings) -> torch.Tensor:
    """No cache: the prefix chunks are fixed, every later chunk reruns the whole past at t = 0 block-causally."""
    sigmas = [t / 1000 for t in warp_timesteps(settings.timesteps, settings.shift)]
    gen = torch.Generator().manual_seed(settings.seed)
    torch.randn(noise.shape, generator=gen)  # the rollout draws its initial noise from the same generator first
    b, c = prefix.shape[:2]
    done = prefix
    for start in range(0, noise.shape[2], settings.chunk):
        n = min(settings.chunk, noise.shape[2] - start)
        x = noise[:, :, start : start + n]
        for i, sigma in enumerate(sigmas):
            seq = torch.cat([done, x], dim=2)
            t = torch.cat([torch.zeros(b, done.shape[2]), torch.full((b, n), sigma * 1000)], dim=1)
            x0 = x - sigma * model(seq, t, text, chunk_frames=settings.chunk)[:, :, -n:]
            if i + 1 < len(sigmas):
                x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * torch.randn(x0.shape, generator=gen)
        done = torch.cat([done, x0], dim=2)
    return done


@pytest.mark.parametrize("kind", ["dense", "mla"])
def test_rollout_after_a_prefix_equals_the_forced_reference(kind, tiny_mla):
    ckpt = load_source("builtin:tiny-wan" if kind == "dense" else tiny_mla)
    model = load_model(ckpt.config, ckpt.state_dict).eval()
    settings = SamplerSettings(chunk=2, window=12, seed=4)
    g = torch.Generator().manual_seed(1)
    prefix, text = torch.randn(2, 4, 4, 4, 6, generator=g), torch.randn(2, 32, 64, generator=g)
    noise = torch.randn(2, 4, 5, 4, 6, generator=torch.Generator().manual_seed(settings.seed))
    with torch.no_grad():
        expected = forced_reference(model, text, prefix, noise, settings)
    got = rollout(model, text, frames=5, latent_size=(4, 6), settings=settings, prefix=prefix).latents
    assert got.shape == (2, 4, 9, 4, 6) and torch.equal(got[:, :, :4], prefix)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_prefix_that_is_not_a_whole_chunk_and_one_that_does_not_fit():
    ckpt = load_source("builtin:tiny-wan")
    model = load_model(ckpt.config, ckpt.state_dict).eval()
    text = torch.randn(1, 32, 64)
    prefix = torch.randn(1, 4, 5, 4, 4)
    got = rollout(model, text, frames=4, latent_size=(4, 4), settings=SamplerSettings(chunk=3, window=9), prefix=prefix)
    assert got.latents.shape == (1, 4, 9, 4, 4) and torch.equal(got.latents[:, :, :5], prefix)
    assert torch.isfinite(got.latents).all() and len(got.chunk_seconds) == 2
    with pytest.raises(MlaconvertError, match="prefix has shape"):
        rollout(model, text, frames=3, latent_size=(4, 6), settings=SamplerSettings(chunk=3, window=9), prefix=prefix)
