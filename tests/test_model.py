"""The dense model against the independent reference, diffusers' WanTransformer3DModel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlaconvert.checkpoints.formats import diffusers_to_native
from mlaconvert.modeling.config import WanConfig
from mlaconvert.modeling.layers import sinusoid
from mlaconvert.modeling.model import load_model

diffusers = pytest.importorskip("diffusers")

# (heads, head_dim, frames, height, width): an odd one with 3 heads of 24 and non-square frames among them.
SHAPES = [(3, 24, 2, 6, 10), (2, 64, 3, 4, 4), (4, 32, 4, 8, 6)]


def twin_models(heads: int, head_dim: int, seed: int = 0):
    """A diffusers model with perturbed (non-default) weights and our model loaded from its state dict."""
    torch.manual_seed(seed)
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=64, ffn_dim=96, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = WanConfig(
        dim=heads * head_dim, ffn_dim=96, num_heads=heads, num_layers=2, in_dim=4, out_dim=4, text_dim=32,
        text_len=16, freq_dim=64,
    )
    ours = load_model(config, diffusers_to_native(ref.state_dict())).eval()
    return ref, ours


def inputs(frames: int, height: int, width: int, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, frames, height, width, generator=g), torch.randn(batch, 16, 32, generator=g)


@pytest.mark.parametrize("heads,head_dim,frames,height,width", SHAPES)
def test_full_attention_matches_diffusers(heads, head_dim, frames, height, width):
    ref, ours = twin_models(heads, head_dim)
    x, text = inputs(frames, height, width)
    # Small timesteps: diffusers builds the sinusoid in float32, Wan (and we) in float64; they agree to ~1e-7 here.
    t = torch.tensor([0.0, 3.0])
    with torch.no_grad():
        expected = ref(x, t, text, return_dict=False)[0]
        got = ours(x, t, text)
    assert got.shape == expected.shape == x.shape
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("heads,head_dim,frames,height,width", SHAPES[:2])
def test_per_frame_timestep_matches_diffusers_per_token(heads, head_dim, frames, height, width):
    ref, ours = twin_models(heads, head_dim)
    x, text = inputs(frames, height, width)
    t_frames = torch.arange(2 * frames, dtype=torch.float32).reshape(2, frames) % 5
    t_tokens = t_frames.repeat_interleave(height * width // 4, dim=1)
    with torch.no_grad():
        expected = ref(x, t_tokens, text, return_dict=False)[0]
        got = ours(x, t_frames, text)
    assert (got - expected).abs().max().item() <= 1e-5


def test_large_timesteps_agree_to_float32_sinusoid_precision():
    ref, ours = twin_models(3, 24)
    x, text = inputs(2, 6, 10)
    t = torch.tensor([999.0, 937.5])
    with torch.no_grad():
        expected = ref(x, t, text, return_dict=False)[0]
        got = ours(x, t, text)
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 2e-5


def test_sinusoid_is_wans_float64_definition():
    t = torch.tensor([0.0, 1.0, 250.0, 937.5, 1000.0])
    half = 32
    angles = np.outer(t.numpy().astype(np.float64), np.power(10000.0, -np.arange(half) / half))
    expected = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    np.testing.assert_allclose(sinusoid(t, 64).numpy(), expected, atol=1e-7)


def test_block_causal_matches_diffusers_with_the_same_mask():
    """Diffusers' own attention processor, handed a block-causal mask, is the reference for our chunked mode."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class MaskedSelfAttention(WanAttnProcessor):
        def __init__(self, mask):
            super().__init__()
            self.mask = mask

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            return super().__call__(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)

    ref, ours = twin_models(2, 64)
    x, text = inputs(6, 4, 6)
    chunk = torch.arange(6).repeat_interleave(2 * 3) // 2  # frame index per token (2x3 patches a frame), 2 frames a chunk
    mask = chunk[None, :] <= chunk[:, None]
    for block in ref.blocks:
        block.attn1.set_processor(MaskedSelfAttention(mask))
    t = torch.tensor([2.0, 1.0])
    with torch.no_grad():
        expected = ref(x, t, text, return_dict=False)[0]
        got = ours(x, t, text, chunk_frames=2)
        bidirectional = ours(x, t, text)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (bidirectional - expected).abs().max().item() > 1e-3  # the mask matters


@pytest.mark.parametrize("window,sink", [(None, 0), (4, 0), (4, 1)])
@pytest.mark.parametrize("teacher_forcing", [False, True])
def test_chunk_spans_attend_exactly_as_the_boolean_mask(teacher_forcing, window, sink):
    """Per-chunk unmasked SDPA against one SDPA with the mask written out in numpy (last chunk partial; a window
    of 4 frames cuts part of a chunk off; a sink frame stays in view)."""
    from mlaconvert.modeling.masks import ChunkSpans, span_attention

    frame = np.arange(8)  # one token a frame, chunks of 3 frames
    chunk = frame // 3
    first = np.maximum(0, np.minimum((chunk + 1) * 3, 8) - ((window or 8) - sink))
    n = frame.size
    c, f, lo = (np.concatenate([x] * (2 if teacher_forcing else 1)) for x in (chunk, frame, first))
    noisy = np.arange(c.size) >= n
    if teacher_forcing:  # clean: block-causal among the clean; noisy: earlier clean chunks and its own noisy chunk
        mask = np.where(noisy[:, None], (~noisy[None] & (c[None] < c[:, None])) | (noisy[None] & (c[None] == c[:, None])),
                        ~noisy[None] & (c[None] <= c[:, None]))
    else:
        mask = c[None] <= c[:, None]
    mask &= (f[None] >= lo[:, None]) | (f[None] < sink)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, c.size, 8, generator=g) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.from_numpy(mask))
    starts = {None: (0, 0, 0), 0: (0, 2, 4), 1: (0, 3, 5)}[sink if window else None]
    got = span_attention(q, k, v, ChunkSpans((0, 3, 6, 8), teacher_forcing, starts, sink))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_block_causal_output_ignores_future_frames():
    _, ours = twin_models(3, 24)
    x, text = inputs(4, 6, 10)
    t = torch.tensor([3.0, 3.0])
    x2 = x.clone()
    x2[:, :, 2:] = torch.randn_like(x2[:, :, 2:])
    with torch.no_grad():
        a = ours(x, t, text, chunk_frames=2)
        b = ours(x2, t, text, chunk_frames=2)
    assert torch.equal(a[:, :, :2], b[:, :, :2])
    assert not torch.allclose(a[:, :, 2:], b[:, :, 2:])


def test_patch_size_must_divide_the_latents():
    from mlaconvert.errors import MlaconvertError

    _, ours = twin_models(2, 64)
    x, text = inputs(2, 5, 4)
    with pytest.raises(MlaconvertError, match="not divisible by the patch size"):
        ours(x, torch.tensor([1.0, 1.0]), text)
