"""The settings of `finetune` (the [finetune] table of a recipe, each a command-line option too) and their checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mlaconvert.errors import MlaconvertError
from mlaconvert.fields import help_of, setting
from mlaconvert.inference.sampling import SamplerOptions, SamplerSettings, parse_timesteps
from mlaconvert.modeling.config import WanConfig
from mlaconvert.training.objective import TIMESTEP_MODES, TRAIN_MODES


@dataclass
class FinetuneSettings:
    """The [finetune] table of a recipe; CLI options override it."""

    max_steps: int = setting(200, "Optimizer steps.")
    batch: int = setting(1, "Clips per step over all processes.")
    accumulate: int = setting(1, "Micro-batches per step in each process (gradient accumulation).")
    shard: bool = setting(False, "Under torchrun, split teacher and student across the processes (FSDP2) instead of a whole copy in each (DDP).")
    lr: float = setting(1e-4, "Peak learning rate of AdamW.")
    warmup: int = setting(10, "Linear warmup steps before the cosine decay to zero.")
    weight_decay: float = 0.0  # decay pulls toward zero, not toward the factorised init: off by default
    grad_clip: float = 1.0
    train: str = setting("mla", "mla (the new attention tensors), attn (all self-attention) or all.")
    layer_loss_weight: float = setting(0.0, "Weight of per-layer self-attention-output matching.")
    horizon_frames: int = setting(0, "Frames of the long-horizon check at step 0 and every checkpoint (0: none); "
                                     "the export keeps the checkpoint that scores best.")
    horizon_clips: int = 8  # clips of the long-horizon check
    own_context: float = setting(0.0, "Share of each batch whose clips are the student's own rollout after their true "
                                      "first chunk, the teacher's flow on them the target (0: teacher forcing only).")
    context_noise: float = setting(0.0, "Largest σ of the noise put on the clean context, drawn per chunk for teacher and student alike.")
    timestep_mode: str = "list"  # list: the sampler's warped timesteps; uniform: uniform between the list's ends
    gradient_checkpointing: bool = setting(True, "Activation checkpointing.")
    checkpoint_every: int = setting(50, "Steps between checkpoints.")
    eval_every: int = 25  # steps between evaluations of the fixed held-out objective (also at the start and end)
    seed: int = setting(0, "Seed of data order, timesteps, noise and generated clips.")
    # Teacher-generated data: this many clips, the last `held_out` of them kept for agreement and utilisation.
    clips: int = setting(16, "Teacher-generated clips, held_out of them (a recipe setting) kept out of training.")
    held_out: int = 2
    frames: int = setting(6, "Latent frames per generated clip.")
    height: int = setting(128, "Height of generated clips in pixels.")
    width: int = setting(128, "Width of generated clips in pixels.")
    generate_batch: int = 4
    # Overrides of the model's own sampler (config.json), which the student is trained for; None keeps its value.
    chunk: int | None = setting(None, help_of(SamplerOptions, "chunk"))
    sampler_steps: int | None = setting(None, f"{help_of(SamplerOptions, 'steps')} For the teacher's clips and the agreement measure.")
    sampler_timesteps: tuple[float, ...] | None = setting(None, help_of(SamplerOptions, "timesteps"), parse=parse_timesteps)
    shift: float | None = setting(None, help_of(SamplerOptions, "shift"))
    # The sampler itself: made by `for_model` from the model's own and the overrides above, unless given whole
    # (from Python; a recipe names the overrides).
    sampler: SamplerSettings | None = field(default=None, metadata={"recipe": False})

    def __post_init__(self) -> None:
        if self.sampler_timesteps is not None:
            self.sampler_timesteps = tuple(float(t) for t in self.sampler_timesteps)  # a recipe gives a list

    def for_model(self, config: WanConfig) -> FinetuneSettings:
        """These settings with `sampler` made concrete from the model's own and the overrides, which it replaces."""
        overrides = {"steps": self.sampler_steps, "timesteps": self.sampler_timesteps, "shift": self.shift, "chunk": self.chunk}
        if self.sampler is None:
            sampler = SamplerSettings.for_model(config, **overrides)
        elif any(v is not None for v in overrides.values()):
            raise MlaconvertError("give the sampler whole or override the model's own (chunk, sampler_steps, ...), not both")
        else:
            sampler = self.sampler
            sampler.check()
        return dataclasses.replace(self, chunk=None, sampler_steps=None, sampler_timesteps=None, shift=None, sampler=sampler)

    def sampler_for(self, frames: int, seed: int) -> SamplerSettings:
        """The sampler for rollouts of `frames`: its window spans the whole clip, so a rollout attends exactly as
        the teacher-forcing forward does."""
        assert self.sampler is not None, "call for_model first"
        return dataclasses.replace(self.sampler, window=max(frames, self.sampler.chunk), seed=seed)

    def run_only(self) -> tuple[str, ...]:
        """Settings that change how a run is carried out but not what it computes; a resume may change them.
        With the long-horizon check, the checkpoints are where it looks, so checkpoint_every is not one."""
        return ("eval_every", "shard") if self.horizon_frames else ("checkpoint_every", "eval_every", "shard")

    def record(self) -> dict[str, Any]:
        """The settings as the report and the checkpoint's fingerprint record them: flat, the sampler resolved."""
        assert self.sampler is not None, "call for_model first"
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sampler"}
        sampler = {"chunk": self.sampler.chunk, "sampler_steps": None, "sampler_timesteps": self.sampler.timesteps,
                   "shift": self.sampler.shift}
        return {**flat, **sampler}


