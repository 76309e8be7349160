"""The bouncing-balls world: procedural videos whose true future is known, and the captions that describe them.

A clip is 1-4 anti-aliased balls of palette colours and radii moving at constant velocity on a tinted background,
bouncing elastically off the walls (not off each other), drawn in a fixed order so later balls cover earlier ones.
Frames are rendered straight into a model's input space: 3 channels, `size` x `size` pixels, values in [-1, 1].

The state (`Balls`) is explicit, so every clip has a true continuation: `simulate(state, n)` renders n frames
and returns the state after them, and simulating 2n frames is the same as n frames and then n more. Physics runs
in float64 on the CPU, so the same seed gives the same clip on any device; only rendering runs where asked.

Captions name the balls in drawing order ("two balls: red, blue"). `embed_captions` turns them into the `text`
a Wan model cross-attends to: each word's vector is drawn from a generator seeded by the word itself, plus a
fixed vector per token position, so it needs no vocabulary file, no download and gives the same result
everywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np
import torch

from mlaconvert.errors import MlaconvertError

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.16, 0.14),
    "green": (0.18, 0.80, 0.24),
    "blue": (0.20, 0.36, 0.95),
    "yellow": (0.96, 0.88, 0.18),
    "magenta": (0.88, 0.22, 0.86),
    "cyan": (0.16, 0.86, 0.90),
    "orange": (0.98, 0.55, 0.10),
    "white": (0.96, 0.96, 0.96),
}
COLOURS = tuple(PALETTE)
NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")
CAPTION_SEED = "mlaconvert.world.captions/1"  # changing it changes every embedding: a new model is needed then


@dataclass(frozen=True)
class WorldSettings:
    """What the world's clips look like; a trained model is tied to these (its card records them)."""

    size: int = 32  # frame height and width in pixels
    min_balls: int = 1
    max_balls: int = 4
    min_radius: float = 2.5  # pixels
    max_radius: float = 5.0
    min_speed: float = 0.5  # pixels per frame
    max_speed: float = 1.75

    def __post_init__(self) -> None:
        if not 1 <= self.min_balls <= self.max_balls <= len(NUMBERS) - 1:
            raise MlaconvertError(f"ball counts must satisfy 1 <= min_balls <= max_balls <= {len(NUMBERS) - 1}")
        if not 0 < self.min_radius <= self.max_radius or 2 * self.max_radius >= self.size:
            raise MlaconvertError(f"radii must be positive and a ball must fit in a {self.size}-pixel frame")
        if not 0 <= self.min_speed <= self.max_speed < self.size - 2 * self.max_radius:
            # One reflection per frame and wall is all `advance` does: a ball may not cross the free space in a frame.
            raise MlaconvertError("speeds must be non-negative and below the free space between the walls")


@dataclass(frozen=True)
class Balls:
    """The world's state for a batch of clips (float64 numpy, CPU). Absent ball slots are ignored."""

    position: np.ndarray  # (B, N, 2) ball centres (row, column) in pixels, pixel centres at i + 0.5
    velocity: np.ndarray  # (B, N, 2) pixels per frame
    radius: np.ndarray  # (B, N)
    colour: np.ndarray  # (B, N) palette index
    present: np.ndarray  # (B, N) bool; the present balls are a prefix of the N slots
    background: np.ndarray  # (B, 3) RGB in [0, 1]
    size: int

    @property
    def count(self) -> np.ndarray:
        return self.present.sum(axis=1)


def new_worlds(batch: int, seed: int, settings: WorldSettings = WorldSettings()) -> Balls:
    """`batch` random initial states; the same (batch, seed, settings) give the same worlds."""
    s = settings
    rng = np.random.default_rng(seed)
    n = s.max_balls
    count = rng.integers(s.min_balls, s.max_balls + 1, size=batch)
    radius = rng.uniform(s.min_radius, s.max_radius, size=(batch, n))
    position = radius[..., None] + rng.uniform(size=(batch, n, 2)) * (s.size - 2 * radius[..., None])
    angle = rng.uniform(0, 2 * np.pi, size=(batch, n))
    speed = rng.uniform(s.min_speed, s.max_speed, size=(batch, n))
    velocity = np.stack([np.sin(angle), np.cos(angle)], axis=-1) * speed[..., None]
    colour = rng.integers(0, len(PALETTE), size=(batch, n))
    # A dark, tinted background: every ball colour stays far from it.
    background = 0.06 + 0.22 * rng.uniform(size=(batch, 3)) ** 2
    present = np.arange(n)[None, :] < count[:, None]
    return Balls(position, velocity, radius, colour, present, background, s.size)


