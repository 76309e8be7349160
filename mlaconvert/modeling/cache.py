"""Streaming KV caches: preallocated sink frames plus a ring buffer of recent frames, for every layer.

One class serves dense and latent attention alike: each attention module says what it stores per token
(`cache_widths`: dense k and v, 2 x dim; latent c and r, dc + rope_dim), the cache only keeps those rows, so
the sampler, `bench` and `eval` hold the same class whichever attention the model has.

The window is the attention span in frames, the current chunk included (Self-Forcing's `local_attn_size`).
A chunk's entries are written straight into the ring slots it will own, so a forward attends to the buffer
in place with no concatenation and no copy of the cache; the slots it overwrites belonged to frames that have
just left its span. Denoising steps (commit=False) write the same slots again and again; only the t = 0
context pass (commit=True) advances the cache.

Positions: `absolute` rotates every key at its frame index since the start; `reindex` numbers the frames in
the window 0, 1, ... in time order (sinks first) at each step, so a rollout of any length stays inside the
RoPE range the model was trained on. Both give the same result while the window has not slid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.model import WanModel
from mlaconvert.modeling.rope import Angles, grid_positions


class KVCache:
    """Every layer's cached entries for a batch of streams; `step` plans each forward's view of them."""

    def __init__(
        self,
        model: WanModel,
        *,
        batch: int,
        frame_shape: tuple[int, int],
        window: int,
        sink: int = 0,
        positions: str = "absolute",
    ):
        """frame_shape: (rows, columns) of patch tokens in one latent frame; window and sink are in latent frames.
        The buffers take the device and dtype of the model's weights."""
        if window < 1 or sink < 0 or sink >= window:
            raise MlaconvertError(f"need 0 <= sink < window (got sink {sink}, window {window})")
        if positions not in ("absolute", "reindex"):
            raise MlaconvertError(f"positions must be 'absolute' or 'reindex', not '{positions}'")
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.head_dim, self.rope_theta = model.config.head_dim, model.config.rope_theta
        self.batch, self.frame_shape, self.window, self.sink, self.positions = batch, frame_shape, window, sink, positions
        self.tokens_per_frame = frame_shape[0] * frame_shape[1]
        tokens = window * self.tokens_per_frame
        self.layers = [
            tuple(torch.zeros(batch, tokens, w, device=self.device, dtype=self.dtype) for w in block.self_attn.cache_widths())
            for block in model.blocks
        ]
        self.slot_frame = [-1] * window  # absolute frame index held by each slot, -1 when empty
        self.frames_committed = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)

    def _slot(self, frame: int) -> int:
        if frame < self.sink:
            return frame
        return self.sink + (frame - self.sink) % (self.window - self.sink)

    def step(self, frames: int, commit: bool) -> CacheStep:
        """Plan a forward of the next `frames` latent frames (the chunk after everything committed so far)."""
        if frames > self.window - self.sink:
            raise MlaconvertError(f"a chunk of {frames} frames does not fit a window of {self.window} with {self.sink} sink frames")
        first = self.frames_committed
        new = list(range(first, first + frames))
        slot_frame = list(self.slot_frame)
        for f in new:
            slot_frame[self._slot(f)] = f
        valid = [s for s, f in enumerate(slot_frame) if f >= 0]
        n_slots = max(valid) + 1  # slots fill in order, so the valid ones are a prefix
        frame_pos = self._frame_positions(slot_frame[:n_slots])
        tpf = self.tokens_per_frame
        rows, cols = self.frame_shape

        def tokens_of(slots: list[int]) -> torch.Tensor:
            base = torch.tensor(slots, device=self.device)[:, None] * tpf
            return (base + torch.arange(tpf, device=self.device)).flatten()

        def positions_of(pos_frames: list[int]) -> torch.Tensor:
            return torch.cat([grid_positions(1, rows, cols, first_frame=p, device=self.device) for p in pos_frames])

        new_slots = [self._slot(f) for f in new]
        keys, queries = positions_of(frame_pos), positions_of([frame_pos[s] for s in new_slots])
        step = CacheStep(
            cache=self,
            write_index=tokens_of(new_slots),
            n_tokens=n_slots * tpf,
            key_positions=keys,
            query_positions=queries,
            key_angles=Angles.at(keys, self.head_dim, self.rope_theta),
            query_angles=Angles.at(queries, self.head_dim, self.rope_theta),
        )
        if commit:
            self.slot_frame = slot_frame
            self.frames_committed += frames
        return step

    def _frame_positions(self, slot_frame: list[int]) -> list[int]:
        if self.positions == "absolute":
            return slot_frame
        order = sorted(range(len(slot_frame)), key=lambda s: slot_frame[s])
        pos = [0] * len(slot_frame)
        for rank, s in enumerate(order):
            pos[s] = rank
        return pos


@dataclass
class CacheStep:
    """One forward's view of the cache: where the chunk's entries go and at which positions everything sits
    (and their RoPE angles, made here once for every layer)."""

    cache: KVCache
    write_index: torch.Tensor
    n_tokens: int
    key_positions: torch.Tensor
    query_positions: torch.Tensor
    key_angles: Angles
    query_angles: Angles

    def layer(self, index: int) -> _LayerView:
        return _LayerView(self, self.cache.layers[index])


@dataclass
class _LayerView:
    # The layer's buffers themselves, not its index into the cache's list: a compiled block would otherwise
    # specialise on the index and compile once per layer.
    step: CacheStep
    stored: tuple[torch.Tensor, ...]

    @property
    def fixed_positions(self) -> bool:
        return self.step.cache.positions == "absolute"

    def extend(self, entries: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], Angles]:
        stored = self.stored
        for buf, e in zip(stored, entries):
            buf.index_copy_(1, self.step.write_index, e.to(buf.dtype))
        return tuple(buf[:, : self.step.n_tokens] for buf in stored), self.step.key_angles

