"""Calibration: run the dense model on representative inputs and record what each self-attention sees.

asvd needs the second moment of every layer's attention input; the rank report needs real tokens to measure
the K/V/attention error of a conversion. With no data given, the inputs are seeded random latents at the
sampler's timesteps with seeded random text embeddings — the report says so, since real prompts and clips
give more faithful statistics. A model of the built-in world is calibrated on clips of its world.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mlaconvert.errors import MlaconvertError
from mlaconvert.inference.sampling import SamplerSettings, warp_timesteps
from mlaconvert.modeling.model import WanModel
from mlaconvert.modeling.rope import Angles

# The timesteps a streaming model runs at: the default denoising list warped by the default shift (Self-Forcing's).
DEFAULT_TIMESTEPS = tuple(warp_timesteps(SamplerSettings.timesteps, SamplerSettings.shift))


@dataclass
class Calibration:
    """Per layer: E[x̃ x̃ᵀ] with x̃ = [x; 1], and a few whole samples (tokens, their RoPE angles) for measuring errors."""

    second_moments: list[torch.Tensor]
    samples: list[list[tuple[torch.Tensor, Angles]]]
    description: dict = field(default_factory=dict)


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(model_bytes: int, device: torch.device) -> None:
    """Refuse, with advice, a calibration pass that would not fit in memory."""
    free = _available_memory(device)
    if model_bytes * 1.3 > free:
        raise MlaconvertError(
            f"calibration runs the dense model ({model_bytes / 2**30:.1f} GiB) but only {free / 2**30:.1f} GiB is free "
            f"on {device}: use --init svd or --init random with --no-measure (no calibration), or a bigger device"
        )


@contextlib.contextmanager
def recording_forwards(modules: Sequence[nn.Module], record: Callable[[int, tuple[Any, ...], Any], None]) -> Iterator[None]:
    """Inside, every forward of modules[i] calls record(i, its positional inputs, its output).

    The hooks are gone on leaving, so nothing outside the block records: an activation-checkpointing
    recomputation during backward, or a later forward of the same model.
    """
    handles = [m.register_forward_hook(lambda _m, args, out, i=i: record(i, args, out)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate(
    model: WanModel,
    *,
    frames: int = 3,
    height: int = 16,
    width: int = 16,
    timesteps: tuple[float, ...] = DEFAULT_TIMESTEPS,
    seed: int = 0,
    keep_samples: int = 2,
    text: torch.Tensor | None = None,
    clips: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Calibration:
    """Run `model` at each timestep on seeded random latents (frames x height x width, in latent pixels), or,
    given `clips` (clean latents (N, C, F, h, w) and their text (N, L, D)), on those clips noised to it as
    flow matching does: what the model meets when it samples."""
    cfg = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    gen = torch.Generator().manual_seed(seed)
    if text is None and clips is None:
        text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen)
    n = len(model.blocks)
    moments = [torch.zeros(cfg.dim + 1, cfg.dim + 1, dtype=torch.float64) for _ in range(n)]
    samples: list[list[tuple[torch.Tensor, Angles]]] = [[] for _ in range(n)]
    count = 0

    def record(index: int, args: tuple[Any, ...], _output: Any) -> None:
        x, angles = args[0], args[1]
        flat = x.reshape(-1, x.shape[-1]).double().cpu()
        aug = torch.cat([flat, torch.ones(flat.shape[0], 1, dtype=flat.dtype)], dim=1)
        moments[index].add_(aug.T @ aug)
        if len(samples[index]) < keep_samples:
            samples[index].append((x[:1].float().cpu(), angles.to("cpu")))

    with recording_forwards([block.self_attn for block in model.blocks], record):
        for t in timesteps:
            if clips is None:
                latents = torch.randn(1, cfg.in_dim, frames, height, width, generator=gen)
            else:
                sigma = t / 1000.0
                latents = (1 - sigma) * clips[0] + sigma * torch.randn(clips[0].shape, generator=gen)
                text = clips[1]
            model(latents.to(device, dtype), torch.full((latents.shape[0],), float(t), device=device), text.to(device, dtype))
            count += latents[0, 0].numel() * latents.shape[0] // math.prod(cfg.patch_size)
    shape = [cfg.in_dim, frames, height, width] if clips is None else list(clips[0].shape[1:])
    return Calibration(
        second_moments=[m / count for m in moments],
        samples=samples,
        description={
            "inputs": "seeded random latents and random text embeddings (no data given)" if clips is None
            else f"{clips[0].shape[0]} clips noised at each timestep, with their text",
            "latent_shape": shape,
            "timesteps": list(timesteps),
            "seed": seed,
            "tokens": count,
        },
    )
