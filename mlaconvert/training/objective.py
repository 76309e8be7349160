"""The distillation objective of `finetune` — causal teacher forcing (DESIGN §7).

A clip of F latent frames is cut into chunks; each chunk is noised to its own timestep (from the sampler's
warped list, or uniformly between its ends), noisy = (1-σ) x0 + σ ε with σ = t/1000, and attends to the clean
earlier chunks in one forward (`model(noisy, t, text, chunk_frames=, clean=)`, which equals the cached
rollout). The student (MLA) matches the teacher's flow prediction v = ε - x0 (MSE), optionally also every
layer's self-attention output. Also here: which of the student's tensors learn, the precision of the
objective, its value on the held-out clips, and the FLOPs of one step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mlaconvert.conversion.calibration import recording_forwards
from mlaconvert.inference.sampling import SamplerSettings, rollout, warp_timesteps
from mlaconvert.modeling.config import WanConfig
from mlaconvert.modeling.model import WanModel
from mlaconvert.training.training_run import derived_seed

if TYPE_CHECKING:
    from mlaconvert.training.clips import Clips
    from mlaconvert.training.finetune import FinetuneSettings

TRAIN_MODES = ("mla", "attn", "all")
TIMESTEP_MODES = ("list", "uniform")


def mla_parameter_names(config: WanConfig) -> set[str]:
    """The parameters conversion creates: those the MLA model has and the dense model of its config lacks.

    Derived from the two models (built on the meta device, so nothing is allocated) rather than listed by hand,
    so a new MLA tensor — the low-rank query of --q-rank, say — is trained by `--train mla` without anyone
    remembering to add it.
    """
    with torch.device("meta"):
        mla, dense = WanModel(config), WanModel(config.replace(mla=None))
    return {n for n, _ in mla.named_parameters()} - {n for n, _ in dense.named_parameters()}


def trainable_names(config: WanConfig, names: list[str], mode: str) -> list[str]:
    """The parameter names `--train mode` updates, out of the names of a model of `config`."""
    if mode == "all":
        return list(names)
    if mode == "attn":
        return [n for n in names if ".self_attn." in n]
    new = mla_parameter_names(config)
    return [n for n in names if n in new]


def set_trainable(model: WanModel, mode: str) -> list[str]:
    """Freeze every parameter but those `--train mode` updates; their names, in the model's order."""
    names = [n for n, _ in model.named_parameters()]
    chosen = set(trainable_names(model.config, names, mode))
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return [n for n in names if n in chosen]


class AttentionOutputs:
    """Forward hooks recording each block's self-attention output, only while active."""

    def __init__(self, model: WanModel):
        self.model = model
        self.outputs: list[torch.Tensor] = []

    @contextlib.contextmanager
    def recording(self, on: bool) -> Iterator[None]:
        # Hooks are removed before backward: activation checkpointing re-runs the forward then, and the
        # recomputation must not record a second time.
        self.outputs = []
        modules = [b.self_attn for b in self.model.blocks] if on else []
        with recording_forwards(modules, lambda _i, _args, y: self.outputs.append(y)):
            yield


def noised(clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Flow-matching noising per latent frame: (1-σ) x0 + σ ε, σ = t/1000, t of shape (B, F)."""
    sigma = (timesteps / 1000.0)[:, None, :, None, None]
    return (1 - sigma) * clean + sigma * noise


def distill_loss(
    student: nn.Module,
    teacher: WanModel,
    clean: torch.Tensor,
    text: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    sampler: SamplerSettings,
    layer_loss_weight: float = 0.0,
    student_attn: AttentionOutputs | None = None,
    teacher_attn: AttentionOutputs | None = None,
    context: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Teacher-forcing distillation loss on one micro-batch, and its parts (detached); timesteps (B, F) per frame.
    Each chunk sees the context the sampler's cache would hold — `context`, by default the clean clip — through
    the mask its chunk, window and sink set.

    The layer term is each layer's self-attention-output MSE relative to the teacher's mean square, averaged
    over layers: deep layers have larger activations, and the relative form keeps one weight meaningful for all.
    """
    noisy = noised(clean, noise, timesteps)
    context = clean if context is None else context
    layers = layer_loss_weight > 0
    with torch.no_grad(), (teacher_attn.recording(layers) if teacher_attn else contextlib.nullcontext()):
        target = teacher(noisy, timesteps, text, chunk_frames=sampler.chunk, window=sampler.window, sink=sampler.sink,
                         clean=context)
    with student_attn.recording(layers) if student_attn else contextlib.nullcontext():
        flow = student(noisy, timesteps, text, chunk_frames=sampler.chunk, window=sampler.window, sink=sampler.sink,
                       clean=context)
    flow_loss = F.mse_loss(flow.float(), target.float())
    parts = {"flow_loss": flow_loss.detach()}
    if not layers:
        return flow_loss, parts
    assert student_attn is not None and teacher_attn is not None
    terms = [
        F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-12)
        for s, t in zip(student_attn.outputs, teacher_attn.outputs, strict=True)
    ]
    layer_loss = torch.stack(terms).mean()
    parts["layer_loss"] = layer_loss.detach()
    return flow_loss + layer_loss_weight * layer_loss, parts


