"""World health: does a free-running rollout of the bouncing-balls world still show the balls its caption names?

Detection works on frames in the world's pixel space (3 channels in [-1, 1]). Every pixel is given to the nearest
of the clip's background colour (the per-channel median of its true prefix, where balls cover well under half
the pixels) and the eight palette colours; pixels nearer a palette colour are ball pixels of that colour. Each
colour is then split into 4-connected components, and components smaller than a fraction of the smallest ball's
area are dropped as specks (an anti-aliased rim between two balls can blend into a third palette colour). So two
touching balls of different colours still count as two; what it cannot see is a ball hidden behind another one
or two overlapping balls of one colour — on rendered truth that is the only way it miscounts.

Per frame and clip it yields the ball count, the colour error (distance of each ball's median colour to the
palette colour it was given, in RGB units of [0, 1]), how many detected balls have a colour the caption names,
and per palette colour the centroid of its balls, which gives the speed of every ball whose colour is unique in
its caption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from mlaconvert.evaluation.world import PALETTE, Balls, WorldSettings

PALETTE_PIXELS = np.array(list(PALETTE.values())) * 2 - 1  # (K, 3) in the model's [-1, 1] pixel space
SPECK_FRACTION = 0.3  # of the smallest ball's area: a partly hidden ball below it is not counted

# 4-connectivity within one (clip, frame, colour) plane of a (B, F, K, H, W) mask, none across planes.
_PLANE = np.zeros((3, 3, 3, 3, 3), dtype=bool)
_PLANE[1, 1, 1] = ndimage.generate_binary_structure(2, 1)


@dataclass
class Detection:
    """What the detector saw in a batch of clips: B clips, F frames, K palette colours."""

    balls: np.ndarray  # (B, F, K) components per colour
    colour_error: np.ndarray  # (B, F) summed over the detected balls
    centroid: np.ndarray  # (B, F, K, 2) pixel-weighted centre of the colour's balls; nan where there are none

    @property
    def count(self) -> np.ndarray:
        return self.balls.sum(axis=-1)

    @staticmethod
    def concat(parts: list[Detection]) -> Detection:
        return Detection(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("balls", "colour_error", "centroid")))


def background_colour(prefix: torch.Tensor) -> torch.Tensor:
    """(B, 3): per clip and channel, the median over the prefix frames' pixels (B, 3, P, H, W)."""
    return prefix.flatten(2).float().median(dim=2).values


def min_area(settings: WorldSettings) -> float:
    return SPECK_FRACTION * math.pi * settings.min_radius**2


def detect_balls(frames: torch.Tensor, background: torch.Tensor, min_area: float) -> Detection:
    """Balls in frames (B, 3, F, H, W) in [-1, 1], against each clip's background colour (B, 3)."""
    x = np.moveaxis(frames.float().cpu().numpy(), 1, -1)  # (B, F, H, W, 3)
    bg = background.float().cpu().numpy()[:, None, None, None, :]
    to_palette = ((x[..., None, :] - PALETTE_PIXELS.astype(np.float32)) ** 2).sum(axis=-1)  # (B, F, H, W, K)
    nearest = to_palette.argmin(axis=-1)
    ball = to_palette.min(axis=-1) < ((x - bg) ** 2).sum(axis=-1)
    k = len(PALETTE_PIXELS)
    masks = np.moveaxis(ball[..., None] & (nearest[..., None] == np.arange(k)), -1, 2)  # (B, F, K, H, W)
    # Components never span two colours, so each pixel carries at most one label: fold the colour planes back.
    labels, n = ndimage.label(masks, structure=_PLANE)
    labels = labels.max(axis=2)  # (B, F, H, W)
    b, f = labels.shape[:2]
    out = Detection(np.zeros((b, f, k), dtype=np.int64), np.zeros((b, f)), np.full((b, f, k, 2), np.nan))
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    index = np.arange(1, n + 1)[area >= min_area]
    if len(index) == 0:
        return out
    area = area[index - 1]
    where = np.array(ndimage.center_of_mass(ball, labels, index))  # (n, 4): clip, frame, row, column
    colour = ndimage.maximum(nearest, labels, index).astype(np.int64)
    plane = (*where[:, :2].round().astype(np.int64).T, colour)
    # The median over a ball's pixels ignores its anti-aliased rim, which blends into the background.
    median = np.stack([ndimage.median(x[..., c], labels, index) for c in range(3)], axis=-1)
    np.add.at(out.balls, plane, 1)
    np.add.at(out.colour_error, plane[:2], np.linalg.norm(median - PALETTE_PIXELS[colour], axis=-1) / 2)
    weight = np.zeros((b, f, k))
    total = np.zeros((b, f, k, 2))
    np.add.at(weight, plane, area)
    np.add.at(total, plane, where[:, 2:] * area[:, None])
    seen = weight > 0
    out.centroid[seen] = total[seen] / weight[seen][:, None]
    return out