def advance(state: Balls) -> Balls:
    """One frame of constant-velocity motion with elastic reflection off the four walls (speed is kept)."""
    low = state.radius[..., None]
    high = state.size - low
    p = state.position + state.velocity
    v = state.velocity.copy()
    below, above = p < low, p > high
    p = np.where(below, 2 * low - p, np.where(above, 2 * high - p, p))
    v[below | above] *= -1
    return replace(state, position=p, velocity=v)


def render(state: Balls, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, 3, size, size) frames in [-1, 1]: the background, then each present ball over it in slot order.

    Coverage of a pixel is its centre's distance inside the rim, clamped to [0, 1] over one pixel: a cheap,
    smooth anti-aliasing that keeps sub-pixel motion visible."""
    size = state.size
    centres = torch.arange(size, dtype=torch.float32, device=device) + 0.5
    pos = torch.as_tensor(state.position, dtype=torch.float32, device=device)
    radius = torch.as_tensor(state.radius, dtype=torch.float32, device=device)
    present = torch.as_tensor(state.present, device=device)
    palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32, device=device)
    colour = palette[torch.as_tensor(state.colour, device=device)]  # (B, N, 3)
    image = torch.as_tensor(state.background, dtype=torch.float32, device=device)[:, :, None, None].expand(-1, 3, size, size)
    dy = centres[None, None, :, None] - pos[..., 0, None, None]
    dx = centres[None, None, None, :] - pos[..., 1, None, None]
    coverage = (radius[..., None, None] + 0.5 - torch.sqrt(dy**2 + dx**2)).clamp(0, 1) * present[..., None, None]
    for i in range(pos.shape[1]):
        a = coverage[:, i, None]
        image = image * (1 - a) + colour[:, i, :, None, None] * a
    return image * 2 - 1


def simulate(state: Balls, frames: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, Balls]:
    """Render `frames` frames starting at `state`: a clip (B, 3, frames, size, size), and the state that follows."""
    out = []
    for _ in range(frames):
        out.append(render(state, device))
        state = advance(state)
    return torch.stack(out, dim=2), state


def clips(batch: int, frames: int, seed: int, settings: WorldSettings = WorldSettings(),
          device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[str], Balls]:
    """Fresh clips of the world: pixels (B, 3, F, size, size), their captions, and the state after the last frame."""
    start = new_worlds(batch, seed, settings)
    video, end = simulate(start, frames, device)
    return video, captions(start), end


def captions(state: Balls) -> list[str]:
    """'two balls: red, blue' — the ball count and colours in drawing order."""
    out = []
    for count, colours in zip(state.count, state.colour):
        names = ", ".join(COLOURS[c] for c in colours[:count])
        out.append(f"{NUMBERS[count]} ball{'s' if count != 1 else ''}: {names}")
    return out


def _seeded_vector(key: str, width: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(f"{CAPTION_SEED}/{key}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(width)


def _words(caption: str) -> list[str]:
    return "".join(c if c.isalpha() else " " for c in caption.lower()).split()


def embed_captions(texts: list[str], text_len: int, text_dim: int) -> torch.Tensor:
    """(B, text_len, text_dim) float32: per word its own seeded vector plus a seeded vector of its position;
    rows past the caption's words are zero, as Wan pads its umT5 embeddings."""
    if not texts:
        raise MlaconvertError("no captions to embed")
    out = torch.zeros(len(texts), text_len, text_dim)
    for i, text in enumerate(texts):
        words = _words(text)
        if not words:
            raise MlaconvertError(f"caption {text!r} has no words")
        if len(words) > text_len:
            raise MlaconvertError(f"caption {text!r} has {len(words)} words; the model reads at most {text_len}")
        for j, word in enumerate(words):
            vec = _seeded_vector(f"word/{word}", text_dim) + 0.5 * _seeded_vector(f"position/{j}", text_dim)
            out[i, j] = torch.from_numpy(vec.astype(np.float32))
    return out
