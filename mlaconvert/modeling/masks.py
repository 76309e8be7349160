"""Who sees whom in a chunked forward: the block-causal and teacher-forcing masks, and attention under them.

A forward over a whole clip in chunks (training, calibration, a teacher's rollout without a cache) must compute what a
cached rollout computes chunk by chunk. chunked_inputs builds the inputs and the mask of such a forward; attention
runs one layer's attention under it, with flex attention's block mask or with one SDPA call per chunk (ChunkSpans).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from mlaconvert.errors import MlaconvertError

# Masked (block-causal, teacher-forcing) attention: "flex" skips the blocks nobody may see with a block-sparse
# kernel; "sdpa" runs plain unmasked SDPA once per chunk over the contiguous keys it may see (ChunkSpans); neither
# holds an L x L mask in memory. "auto" uses flex on CUDA.
AttentionBackend = Literal["auto", "flex", "sdpa"]


def chunked_inputs(
    latents: torch.Tensor,
    t: torch.Tensor,
    positions: torch.Tensor,
    grid: tuple[int, int, int],
    first_frame: int,
    chunk_frames: int,
    window: int | None,
    sink: int,
    clean: torch.Tensor | None,
    backend: AttentionBackend,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Mask]:
    """The (latents, t, positions, mask) of a block-causal forward in chunks of `chunk_frames` latent frames.

    t is per latent frame (B, F), positions per token. With `clean` (teacher forcing) the clean clip is put before
    the noisy one at t = 0 with the same positions, since both stand for the same frames; the mask then lets each
    noisy chunk see the clean chunks before it and itself (see chunk_mask). A window (with `sink` frames) limits
    what each chunk sees as the sampler's cache does.
    """
    if window is not None and window - sink < chunk_frames:
        raise MlaconvertError(f"a window of {window} frames with {sink} sink frames cannot hold a chunk of {chunk_frames}")
    frames = grid[0]
    frame = positions[:, 0] - first_frame
    teacher_forcing = clean is not None
    if teacher_forcing:
        latents = torch.cat([clean.to(latents.dtype), latents], dim=2)
        t = torch.cat([torch.zeros_like(t), t], dim=1)
        positions = torch.cat([positions, positions])
    if backend == "auto":
        backend = "flex" if latents.is_cuda else "sdpa"
    if backend == "sdpa":
        per_frame = grid[1] * grid[2]
        ends = [min(f + chunk_frames, frames) for f in range(0, frames, chunk_frames)]
        # Once the window's recent part no longer meets the sink, the keys are two runs: the sink, then the rest.
        first = [w if w > sink else 0 for w in (window_start(e, window, sink) for e in ends)]
        return latents, t, positions, ChunkSpans((0, *(e * per_frame for e in ends)), teacher_forcing,
                                                 tuple(f * per_frame for f in first), sink * per_frame)
    return latents, t, positions, chunk_mask(frame, chunk_frames, window, sink, teacher_forcing=teacher_forcing)


def window_start(end: int | torch.Tensor, window: int | None, sink: int) -> int | torch.Tensor:
    """The oldest non-sink frame a chunk ending before frame `end` sees: the cache keeps `sink` frames for good
    and a ring of the last window - sink frames."""
    start = end * 0 if window is None else end - (window - sink)
    return start.clamp(min=0) if isinstance(start, torch.Tensor) else max(0, start)


def chunk_mask(frame: torch.Tensor, chunk_frames: int, window: int | None, sink: int = 0, *,
               teacher_forcing: bool) -> BlockMask:
    """Who sees whom when frames run in chunks, as flex attention's block mask; frame holds each token's frame.

    Block-causal: a token sees its own chunk and earlier ones — with a window, only the first `sink` frames and the
    last window - sink frames up to its chunk's end.
    Teacher forcing: the sequence is the clean clip followed by its noisy copy; clean tokens are block-causal among
    themselves, a noisy token sees the clean chunks before its own and its own noisy chunk — what a cached rollout
    does chunk by chunk.
    """
    n = frame.numel()
    chunk = torch.div(frame, chunk_frames, rounding_mode="floor")
    end = torch.clamp((chunk + 1) * chunk_frames, max=int(frame.max()) + 1)
    first = window_start(end, window, sink)
    full, frames, firsts = (torch.cat([x, x]) if teacher_forcing else x for x in (chunk, frame, first))

    def visible(_b, _h, q, kv):
        cq, ckv = full[q], full[kv]
        seen = (frames[kv] >= firsts[q]) | (frames[kv] < sink)
        if not teacher_forcing:
            return seen & (ckv <= cq)
        q_noisy, kv_noisy = q >= n, kv >= n
        return seen & torch.where(q_noisy, torch.where(kv_noisy, ckv == cq, ckv < cq), ~kv_noisy & (ckv <= cq))

    return create_block_mask(visible, None, None, full.numel(), full.numel(), device=full.device)


@dataclass(frozen=True)
class ChunkSpans:
    """chunk_mask's visibility as token spans: chunk c holds tokens [bounds[c], bounds[c+1]) of the clip.

    Its queries see the keys in [starts[c], bounds[c+1]), one contiguous run, and once a window cuts older frames
    off (starts[c] > 0) the sink's keys [0, sink_end) too, so unmasked SDPA per chunk computes exactly what the
    mask asks — on any device, without an L x L mask. With teacher forcing the sequence is the clean clip and then
    its noisy copy (bounds[-1] tokens each), and a noisy chunk sees the clean keys so chosen before bounds[c] plus
    its own noisy chunk.
    """

    bounds: tuple[int, ...]
    teacher_forcing: bool
    starts: tuple[int, ...]
    sink_end: int = 0


Mask = BlockMask | ChunkSpans


def span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: ChunkSpans) -> torch.Tensor:
    """Attention of (B, heads, L, d) tensors under `spans`, one unmasked SDPA call per chunk (and per half)."""
    n = spans.bounds[-1]

    def seen(x: torch.Tensor, first: int, stop: int) -> torch.Tensor:
        return x[:, :, first:stop] if first == 0 else torch.cat([x[:, :, : spans.sink_end], x[:, :, first:stop]], dim=2)

    clean, noisy = [], []
    for first, (s, e) in zip(spans.starts, itertools.pairwise(spans.bounds), strict=True):
        clean.append(F.scaled_dot_product_attention(q[:, :, s:e], seen(k, first, e), seen(v, first, e)))
        if spans.teacher_forcing:
            keys = torch.cat([seen(k, first, s), k[:, :, n + s : n + e]], dim=2)
            values = torch.cat([seen(v, first, s), v[:, :, n + s : n + e]], dim=2)
            noisy.append(F.scaled_dot_product_attention(q[:, :, n + s : n + e], keys, values))
    return torch.cat(clean + noisy, dim=2)


@functools.cache
def _flex_attention(device_type: str):
    # Compiled, flex attention runs a fused kernel that skips masked blocks; eager it is a slow reference (CPU).
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask | None) -> torch.Tensor:
    """Attention of (B, heads, L, d) tensors: under a block mask (flex), under chunk spans, or unmasked."""
    if isinstance(mask, BlockMask):
        return _flex_attention(q.device.type)(q, k, v, block_mask=mask)
    if isinstance(mask, ChunkSpans):
        return span_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v)