def check_settings(settings: FinetuneSettings, processes: int = 1) -> None:
    """Every option problem is reported before any model is loaded."""
    s = settings
    if s.train not in TRAIN_MODES:
        raise MlaconvertError(f"--train must be one of {', '.join(TRAIN_MODES)} (got '{s.train}')")
    if s.timestep_mode not in TIMESTEP_MODES:
        raise MlaconvertError(f"timestep_mode must be one of {', '.join(TIMESTEP_MODES)} (got '{s.timestep_mode}')")
    positive = {"--max-steps": s.max_steps, "--batch": s.batch, "--accumulate": s.accumulate, "--checkpoint-every": s.checkpoint_every,
                "eval_every": s.eval_every, "--clips": s.clips, "--frames": s.frames, "--height": s.height, "--width": s.width,
                "generate_batch": s.generate_batch}
    for name, value in positive.items():
        if value < 1:
            raise MlaconvertError(f"{name} must be at least 1 (got {value})")
    if s.batch % (processes * s.accumulate):
        raise MlaconvertError(
            f"--batch {s.batch} must divide evenly into {processes} process(es) x --accumulate {s.accumulate} micro-batches"
        )
    if s.shard and s.own_context and processes > 1:
        # Each process rolls out only the own-context rows it holds, a different number of sharded forwards each.
        raise MlaconvertError("--own-context cannot be combined with --shard yet: drop one of them")
    if not 1 <= s.held_out < s.clips:
        raise MlaconvertError(f"held_out ({s.held_out}) must be at least 1 and below --clips ({s.clips})")
    if s.horizon_frames < 0 or s.horizon_clips < 1:
        raise MlaconvertError(f"--horizon-frames must be at least 0 and horizon_clips at least 1 (got {s.horizon_frames}, {s.horizon_clips})")
    if not 0 <= s.context_noise < 1:
        raise MlaconvertError(f"--context-noise is a σ in [0, 1) (got {s.context_noise})")
    if not 0 <= s.own_context <= 1:
        raise MlaconvertError(f"--own-context is a share of the batch in [0, 1] (got {s.own_context})")
    if s.lr <= 0 or s.grad_clip <= 0 or s.weight_decay < 0 or s.warmup < 0 or s.layer_loss_weight < 0:
        raise MlaconvertError("--lr and grad_clip must be positive; weight_decay, warmup and --layer-loss-weight non-negative")


def check_sampler_fit(settings: FinetuneSettings) -> None:
    """What needs the sampler resolved (`for_model`): checked before an earlier run is cleared or a model loaded."""
    s = settings
    assert s.sampler is not None, "call for_model first"
    chunk = s.sampler.chunk
    if s.horizon_frames and s.horizon_frames <= max(chunk, s.frames):
        raise MlaconvertError(f"--horizon-frames {s.horizon_frames} must reach past the training clip (--frames {s.frames}) "
                              f"and the first chunk ({chunk} frames)")
    if s.own_context and s.frames <= chunk:
        raise MlaconvertError(f"--own-context rolls out after the first chunk: --frames {s.frames} must exceed it ({chunk})")