def caption_colours(state: Balls) -> np.ndarray:
    """(B, K): how many of each clip's balls have each palette colour."""
    out = np.zeros((len(state.count), len(PALETTE_PIXELS)), dtype=np.int64)
    rows, slots = np.nonzero(state.present)
    np.add.at(out, (rows, state.colour[rows, slots]), 1)
    return out


def true_speeds(state: Balls, colours: np.ndarray) -> np.ndarray:
    """(B, K) speed in pixels per frame of the one ball of each colour; nan for colours not exactly once in the clip."""
    out = np.full(colours.shape, np.nan)
    rows, slots = np.nonzero(state.present)
    out[rows, state.colour[rows, slots]] = np.linalg.norm(state.velocity[rows, slots], axis=-1)
    out[colours != 1] = np.nan
    return out


def speeds(det: Detection, colours: np.ndarray) -> np.ndarray:
    """(B, F, K) centroid displacement into each frame from the one before (nan for frame 0), for the colours that
    exactly one ball of the caption has: with two of a colour the centroid is their mean, not a ball."""
    step = np.linalg.norm(np.diff(det.centroid, axis=1), axis=-1)
    step = np.concatenate([np.full_like(step[:, :1], np.nan), step], axis=1)
    step[np.broadcast_to((colours != 1)[:, None, :], step.shape)] = np.nan
    return step


def _ratio(total: float, n: float) -> float | None:
    return None if n == 0 else float(total / n)


def health(det: Detection, state: Balls, first: int, buckets: list[tuple[int, int]]) -> dict[str, object]:
    """Per frame from `first` on, and per horizon bucket: balls kept, colour fidelity, speed constancy.

    Every figure pools the (clip, frame) pairs it covers: ratios of sums, so a frame without balls weighs nothing.
    count_kept: fraction of clips whose detected ball count equals the caption's; balls: mean detected count;
    colour_error: mean distance of a ball's colour to its palette colour (RGB, [0, 1]); colours_in_caption:
    fraction of detected balls whose colour the caption names; speed / speed_error: centroid displacement per
    frame and its absolute difference from the true ball's speed (pixels per frame).
    """
    colours = caption_colours(state)
    count = det.count
    kept = count == state.count[:, None]
    named = (det.balls * (colours > 0)[:, None, :]).sum(axis=-1)
    speed = speeds(det, colours)
    speed_error = np.abs(speed - true_speeds(state, colours)[:, None, :])

    def summary(part: slice) -> dict[str, float | None]:
        balls = count[:, part].sum()
        return {
            "count_kept": float(kept[:, part].mean()),
            "balls": float(count[:, part].mean()),
            "colour_error": _ratio(det.colour_error[:, part].sum(), balls),
            "colours_in_caption": _ratio(named[:, part].sum(), balls),
            "speed": _ratio(np.nansum(speed[:, part]), np.isfinite(speed[:, part]).sum()),
            "speed_error": _ratio(np.nansum(speed_error[:, part]), np.isfinite(speed_error[:, part]).sum()),
        }

    frames = [summary(slice(t, t + 1)) for t in range(first, count.shape[1])]
    return {
        "per_frame": {key: [row[key] for row in frames] for key in frames[0]},
        "horizons": [{"frames": [a, b], **summary(slice(a, b))} for a, b in buckets],
    }
