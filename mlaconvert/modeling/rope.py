"""Wan's 3D rotary position embedding, over any subset of its frequency pairs.

A head of width d is d/2 complex pairs of adjacent dims (2i, 2i+1). Wan gives the first pairs to the latent
frame index, the next to the patch row, the last to the patch column, each axis with its own spectrum
theta^(-2i/d_axis). The MLA rope key keeps only a few of those pairs, so everything here takes an explicit
list of pairs. Angles are computed from integer positions (in float64, like Wan's table), which keeps positions
past Wan's 1024-entry table valid, once per forward for every pair of a head (`Angles`); each layer's `Rotary`
then picks its own pairs out of them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.config import rope_axis_split

AXES = ("frame", "row", "column")


def pair_table(head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the head's head_dim/2 pairs: its axis (0 frame, 1 row, 2 column) and angular frequency."""
    axes, freqs = [], []
    for axis, d_axis in enumerate(rope_axis_split(head_dim)):
        i = torch.arange(0, d_axis, 2, dtype=torch.float64, device="cpu")
        freqs.append(theta ** (-i / d_axis))
        axes.append(torch.full((d_axis // 2,), axis, dtype=torch.long, device="cpu"))
    return torch.cat(axes), torch.cat(freqs)


def axis_pairs(head_dim: int) -> list[list[int]]:
    """Pair indices of each axis, in Wan's order."""
    axes, _ = pair_table(head_dim)
    return [torch.nonzero(axes == a).flatten().tolist() for a in range(3)]


def rope_quota(head_dim: int, rope_dim: int) -> tuple[int, int, int]:
    """Pairs of a rope key of width rope_dim per axis, in Wan's proportion (rope_dim 32 -> 6 frame, 5 row, 5 column)."""
    if rope_dim % 2 or rope_dim <= 0:
        raise MlaconvertError(f"--rope-dim must be a positive even number (got {rope_dim})")
    if rope_dim > head_dim:
        raise MlaconvertError(f"--rope-dim {rope_dim} is larger than the head dim {head_dim}")
    row, column = rope_axis_split(rope_dim)[1:]
    quota = (rope_dim // 2 - (row + column) // 2, row // 2, column // 2)
    if min(quota) < 1:
        raise MlaconvertError(
            f"--rope-dim {rope_dim} cannot be shared over the three RoPE axes (frame, row, column): "
            "use at least 6 (one pair per axis)"
        )
    available = [len(a) for a in axis_pairs(head_dim)]
    if any(q > n for q, n in zip(quota, available)):
        raise MlaconvertError(f"--rope-dim {rope_dim} needs {quota} pairs per axis but a head has only {tuple(available)}")
    return quota


def leading_rope_pairs(head_dim: int, rope_dim: int) -> tuple[tuple[int, ...], ...]:
    """The first (highest-frequency) pairs of each axis, in Wan's proportion: rope pairs chosen without weights."""
    quota = rope_quota(head_dim, rope_dim)
    return tuple(tuple(axis[:q]) for axis, q in zip(axis_pairs(head_dim), quota))


def grid_positions(frames: int, height: int, width: int, first_frame: int = 0, device=None) -> torch.Tensor:
    """(frames*height*width, 3) integer positions in Wan's token order: frame-major, then row, then column."""
    f = torch.arange(first_frame, first_frame + frames, device=device)
    h = torch.arange(height, device=device)
    w = torch.arange(width, device=device)
    grid = torch.stack(torch.meshgrid(f, h, w, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


@functools.cache
def _pair_table_on(head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Once per device: a copy from host memory in every forward would stall the stream.
    return tuple(t.to(device) for t in pair_table(head_dim, theta))


@dataclass(frozen=True, eq=False)  # tensors have no single truth value to compare by
class Angles:
    """cos and sin of every pair's angle (all head_dim/2 of a head) at each of L tokens: (L, head_dim/2), float32.

    Made once per forward and shared by every layer. Left to each layer, a compiled block fuses the float64
    cos/sin into the kernel that writes its keys and evaluates it once per head and dim: on an H200 that kernel
    was 16.5 of the 103 ms of kernels of a compiled MLA forward over a 21-frame window."""

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def at(cls, positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> Angles:
        """positions (L, 3) integer (frame, row, column)."""
        axes, freqs = _pair_table_on(head_dim, theta, positions.device)
        angles = positions.to(torch.float64).index_select(1, axes) * freqs
        return cls(angles.cos().float(), angles.sin().float())

    def to(self, device: torch.device | str) -> Angles:
        return Angles(self.cos.to(device), self.sin.to(device))


class Rotary:
    """Rotates tensors whose last dim is a list of complex pairs, each one of a head's RoPE pairs."""

    def __init__(self, pairs: list[int] | torch.Tensor, head_dim: int):
        self.pairs = torch.as_tensor(pairs, dtype=torch.long, device="cpu")
        self.every_pair = self.pairs.tolist() == list(range(head_dim // 2))
        self._on_device: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def full(cls, head_dim: int) -> Rotary:
        return cls(list(range(head_dim // 2)), head_dim)

    def index(self, device: torch.device) -> torch.Tensor:
        """The pairs' indices on `device`, copied once (a CUDA graph cannot capture a copy from host memory)."""
        if device not in self._on_device:
            self._on_device[device] = self.pairs.to(device)
        return self._on_device[device]

    def cos_sin(self, angles: Angles) -> tuple[torch.Tensor, torch.Tensor]:
        """This rotation's columns of `angles`: cos, sin of shape (L, n_pairs)."""
        if self.every_pair:
            return angles.cos, angles.sin
        index = self.index(angles.cos.device)
        return angles.cos.index_select(1, index), angles.sin.index_select(1, index)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x (..., L, [heads,] 2*n_pairs); cos/sin (L, n_pairs) broadcast over the dims in between."""
        extra = x.dim() - 2 - (cos.dim() - 1)
        shape = cos.shape[:1] + (1,) * extra + cos.shape[1:]
        cos, sin = cos.reshape(shape), sin.reshape(shape)
        pairs = x.float().unflatten(-1, (-1, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
        return out.flatten(-2).to(x.dtype)
