"""The KV caches against the one-pass block-causal forward, for dense and latent attention alike."""

from __future__ import annotations

import pytest
import torch

from mlaconvert.checkpoints.hub import load_source
from mlaconvert.conversion.convert import ConvertSettings, convert_model
from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.cache import KVCache
from mlaconvert.modeling.model import WanModel, load_model

FRAMES, CHUNK, H, W = 6, 2, 4, 6


@pytest.fixture(scope="module")
def models() -> dict[str, WanModel]:
    dense = load_source("builtin:tiny-wan")
    mla = convert_model(dense, ConvertSettings(dc=48, rope_dim=16, measure=False))
    return {
        "dense": load_model(dense.config, dense.state_dict).eval(),
        "mla": load_model(mla.config, mla.state_dict).eval(),
    }


def clip(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, FRAMES, H, W, generator=g), torch.randn(2, 32, 64, generator=g)


def stored_widths(cache: KVCache) -> list[int]:
    """Values per token each layer's buffers hold."""
    return [sum(t.shape[-1] for t in layer) for layer in cache.layers]


@pytest.mark.parametrize("window,sink", [(FRAMES, 0), (3, 0), (4, 1)])
@pytest.mark.parametrize("kind", ["dense", "mla"])
def test_chunked_rollout_with_cache_equals_block_causal_forward(models, kind, window, sink):
    """Also once the window slides: a window of 3 frames keeps one frame of the chunk before; with a sink frame,
    frame 0 stays in view while frame 1 leaves."""
    model = models[kind]
    x, text = clip()
    t = torch.tensor([[5.0] * FRAMES, [700.0] * FRAMES])
    with torch.no_grad():
        expected = model(x, t, text, chunk_frames=CHUNK, window=window, sink=sink)
        cache = KVCache(model, batch=2, frame_shape=(H // 2, W // 2), window=window, sink=sink, positions="absolute")
        got = []
        for start in range(0, FRAMES, CHUNK):
            sl = slice(start, start + CHUNK)
            # A denoising step at another timestep first: it must leave no trace in the cache.
            model(torch.randn_like(x[:, :, sl]), torch.full((2, CHUNK), 999.0), text, cache=cache.step(CHUNK, commit=False))
            got.append(model(x[:, :, sl], t[:, sl], text, cache=cache.step(CHUNK, commit=True)))
    torch.testing.assert_close(torch.cat(got, dim=2), expected, atol=2e-5, rtol=1e-5)
    assert stored_widths(cache) == [model.config.kv_values_per_token(i) for i in range(model.config.num_layers)]


@pytest.mark.parametrize("window,sink", [(FRAMES, 0), (3, 0), (4, 1)])
@pytest.mark.parametrize("kind", ["dense", "mla"])
def test_teacher_forcing_equals_noisy_chunks_against_a_cache_of_clean_ones(models, kind, window, sink):
    """The training forward (clean context + noisy chunks in one pass) is the sampler's cached computation,
    with a sliding window too."""
    model = models[kind]
    clean, text = clip(2)
    noisy = torch.randn_like(clean)
    t = torch.tensor([[900.0] * CHUNK + [500.0] * CHUNK + [100.0] * CHUNK] * 2)
    with torch.no_grad():
        expected = model(noisy, t, text, chunk_frames=CHUNK, window=window, sink=sink, clean=clean)
        cache = KVCache(model, batch=2, frame_shape=(H // 2, W // 2), window=window, sink=sink, positions="absolute")
        got = []
        for start in range(0, FRAMES, CHUNK):
            sl = slice(start, start + CHUNK)
            got.append(model(noisy[:, :, sl], t[:, sl], text, cache=cache.step(CHUNK, commit=False)))
            model(clean[:, :, sl], torch.zeros(2, CHUNK), text, cache=cache.step(CHUNK, commit=True))
    torch.testing.assert_close(torch.cat(got, dim=2), expected, atol=2e-5, rtol=1e-5)


def test_latent_cache_stores_dc_plus_rope_values(models):
    dense = KVCache(models["dense"], batch=1, frame_shape=(2, 3), window=4)
    latent = KVCache(models["mla"], batch=1, frame_shape=(2, 3), window=4)
    assert stored_widths(dense) == [2 * 192] * 2
    assert stored_widths(latent) == [48 + 16] * 2
    assert latent.nbytes * 6 == dense.nbytes


def test_ring_buffer_keeps_sink_and_last_frames_with_their_positions(models):
    cache = KVCache(models["dense"], batch=1, frame_shape=(1, 1), window=5, sink=1)
    for _ in range(4):  # 8 frames in chunks of 2
        step = cache.step(2, commit=True)
    assert sorted(cache.slot_frame) == [0, 4, 5, 6, 7]
    assert step.key_positions[:, 0].tolist() == [0, 5, 6, 7, 4]  # slot order: sink, then the ring
    assert step.query_positions[:, 0].tolist() == [6, 7]
    reindexed = KVCache(models["dense"], batch=1, frame_shape=(1, 1), window=5, sink=1, positions="reindex")
    for _ in range(4):
        step = reindexed.step(2, commit=True)
    assert step.key_positions[:, 0].tolist() == [0, 2, 3, 4, 1]
    assert step.query_positions[:, 0].tolist() == [3, 4]


@pytest.mark.parametrize("kind", ["dense", "mla"])
def test_reindexed_positions_equal_absolute_until_the_window_slides(models, kind):
    """Bit for bit, although with absolute positions the dense cache keeps its keys rotated at write and the
    reindexed one rotates them at every read."""
    model = models[kind]
    x, text = clip(1)
    t = torch.full((2, FRAMES), 250.0)
    outs, caches = {}, {}
    with torch.no_grad():
        for mode in ("absolute", "reindex"):
            cache = caches[mode] = KVCache(model, batch=2, frame_shape=(H // 2, W // 2), window=FRAMES, positions=mode)
            outs[mode] = [model(x[:, :, s : s + CHUNK], t[:, :CHUNK], text, cache=cache.step(CHUNK, commit=True)) for s in range(0, FRAMES, CHUNK)]
    for a, b in zip(outs["absolute"], outs["reindex"]):
        assert torch.equal(a, b)
    stored = [[torch.equal(a, b) for a, b in zip(*layers)] for layers in zip(caches["absolute"].layers, caches["reindex"].layers)]
    # Dense: the same values, but the keys (first entry) stored rotated; latent: the same entries either way.
    assert stored == ([[False, True]] if kind == "dense" else [[True, True]]) * model.config.num_layers


def test_cache_rejects_bad_windows(models):
    with pytest.raises(MlaconvertError, match="sink < window"):
        KVCache(models["dense"], batch=1, frame_shape=(2, 2), window=3, sink=3)
    cache = KVCache(models["dense"], batch=1, frame_shape=(2, 2), window=4, sink=2)
    with pytest.raises(MlaconvertError, match="does not fit"):
        cache.step(3, commit=False)


def test_reindexed_positions_stay_inside_the_window_for_any_length(models):
    """An hour of video (14,400 latent frames) with bounded memory and positions Wan was trained on."""
    cache = KVCache(models["mla"], batch=1, frame_shape=(1, 1), window=21, sink=3, positions="reindex")
    nbytes = cache.nbytes
    for _ in range(14_400 // 3):
        step = cache.step(3, commit=True)
    assert cache.frames_committed == 14_400 and cache.nbytes == nbytes
    assert step.key_positions[:, 0].max().item() == 20 and step.query_positions[:, 0].tolist() == [18, 19, 20]
    assert sorted(cache.slot_frame) == [0, 1, 2] + list(range(14_400 - 18, 14_400))


@pytest.mark.parametrize("kind", ["dense", "mla"])
def test_flex_attention_masks_equal_the_boolean_masks(models, kind):
    """The block masks used on the GPU select exactly what the boolean masks do (flex runs eagerly here)."""
    clean, text = clip(4)
    noisy = torch.randn_like(clean)
    t = torch.full((2, FRAMES), 400.0)
    out = {}
    with torch.no_grad():
        for backend in ("sdpa", "flex"):
            model = load_model(models[kind].config, models[kind].state_dict(), attention_backend=backend).eval()
            out[backend] = [model(noisy, t, text, chunk_frames=CHUNK, window=window, sink=sink, clean=c)
                            for window, sink in ((None, 0), (3, 0), (4, 1)) for c in (None, clean)]
    for a, b in zip(out["sdpa"], out["flex"]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


class _TrigCount(torch.overrides.TorchFunctionMode):
    """Counts the cos evaluations a piece of code asks torch for."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func in (torch.cos, torch.Tensor.cos)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["dense", "mla"])
def test_rope_angles_are_made_once_per_forward_not_once_per_layer(models, kind):
    """A compiled block fuses whatever trigonometry it is given into its key kernel, once per head and dim: the
    angles must come from outside the blocks, the same number of times whatever the depth."""
    model = models[kind]
    x, text = clip()
    t = torch.full((2, FRAMES), 500.0)
    with torch.no_grad():
        with _TrigCount() as plain:
            model(x, t, text, chunk_frames=CHUNK)
        cache = KVCache(model, batch=2, frame_shape=(H // 2, W // 2), window=4)
        with _TrigCount() as stepping:
            step = cache.step(CHUNK, commit=True)
        with _TrigCount() as cached:
            model(x[:, :, :CHUNK], t[:, :CHUNK], text, cache=step)
    assert model.config.num_layers > 1
    # Beside the timestep embedding's one: the queries' angles without a cache; keys' and queries' with one,
    # made by the step, so that a forward against the cache (what a CUDA graph replays) makes none.
    timestep_embedding = 1
    assert (plain.calls, stepping.calls, cached.calls) == (timestep_embedding + 1, 2, timestep_embedding)