@torch.no_grad()
def own_continuation(model: WanModel, clean: torch.Tensor, text: torch.Tensor, sampler: SamplerSettings) -> torch.Tensor:
    """The model's own rollout after each clip's true first chunk, as long as the clip: the context it will see
    when it samples. Eager, since the cached chunk-by-chunk shapes are not the compiled ones."""
    chunk, (_, _, frames, h, w) = sampler.chunk, clean.shape
    with torch.compiler.set_stance("force_eager"):
        out = rollout(model, text, frames=frames - chunk, latent_size=(h, w), settings=sampler, prefix=clean[:, :, :chunk])
    return out.latents.to(device=clean.device, dtype=clean.dtype)


def chunk_timesteps(settings: FinetuneSettings, rows: int, frames: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, frames) timesteps: one per chunk, from the sampler's warped list or uniformly between its ends."""
    sampler = settings.sampler
    steps = torch.tensor(warp_timesteps(sampler.timesteps, sampler.shift))
    chunks = math.ceil(frames / sampler.chunk)
    if settings.timestep_mode == "list":
        t = steps[torch.randint(len(steps), (rows, chunks), generator=generator)]
    else:
        low, high = float(steps.min()), float(steps.max())
        t = low + (high - low) * torch.rand(rows, chunks, generator=generator)
    return t.repeat_interleave(sampler.chunk, dim=1)[:, :frames]


def context_draw(settings: FinetuneSettings, shape: torch.Size, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Noise and per-frame timesteps (σ per chunk uniform in [0, context_noise]) for the clean context, or None
    without context noise (drawing nothing, so such a run's other draws stay what they were)."""
    if settings.context_noise <= 0:
        return None
    sigma = chunk_sigmas(settings.sampler.chunk, shape[0], shape[2], generator) * settings.context_noise
    return torch.randn(shape, generator=generator), sigma * 1000


def chunk_sigmas(chunk: int, rows: int, frames: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, frames): one uniform draw in [0, 1) per chunk, repeated over its frames."""
    return torch.rand(rows, math.ceil(frames / chunk), generator=generator).repeat_interleave(chunk, dim=1)[:, :frames]


def autocast_for(device: torch.device) -> Any:
    """bf16 compute with fp32 master weights on CUDA; plain fp32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def held_out_loss(student: WanModel, teacher: WanModel, clips: Clips, settings: FinetuneSettings, device: torch.device,
                  processes: int = 1) -> float:
    """The objective on the held-out clips with noise and timesteps drawn once for the run: unlike the training
    loss, a fresh draw each step, its values differ only by the weights, so they can be compared."""
    s = settings
    micro = max(1, s.batch // (processes * s.accumulate))  # no more memory than a training micro-batch
    clean, text = clips.latents[-s.held_out :], clips.text[-s.held_out :]
    generator = torch.Generator().manual_seed(derived_seed(s.seed, "eval", 0))
    timesteps = chunk_timesteps(s, clean.shape[0], clean.shape[2], generator)
    noise = torch.randn(clean.shape, generator=generator)
    total = 0.0
    for start in range(0, clean.shape[0], micro):
        part = [x[start : start + micro].to(device) for x in (clean, text, noise, timesteps)]
        with autocast_for(device):
            loss, _ = distill_loss(student, teacher, *part, sampler=s.sampler, layer_loss_weight=s.layer_loss_weight,
                                   student_attn=AttentionOutputs(student), teacher_attn=AttentionOutputs(teacher))
        total += float(loss) * part[0].shape[0]
    return total / clean.shape[0]


def count_step_flops(config: WanConfig, settings: FinetuneSettings, frames: int, latent_size: tuple[int, int]) -> int:
    """Model FLOPs of one training step per clip: teacher forward, student forward and backward (no recompute).

    Counted by running the real step on the meta device, so it follows the model code and the trained subset.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        student, teacher = WanModel(config), WanModel(config.replace(mla=None))
        clean = torch.zeros(1, config.in_dim, frames, *latent_size)
        text = torch.zeros(1, config.text_len, config.text_dim)
        t = torch.zeros(1, frames)
    set_trainable(student, settings.train)
    teacher.requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        loss, _ = distill_loss(student, teacher, clean, text, clean, t, sampler=settings.sampler,
                               layer_loss_weight=settings.layer_loss_weight,
                               student_attn=AttentionOutputs(student), teacher_attn=AttentionOutputs(teacher))
        loss.backward()
    return int(counter.get_total_flops())
