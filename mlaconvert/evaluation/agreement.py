"""Teacher agreement: how closely an MLA student follows its dense teacher, step by step and over a rollout.

Both views run on held-out clips (latents + their prompt embeddings) that the student never trained on:

  flow error    at each timestep of the sampler's (warped) list, every chunk of the clip is noised to that
                timestep with the clean earlier chunks as context — the teacher-forcing forward that training
                uses, i.e. what the cached rollout computes — and the relative L2 error ||v_s - v_t|| / ||v_t||
                of the student's flow prediction against the teacher's is recorded;
  rollout PSNR  student and teacher each sample the clips' prompts from the same initial noise and with the
                same re-noising draws (`sampling.rollout` seeded alike); per chunk, the PSNR of the student's
                latents against the teacher's. Errors compound along the rollout, which is what streaming
                generation sees and what the per-step view cannot show.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mlaconvert.inference.sampling import SamplerSettings, rollout, warp_timesteps
from mlaconvert.modeling.model import WanModel

# Floor for a chunk's mean squared error, so identical latents give a large finite PSNR (JSON has no infinity).
MIN_MSE = 1e-20


def _device(model: WanModel) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def flow_errors(
    student: WanModel,
    teacher: WanModel,
    clips: torch.Tensor,
    text: torch.Tensor,
    *,
    chunk: int,
    window: int | None,
    sink: int,
    timesteps: list[float],
    seed: int = 0,
) -> list[float]:
    """Relative error of the student's flow against the teacher's at each timestep, over all held-out clips.

    clips: clean latents (B, C, F, h, w); text: their embeddings (B, L, text_dim). The noise is drawn once
    from `seed` on the CPU and shared by every timestep, so the figures of two models are comparable.
    """
    device = _device(student)
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(seed))
    clean, noise, text = clips.to(device), noise.to(device), text.to(device)
    batch, frames = clean.shape[0], clean.shape[2]
    errors = []
    for t in timesteps:
        sigma = t / 1000.0
        noisy = (1 - sigma) * clean + sigma * noise
        tt = torch.full((batch, frames), t, device=device)
        target = teacher(noisy, tt, text, chunk_frames=chunk, window=window, sink=sink, clean=clean)
        flow = student(noisy, tt, text, chunk_frames=chunk, window=window, sink=sink, clean=clean)
        errors.append(float((flow - target).norm() / target.norm()))
    return errors


@torch.no_grad()
def rollout_psnr(
    student: WanModel,
    teacher: WanModel,
    text: torch.Tensor,
    *,
    frames: int,
    latent_size: tuple[int, int],
    settings: SamplerSettings,
) -> list[float]:
    """PSNR (dB) of a student rollout against a teacher rollout from the same noise and prompts, per chunk.

    The peak is the teacher rollout's peak-to-peak range: latents have no fixed range like pixels do.
    """
    cfg = teacher.config
    generator = torch.Generator().manual_seed(settings.seed)
    noise = torch.randn(text.shape[0], cfg.in_dim, frames, *latent_size, generator=generator)
    reference = rollout(teacher, text, frames=frames, latent_size=latent_size, settings=settings, noise=noise).latents
    sample = rollout(student, text, frames=frames, latent_size=latent_size, settings=settings, noise=noise).latents
    peak = float(reference.max() - reference.min())
    out = []
    for start in range(0, frames, settings.chunk):
        part = slice(start, start + settings.chunk)
        mse = float((sample[:, :, part] - reference[:, :, part]).pow(2).mean())
        out.append(10 * math.log10(peak**2 / max(mse, MIN_MSE)))
    return out


def teacher_agreement(
    student: WanModel,
    teacher: WanModel,
    clips: torch.Tensor,
    text: torch.Tensor,
    *,
    settings: SamplerSettings,
    seed: int = 0,
) -> dict[str, Any]:
    """Both agreement views on held-out clips, as a JSON-ready dict.

    `settings` is the sampler the student will be used with: its chunk, denoising list and shift define the
    timesteps of the flow errors and drive the rollouts (which cover as many frames as the clips have).
    """
    frames, latent_size = clips.shape[2], (clips.shape[3], clips.shape[4])
    timesteps = warp_timesteps(settings.timesteps, settings.shift)
    errors = flow_errors(student, teacher, clips, text, chunk=settings.chunk, window=settings.window, sink=settings.sink,
                         timesteps=timesteps, seed=seed)
    psnr = rollout_psnr(student, teacher, text, frames=frames, latent_size=latent_size, settings=settings)
    return {
        "clips": clips.shape[0],
        "frames": frames,
        "chunk": settings.chunk,
        "timesteps": timesteps,
        "flow_relative_error": errors,
        "flow_relative_error_mean": sum(errors) / len(errors),
        "rollout_psnr_db": psnr,
        "rollout_psnr_db_mean": sum(psnr) / len(psnr),
    }
