"""`finetune`: brief data-free distillation of an MLA export from its dense teacher (DESIGN §7).

Objective — causal teacher forcing. A clip of F latent frames is cut into chunks; each chunk is noised to its
own timestep (from the sampler's warped list, or uniformly between its ends), noisy = (1-σ) x0 + σ ε with
σ = t/1000, and attends to the clean earlier chunks in one forward (`model(noisy, t, text, chunk_frames=,
clean=)`, which equals the cached rollout). The student (MLA) matches the teacher's flow prediction v = ε - x0
(MSE), optionally also every layer's self-attention output.

Data, in order of preference: `data` (a folder of safetensors clips), else clips the teacher samples itself
with the streaming sampler — from encoded prompts or seeded random text embeddings — cached on disk once under
a key of everything that determines them, and reused by later runs.

The output folder is the run and the export at once:
    OUT/train_log.jsonl   one row per optimizer step; `eval_loss` at step 0, every `eval_every` steps and the end
    OUT/loss.png          training loss, held-out loss and learning rate
    OUT/checkpoint/       the latest checkpoint (trainable weights, optimizer, scheduler, RNG, data position)
    OUT/data/<key>/       generated clips (unless a cache folder is given)
    OUT/agreement.json    teacher agreement before and after training
    OUT/model.safetensors, config.json, rank_report.json/.png, README.md   — the export, a valid SOURCE

Reproducibility: every random draw of step s (which clips, timesteps, noise) comes from a generator seeded by
(seed, s) and the data position, never from a stream shared across steps, so a resumed run — and a run split
over several processes, each taking its rows of the same global batch — sees exactly what one uninterrupted
process sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from mlaconvert.agreement import teacher_agreement
from mlaconvert.config import WanConfig
from mlaconvert.devices import choose_device
from mlaconvert.errors import MlaconvertError
from mlaconvert.formats import Checkpoint
from mlaconvert.model import WanModel, load_model
from mlaconvert.outputs import atomic_dir, atomic_file, check_writable, write_json
from mlaconvert.sampling import SamplerSettings, check_video_size, rollout, warp_timesteps

TRAIN_MODES = ("mla", "attn", "all")
TIMESTEP_MODES = ("list", "uniform")
LATENTS_KEY, TEXT_KEY = "latents", "prompt_embeds"
LOG_NAME, LOSS_PLOT, AGREEMENT_NAME, CHECKPOINT_DIR = "train_log.jsonl", "loss.png", "agreement.json", "checkpoint"
# Settings that change how a run is carried out but not what it computes; a resume may change them.
RUN_ONLY_SETTINGS = ("checkpoint_every", "eval_every")


@dataclass
class FinetuneSettings:
    """The [finetune] table of a recipe; CLI options override it."""

    max_steps: int = 200  # optimizer steps
    batch: int = 1  # clips per optimizer step, over all processes
    accumulate: int = 1  # micro-batches per step in each process (gradient accumulation)
    lr: float = 1e-4
    warmup: int = 10  # steps of linear warmup, then cosine decay to zero
    weight_decay: float = 0.0  # decay pulls toward zero, not toward the factorised init: off by default
    grad_clip: float = 1.0
    train: str = "mla"  # mla: the new attention tensors; attn: all self-attention; all: everything
    layer_loss_weight: float = 0.0  # weight of the per-layer self-attention-output matching term
    timestep_mode: str = "list"  # list: the sampler's warped timesteps; uniform: uniform between the list's ends
    gradient_checkpointing: bool = True
    checkpoint_every: int = 50
    eval_every: int = 25  # steps between evaluations of the fixed held-out objective (also at the start and end)
    seed: int = 0
    # Teacher-generated data: this many clips, the last `held_out` of them kept for agreement and utilisation.
    clips: int = 16
    held_out: int = 2
    frames: int = 6  # latent frames per clip
    height: int = 128  # pixels (the model's VAE stride makes them latent rows)
    width: int = 128
    generate_batch: int = 4
    # The sampler the student is trained for (chunk, denoising list, shift); None = the model's own (config.json).
    chunk: int | None = None
    sampler_steps: int | None = None  # evenly spaced from 1000; or the list itself in sampler_timesteps
    sampler_timesteps: tuple[float, ...] | None = None
    shift: float | None = None

    def __post_init__(self) -> None:
        if self.sampler_timesteps is not None:
            self.sampler_timesteps = tuple(float(t) for t in self.sampler_timesteps)  # a recipe gives a list

    def for_model(self, config: WanConfig) -> FinetuneSettings:
        """These settings with the sampler made concrete from the model's own defaults (sampler() needs that)."""
        own = SamplerSettings.for_model(
            config, steps=self.sampler_steps, timesteps=self.sampler_timesteps, shift=self.shift, chunk=self.chunk
        )
        return dataclasses.replace(self, chunk=own.chunk, sampler_steps=None, sampler_timesteps=own.timesteps, shift=own.shift)

    def sampler(self, frames: int, seed: int) -> SamplerSettings:
        # The window spans the whole clip, so a rollout attends exactly as the teacher-forcing forward does.
        assert self.chunk is not None and self.sampler_timesteps is not None and self.shift is not None, "call for_model first"
        return SamplerSettings(
            chunk=self.chunk, window=max(frames, self.chunk), timesteps=self.sampler_timesteps, shift=self.shift, seed=seed
        )


@dataclass
class Clips:
    """Clean latent clips and their prompt embeddings, on the CPU in float32."""

    latents: torch.Tensor  # (N, C, F, h, w)
    text: torch.Tensor  # (N, L, text_dim)
    origin: dict[str, Any]  # where they came from: recorded in the report and the run's fingerprint


@dataclass
class FinetuneResult:
    output: Path
    step: int  # optimizer steps done
    exported: bool  # False when stopped early (stop_after)
    final_loss: float | None
    report: dict[str, Any] | None = None  # the export's rank report, with the "finetune" section
    log: list[dict[str, Any]] = field(default_factory=list)


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
    if not 1 <= s.held_out < s.clips:
        raise MlaconvertError(f"held_out ({s.held_out}) must be at least 1 and below --clips ({s.clips})")
    if s.lr <= 0 or s.grad_clip <= 0 or s.weight_decay < 0 or s.warmup < 0 or s.layer_loss_weight < 0:
        raise MlaconvertError("--lr and grad_clip must be positive; weight_decay, warmup and --layer-loss-weight non-negative")


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor of every training recipe here: linear warmup, then cosine decay to zero at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(1, total - warmup), 1.0)))


def derived_seed(seed: int, purpose: str, index: int) -> int:
    """The seed of one draw (a step's noise, an epoch's order, a batch of generated clips), independent of
    every other draw, so no draw depends on how many came before it in this process."""
    digest = hashlib.sha256(f"{seed}/{purpose}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # manual_seed takes up to 2**63


# --------------------------------------------------------------------------------------------------------------
# Models


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


def _dense_mismatch(student: WanConfig, teacher: WanConfig) -> list[str]:
    return [
        f"{f.name} {getattr(teacher, f.name)} vs {getattr(student, f.name)}"
        for f in dataclasses.fields(WanConfig)
        if f.name not in ("mla", "text_len") and getattr(teacher, f.name) != getattr(student, f.name)
    ]


def load_pair(model: str, teacher: str | None = None) -> tuple[Checkpoint, Checkpoint]:
    """The MLA student and its dense teacher (by default the source the export records), checked to match."""
    from mlaconvert.hub import load_source

    student = load_source(model)
    if not student.config.is_mla:
        raise MlaconvertError(f"'{model}' is a dense model; finetune needs an MLA export written by `mlaconvert convert`")
    teacher = teacher or student.config.mla.source.get("repo")
    if not teacher:
        raise MlaconvertError(f"the export '{model}' records no source model; name the dense teacher with --teacher")
    dense = load_source(teacher, head_dim=student.config.head_dim)
    if dense.config.is_mla:
        raise MlaconvertError(f"the teacher '{teacher}' is an MLA export; it must be the dense source model")
    mismatch = _dense_mismatch(student.config, dense.config)
    if mismatch:
        raise MlaconvertError(f"the teacher '{teacher}' does not match the student (teacher vs student): {', '.join(mismatch)}")
    if dense.info.get("config_inferred"):
        # A bare .pt carries no config: its shapes agree with the student's, whose other fields are the source's.
        dense.config = student.config.replace(mla=None)
    return student, dense


def _set_trainable(model: WanModel, mode: str) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    chosen = set(trainable_names(model.config, names, mode))
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return [n for n in names if n in chosen]


# --------------------------------------------------------------------------------------------------------------
# Data


def _check_clips(latents: torch.Tensor, text: torch.Tensor, config: WanConfig, chunk: int, where: str) -> None:
    pt, ph, pw = config.patch_size
    if latents.ndim != 5 or latents.shape[1] != config.in_dim:
        raise MlaconvertError(
            f"{where}: clips must be (clips, {config.in_dim} channels, frames, height, width), got {tuple(latents.shape)}"
        )
    _, _, frames, h, w = latents.shape
    if frames < chunk or frames % pt or h % ph or w % pw:
        raise MlaconvertError(
            f"{where}: clip size {frames}x{h}x{w} needs at least --chunk {chunk} frames and a size divisible by the patch {pt}x{ph}x{pw}"
        )
    if text.ndim != 3 or text.shape[0] != latents.shape[0] or text.shape[2] != config.text_dim:
        raise MlaconvertError(
            f"{where}: prompt embeddings must be ({latents.shape[0]} clips, tokens, {config.text_dim}), got {tuple(text.shape)}"
        )


def load_clips(folder: str | Path, config: WanConfig, chunk: int) -> Clips:
    """Every `*.safetensors` in `folder` (sorted by name): `latents` (n, C, F, h, w) and `prompt_embeds` (n, L, D)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise MlaconvertError(f"no clips in '{folder}': expected *.safetensors files with '{LATENTS_KEY}' and '{TEXT_KEY}'")
    latents, text = [], []
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                missing = {LATENTS_KEY, TEXT_KEY} - set(f.keys())
                if missing:
                    raise MlaconvertError(f"'{path}' has no {' or '.join(sorted(missing))} tensor")
                lat, txt = f.get_tensor(LATENTS_KEY).float(), f.get_tensor(TEXT_KEY).float()
        except SafetensorError as e:
            raise MlaconvertError(f"'{path}' is not a readable safetensors file: {e}") from e
        _check_clips(lat, txt, config, chunk, str(path))
        if latents and (lat.shape[1:] != latents[0].shape[1:] or txt.shape[1:] != text[0].shape[1:]):
            raise MlaconvertError(f"'{path}': clip or prompt size differs from '{files[0]}'; all clips must share one size")
        latents.append(lat)
        text.append(txt)
    origin = {"kind": "data", "folder": str(folder), "files": [p.name for p in files], "sha256": _files_sha256(files)}
    return Clips(torch.cat(latents), torch.cat(text), origin)


def _files_sha256(files: list[Path]) -> str:
    from mlaconvert.convert import weights_sha256

    return weights_sha256(files) or ""


def world_clips(config: WanConfig, count: int, frames: int, seed: int) -> Clips:
    """Clips of the world the model was trained on, captioned: for it, the truth is cheaper and better than rollouts."""
    from mlaconvert import world

    assert config.world is not None
    video, captions, _ = world.clips(count, frames, seed, config.world)
    text = world.embed_captions(captions, config.text_len, config.text_dim)
    return Clips(video, text, {"kind": "world", "seed": seed, "world": dataclasses.asdict(config.world)})


def _save_clips(path: Path, clips: Clips) -> None:
    with atomic_file(path) as tmp:
        save_file({LATENTS_KEY: clips.latents.contiguous(), TEXT_KEY: clips.text.contiguous()}, tmp,
                  metadata={"origin": json.dumps(clips.origin)})


def _prompt_text(settings: FinetuneSettings, config: WanConfig, prompts: list[str] | None, encoder: str | None,
                 device: torch.device) -> torch.Tensor:
    """One embedding per clip: the prompts cycled, encoded; or seeded random stand-ins."""
    if not prompts:
        from mlaconvert.text import random_prompt_embeds

        return random_prompt_embeds(settings.clips, config.text_len, config.text_dim, settings.seed)
    from mlaconvert.text import DEFAULT_ENCODER, encode_prompts

    cycled = [prompts[i % len(prompts)] for i in range(settings.clips)]
    embeds = encode_prompts(cycled, encoder or DEFAULT_ENCODER, device=device, text_len=config.text_len)
    if embeds.shape[-1] != config.text_dim:
        raise MlaconvertError(f"the text encoder gives {embeds.shape[-1]}-wide embeddings but the model takes {config.text_dim}")
    return embeds.float().cpu()


def generation_key(settings: FinetuneSettings, teacher_sha: str, prompts: list[str] | None) -> str:
    """Names the cached clips by everything that determines them."""
    s = settings
    what = {
        "teacher": teacher_sha, "prompts": prompts, "clips": s.clips, "size": [s.frames, s.height, s.width],
        "generate_batch": s.generate_batch, "seed": s.seed, "chunk": s.chunk, "steps": list(s.sampler_timesteps), "shift": s.shift,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def generate_clips(
    teacher: WanModel,
    settings: FinetuneSettings,
    text: torch.Tensor,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The teacher's own rollouts for `text` (one clip per embedding), `generate_batch` at a time."""
    s = settings
    out = []
    for i, start in enumerate(range(0, text.shape[0], s.generate_batch)):
        sampler = s.sampler(s.frames, seed=derived_seed(s.seed, "generate", i))
        part = text[start : start + s.generate_batch]
        latent_size = check_video_size(s.height, s.width, teacher.config)
        out.append(rollout(teacher, part, frames=s.frames, latent_size=latent_size, settings=sampler).latents)
        if on_batch is not None:
            on_batch(start + part.shape[0])
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------------------
# Objective


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
        handles = [b.self_attn.register_forward_hook(lambda _m, _a, y: self.outputs.append(y)) for b in self.model.blocks] if on else []
        try:
            yield
        finally:
            for h in handles:
                h.remove()


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
    chunk: int,
    layer_loss_weight: float = 0.0,
    student_attn: AttentionOutputs | None = None,
    teacher_attn: AttentionOutputs | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Teacher-forcing distillation loss on one micro-batch, and its parts (detached); timesteps (B, F) per frame.

    The layer term is each layer's self-attention-output MSE relative to the teacher's mean square, averaged
    over layers: deep layers have larger activations, and the relative form keeps one weight meaningful for all.
    """
    noisy = noised(clean, noise, timesteps)
    layers = layer_loss_weight > 0
    with torch.no_grad(), (teacher_attn.recording(layers) if teacher_attn else contextlib.nullcontext()):
        target = teacher(noisy, timesteps, text, chunk_frames=chunk, clean=clean)
    with student_attn.recording(layers) if student_attn else contextlib.nullcontext():
        flow = student(noisy, timesteps, text, chunk_frames=chunk, clean=clean)
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


def chunk_timesteps(settings: FinetuneSettings, rows: int, frames: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, frames) timesteps: one per chunk, from the warped list or uniformly between its ends."""
    steps = torch.tensor(warp_timesteps(settings.sampler_timesteps, settings.shift))
    chunks = math.ceil(frames / settings.chunk)
    if settings.timestep_mode == "list":
        t = steps[torch.randint(len(steps), (rows, chunks), generator=generator)]
    else:
        low, high = float(steps.min()), float(steps.max())
        t = low + (high - low) * torch.rand(rows, chunks, generator=generator)
    return t.repeat_interleave(settings.chunk, dim=1)[:, :frames]


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
    _set_trainable(student, settings.train)
    teacher.requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        loss, _ = distill_loss(student, teacher, clean, text, clean, t, chunk=settings.chunk, layer_loss_weight=settings.layer_loss_weight,
                               student_attn=AttentionOutputs(student), teacher_attn=AttentionOutputs(teacher))
        loss.backward()
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------------------------------
# Processes


@dataclass
class Processes:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # this call initialised the process group, so it tears it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _processes(device: str | None) -> Processes:
    """One process, or one of WORLD_SIZE started by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = choose_device(device)
    cuda = chosen.type == "cuda"
    if world == 1:
        return Processes(0, 1, chosen, False)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        # Rank 0 alone generates the teacher's clips while the others wait at a barrier: allow it hours, not
        # the default minutes.
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None, timeout=timedelta(hours=3))
    return Processes(dist.get_rank(), dist.get_world_size(), dev, owns)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # weights_only loading accepts tensors, not numpy arrays.
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fingerprint_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    diff = [k for k in sorted(set(saved) | set(current)) if k != "settings" and saved.get(k) != current.get(k)]
    s, c = saved.get("settings", {}), current.get("settings", {})
    return diff + [k for k in sorted(set(s) | set(c)) if s.get(k) != c.get(k)]


# --------------------------------------------------------------------------------------------------------------
# The run


class Trainer:
    """Student, teacher, optimizer and schedule of one run; `step` does one optimizer step over the global batch."""

    def __init__(self, student: WanModel, teacher: WanModel, clips: Clips, settings: FinetuneSettings, procs: Processes):
        self.settings, self.procs, self.clips = settings, procs, clips
        self.student, self.teacher = student, teacher
        self.trained = _set_trainable(student, settings.train)
        teacher.requires_grad_(False)
        student.gradient_checkpointing = settings.gradient_checkpointing
        self.module: nn.Module = student
        if procs.world > 1:
            ids = [procs.device.index] if procs.device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(student, device_ids=ids)
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, settings.warmup, settings.max_steps))
        self.student_attn, self.teacher_attn = AttentionOutputs(student), AttentionOutputs(teacher)
        self.train_count = clips.latents.shape[0] - settings.held_out
        self.step_count = 0
        self.data_position = 0  # clips drawn so far from the stream of shuffled epochs
        cuda = procs.device.type == "cuda"
        # bf16 compute with fp32 master weights on CUDA; plain fp32 on the CPU.
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def _clip_indices(self, position: int, count: int) -> torch.Tensor:
        """Clips `position .. position+count` of the stream: each epoch a fresh seeded permutation."""
        n, orders, out = self.train_count, {}, []
        for p in range(position, position + count):
            epoch = p // n
            if epoch not in orders:
                generator = torch.Generator().manual_seed(derived_seed(self.settings.seed, "epoch", epoch))
                orders[epoch] = torch.randperm(n, generator=generator)
            out.append(int(orders[epoch][p % n]))
        return torch.tensor(out)

    def step(self) -> dict[str, Any]:
        s, procs = self.settings, self.procs
        tic = time.perf_counter()
        generator = torch.Generator().manual_seed(derived_seed(s.seed, "step", self.step_count))
        index = self._clip_indices(self.data_position, s.batch)
        clean = self.clips.latents[index]
        frames = clean.shape[2]
        timesteps = chunk_timesteps(s, s.batch, frames, generator)
        noise = torch.randn(clean.shape, generator=generator)
        text = self.clips.text[index]
        per_rank = s.batch // procs.world
        micro = per_rank // s.accumulate
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for a in range(s.accumulate):
            rows = slice(procs.rank * per_rank + a * micro, procs.rank * per_rank + (a + 1) * micro)
            last = a == s.accumulate - 1
            sync = contextlib.nullcontext() if last or procs.world == 1 else self.module.no_sync()
            with sync:
                with self.autocast:
                    loss, parts = distill_loss(
                        self.module, self.teacher, *(x[rows].to(procs.device) for x in (clean, text, noise, timesteps)),
                        chunk=s.chunk, layer_loss_weight=s.layer_loss_weight,
                        student_attn=self.student_attn, teacher_attn=self.teacher_attn,
                    )
                # Mean over the global batch: each micro-batch weighs 1/accumulate here, DDP averages the ranks.
                (loss / s.accumulate).backward()
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / s.accumulate
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        for block in self.student.blocks:
            block.self_attn.project_key_form()
        self.scheduler.step()
        stats = torch.tensor(list(sums.values()), dtype=torch.float64, device=procs.device)  # nccl reduces on the GPU
        if procs.world > 1:
            dist.all_reduce(stats)
            stats /= procs.world
        self.step_count += 1
        self.data_position += s.batch
        seconds = time.perf_counter() - tic  # reading the losses back waited for the device
        # Tokens the student processes: each clip runs twice, clean (context) and noisy.
        tokens = s.batch * 2 * clean[0, 0].numel() // math.prod(self.student.config.patch_size)
        row = {"step": self.step_count, **dict(zip(sums, stats.tolist())), "lr": lr, "grad_norm": float(grad_norm),
               "tokens_per_s": tokens / seconds, "seconds": seconds}
        if procs.device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(procs.device) / 2**30
        return row

    @torch.no_grad()
    def held_out_loss(self) -> float:
        """The objective on the held-out clips with noise and timesteps drawn once for the run: unlike the
        training loss, a fresh draw each step, its rows differ only by the weights, so they can be compared."""
        s = self.settings
        clean, text = self.clips.latents[-s.held_out :], self.clips.text[-s.held_out :]
        generator = torch.Generator().manual_seed(derived_seed(s.seed, "eval", 0))
        timesteps = chunk_timesteps(s, clean.shape[0], clean.shape[2], generator)
        noise = torch.randn(clean.shape, generator=generator)
        micro = max(1, s.batch // (self.procs.world * s.accumulate))  # no more memory than a training micro-batch
        total = 0.0
        for start in range(0, clean.shape[0], micro):
            part = [x[start : start + micro].to(self.procs.device) for x in (clean, text, noise, timesteps)]
            with self.autocast:
                loss, _ = distill_loss(self.student, self.teacher, *part, chunk=s.chunk, layer_loss_weight=s.layer_loss_weight,
                                       student_attn=self.student_attn, teacher_attn=self.teacher_attn)
            total += float(loss) * part[0].shape[0]
        return total / clean.shape[0]

    def save(self, folder: Path, fingerprint: dict[str, Any], before: dict[str, Any]) -> None:
        """The latest checkpoint, replacing the previous one atomically."""
        state = {
            "step": self.step_count,
            "data_position": self.data_position,
            "params": {n: p.detach().cpu() for n, p in self.student.named_parameters() if p.requires_grad},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
        }
        with atomic_dir(folder, force=True) as tmp:
            torch.save(state, tmp / "state.pt")
            write_json(tmp / "run.json", {"step": self.step_count, "fingerprint": fingerprint, "before": before})

    def load(self, folder: Path) -> None:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        params = dict(self.student.named_parameters())
        with torch.no_grad():
            for name, value in state["params"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.step_count, self.data_position = state["step"], state["data_position"]


def _read_run(folder: Path) -> dict[str, Any]:
    path = folder / CHECKPOINT_DIR / "run.json"
    if not path.is_file() or not (folder / CHECKPOINT_DIR / "state.pt").is_file():
        raise MlaconvertError(f"nothing to resume in '{folder}': it has no {CHECKPOINT_DIR}/ from an earlier finetune run")
    return json.loads(path.read_text())


def _prepare_output(output: Path, *, force: bool, resume: bool) -> None:
    if resume and force:
        raise MlaconvertError("--resume continues the run in the output folder and --force starts it over: pass one")
    if resume:
        _read_run(output)
        return
    if not force and (output / CHECKPOINT_DIR / "state.pt").is_file():
        raise MlaconvertError(f"'{output}' already holds a finetune run: pass --resume to continue it from its checkpoint, or --force to start over")
    check_writable(output, force)
    if output.exists():
        # Starting over: the earlier run's state goes; its cached clips stay (they are keyed by what made them).
        for name in (LOG_NAME, LOSS_PLOT, AGREEMENT_NAME):
            (output / name).unlink(missing_ok=True)
        shutil.rmtree(output / CHECKPOINT_DIR, ignore_errors=True)


def _trim_log(path: Path, step: int) -> list[dict[str, Any]]:
    """The log up to `step`; rows of steps after the checkpoint were lost with the killed run and are redone."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    rows = [r for r in rows if r["step"] <= step]
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _training_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of optimizer steps (the step-0 row holds only the held-out loss before training)."""
    return [r for r in rows if "loss" in r]


def plot_loss(rows: list[dict[str, Any]], path: Path) -> None:
    """The log's picture as a PNG (see `loss_figure`)."""
    with atomic_file(path) as tmp:
        loss_figure(rows).savefig(tmp, format="png", dpi=100)


def loss_figure(rows: list[dict[str, Any]]) -> Any:
    """Training loss and the held-out loss (log scale) and the learning rate against the step."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    train, held = _training_rows(rows), [r for r in rows if "eval_loss" in r]
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["loss"] for r in train], label="training loss (fresh batch each step)")
    if train and "layer_loss" in train[0]:
        ax.plot(steps, [r["flow_loss"] for r in train], label="flow loss", alpha=0.7)
    ax.plot([r["step"] for r in held], [r["eval_loss"] for r in held], "o-", color="tab:red", markersize=4,
            label="held-out loss (fixed clips, noise, timesteps)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in train], color="grey", linestyle=":", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    # One legend for both axes, below the plot, where it hides no curve.
    handles = [h for a in (ax, lr_ax) for h in a.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize="small")
    fig.suptitle("finetune: student vs teacher")
    return fig


@torch.no_grad()
def held_out_latents(model: WanModel, clips: torch.Tensor, text: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """Per layer, the latents c the cache would hold for the held-out clips: kv_down of the clean (t = 0) tokens."""
    device = next(model.parameters()).device
    found: list[torch.Tensor] = []
    handles = [b.self_attn.kv_down.register_forward_hook(lambda _m, _a, y: found.append(y)) for b in model.blocks]
    try:
        clean = clips.to(device)
        t = torch.zeros(clean.shape[0], clean.shape[2], device=device)
        model(clean, t, text.to(device), chunk_frames=chunk, clean=clean)
    finally:
        for h in handles:
            h.remove()
    # The teacher-forcing forward runs the clean copy first: the first half of each layer's tokens.
    return [c[:, : c.shape[1] // 2].reshape(-1, c.shape[-1]).float().cpu() for c in found]


def _evaluate(student: WanModel, teacher: WanModel, clips: Clips, settings: FinetuneSettings, autocast: Any) -> dict[str, Any]:
    """Teacher agreement and rank utilisation (weights and held-out latents) of the student as it is now."""
    from mlaconvert.spectra import mla_utilisation

    latents, text = clips.latents[-settings.held_out :], clips.text[-settings.held_out :]
    with autocast:
        agreement = teacher_agreement(student, teacher, latents, text, settings=settings.sampler(latents.shape[2], settings.seed),
                                      seed=settings.seed)
        cached = held_out_latents(student, latents, text, settings.chunk)
    utilisation = []
    for i, c in enumerate(cached):
        prefix = f"blocks.{i}.self_attn."
        weights = {n[len(prefix):]: p.detach().float().cpu() for n, p in student.named_parameters() if n.startswith(prefix)}
        utilisation.append(mla_utilisation(weights, latents=c))
    return {"agreement": agreement, "utilisation": utilisation}


def _publish(output: Path, config: WanConfig, state: dict[str, torch.Tensor], report: dict[str, Any]) -> None:
    """Write the export into the run folder: written whole beside it, then moved in file by file.

    The run folder holds the log and checkpoint, so it cannot be swapped as a whole; each file replaces its
    predecessor atomically, and the final checkpoint was saved first, so a crash here is mended by --resume.
    """
    from mlaconvert.export import write_export

    staging = output.with_name(f".{output.name}.export-{os.getpid()}")
    write_export(staging, config, state, report, force=True)
    fresh = {p.name for p in staging.iterdir()}
    for old in output.glob("model*.safetensors*"):
        if old.name not in fresh:  # shards of an earlier, differently split export
            old.unlink()
    for path in staging.iterdir():
        os.replace(path, output / path.name)
    staging.rmdir()


def finetune(
    model: str,
    output: str | Path,
    settings: FinetuneSettings,
    *,
    teacher: str | None = None,
    data: str | Path | None = None,
    prompts: list[str] | None = None,
    encoder: str | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    resume: bool = False,
    force: bool = False,
    stop_after: int | None = None,
    show_progress: bool = True,
) -> FinetuneResult:
    """Distil the MLA export `model` from its dense teacher and write the fine-tuned export into `output`.

    Under torchrun (WORLD_SIZE > 1) every process calls this; each takes its rows of the global batch and only
    rank 0 writes. `stop_after` ends the run after that many steps without exporting, as a kill would (the
    checkpoints written so far stay): for time-boxed jobs and for testing --resume.
    """
    output = Path(output)
    procs = _processes(device)
    try:
        check_settings(settings, procs.world)
        try:
            return _run(model, output, settings, procs, teacher=teacher, data=data, prompts=prompts, encoder=encoder,
                        cache_dir=cache_dir, resume=resume, force=force, stop_after=stop_after, show_progress=show_progress)
        except torch.OutOfMemoryError:
            raise MlaconvertError(
                f"out of GPU memory on {procs.device} (batch {settings.batch}, clip {settings.frames}x{settings.height}x{settings.width}, "
                f"--train {settings.train}): try --train mla, --accumulate to split the batch, a smaller clip (--frames/--height/--width), "
                "and keep gradient checkpointing on"
            ) from None
    finally:
        if procs.owns_group:
            dist.destroy_process_group()


def _training_clips(settings: FinetuneSettings, config: WanConfig, teacher: WanModel, teacher_sha: str, procs: Processes,
                    progress: Any, *, output: Path, data: str | Path | None, prompts: list[str] | None, encoder: str | None,
                    cache_dir: str | Path | None) -> Clips:
    """The user's clips; for a model of the built-in world, fresh clips of that world (its truth, with captions);
    else the teacher's: generated by rank 0 unless cached, then read by every process."""
    if data is not None:
        clips = load_clips(data, config, settings.chunk)
    elif config.world is not None:
        clips = world_clips(config, settings.clips, settings.frames, derived_seed(settings.seed, "world", 0))
    else:
        key = generation_key(settings, teacher_sha, prompts)
        path = Path(cache_dir or output / "data") / key / "clips.safetensors"
        if procs.main and not path.is_file():
            task = progress.add_task("generate", total=settings.clips, info="teacher rollouts")
            text = _prompt_text(settings, config, prompts, encoder, procs.device)
            latents = generate_clips(teacher, settings, text, on_batch=lambda n: progress.update(task, completed=n))
            origin = {"kind": "generated", "key": key, "text": "prompts" if prompts else "random", "prompts": prompts}
            _save_clips(path, Clips(latents, text, origin))  # the origin goes into the file's metadata, for people
        procs.barrier()
        clips = load_clips(path.parent, config, settings.chunk)
        clips.origin = {"kind": "generated", "key": key, "folder": str(path.parent)}
    if clips.latents.shape[0] <= settings.held_out:
        raise MlaconvertError(f"{clips.latents.shape[0]} clips leave none for training after {settings.held_out} held out")
    return clips


def _finetune_report(trainer: Trainer, all_rows: list[dict[str, Any]], before: dict[str, Any], after: dict[str, Any],
                     teacher: Checkpoint, teacher_sha: str) -> dict[str, Any]:
    """The "finetune" section of the export's rank report."""
    settings, clips = trainer.settings, trainer.clips
    rows = _training_rows(all_rows)
    tail = rows[-10:]  # the mean over the last steps leaves out the first steps' warm-up
    clip_size = tuple(clips.latents.shape[2:])
    return {
        "teacher": {"source": teacher.info.get("spec"), "sha256": teacher_sha},
        "settings": dataclasses.asdict(settings),
        "data": {**clips.origin, "clips": clips.latents.shape[0], "held_out": settings.held_out, "clip_size": list(clip_size)},
        "steps": trainer.step_count,
        "trained_tensors": len(trainer.trained),
        "trained_parameters": sum(p.numel() for p in trainer.params),
        "processes": trainer.procs.world,
        "device": str(trainer.procs.device),
        "final_loss": rows[-1]["loss"] if rows else None,
        "eval_loss": [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in all_rows if "eval_loss" in r],
        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in tail])) if tail else None,
        "model_flops_per_step": settings.batch * count_step_flops(trainer.student.config, settings, clip_size[0], clip_size[1:]),
        "before": before,
        "after": after,
    }


def _run(model: str, output: Path, settings: FinetuneSettings, procs: Processes, *, teacher: str | None, data: str | Path | None,
         prompts: list[str] | None, encoder: str | None, cache_dir: str | Path | None, resume: bool, force: bool,
         stop_after: int | None, show_progress: bool) -> FinetuneResult:
    from rich.progress import TextColumn

    from mlaconvert.progress import progress_bar

    from mlaconvert.convert import weights_sha256
    from mlaconvert.rank import build_report

    if procs.main:
        _prepare_output(output, force=force, resume=resume)
    procs.barrier()
    student_ckpt, teacher_ckpt = load_pair(model, teacher)
    config, dev = student_ckpt.config, procs.device
    settings = settings.for_model(config)
    dtypes = {k: v.dtype for k, v in student_ckpt.state_dict.items()}
    # load_model keeps the given tensors on the CPU: train on copies (fp32 master weights).
    student = load_model(config, {k: v.to(torch.float32, copy=True) for k, v in student_ckpt.state_dict.items()}, device=dev)
    teacher_model = load_model(teacher_ckpt.config, teacher_ckpt.state_dict, device=dev,
                               dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    teacher_sha = weights_sha256(teacher_ckpt.files) or ""

    progress = progress_bar(TextColumn("{task.fields[info]}"), disable=not (show_progress and procs.main))
    with progress:
        clips = _training_clips(settings, config, teacher_model, teacher_sha, procs, progress, output=output, data=data,
                                prompts=prompts, encoder=encoder, cache_dir=cache_dir)
        fingerprint = {
            "model": weights_sha256(student_ckpt.files), "teacher": teacher_sha, "config": config.to_dict(),
            "data": {k: v for k, v in clips.origin.items() if k != "folder"},
            "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k not in RUN_ONLY_SETTINGS},
        }
        fingerprint = json.loads(json.dumps(fingerprint))  # tuples as lists, as the saved copy reads back
        trainer = Trainer(student, teacher_model, clips, settings, procs)
        log_path, checkpoint_dir = output / LOG_NAME, output / CHECKPOINT_DIR
        if resume:
            run = _read_run(output)
            diff = _fingerprint_diff(run["fingerprint"], fingerprint)
            if diff:
                raise MlaconvertError(
                    f"the checkpoint in '{checkpoint_dir}' is from another run ({', '.join(diff)} differ); "
                    "resume with the same model, teacher, data and settings, or pass --force to start over"
                )
            trainer.load(checkpoint_dir)
            before = run["before"]
        else:
            before = _evaluate(student, teacher_model, clips, settings, trainer.autocast) if procs.main else {}
        rows = _trim_log(log_path, trainer.step_count) if procs.main else []
        procs.barrier()

        task = progress.add_task("finetune", total=settings.max_steps, completed=trainer.step_count, info="")
        with open(log_path, "a") if procs.main else contextlib.nullcontext() as log:
            if procs.main and not rows:
                rows.append({"step": 0, "eval_loss": trainer.held_out_loss()})
                log.write(json.dumps(rows[0]) + "\n")
            while trainer.step_count < settings.max_steps:
                if stop_after is not None and trainer.step_count >= stop_after:
                    done = _training_rows(rows)
                    return FinetuneResult(output, trainer.step_count, False, done[-1]["loss"] if done else None, log=rows)
                row = trainer.step()
                if procs.main:
                    if row["step"] % settings.eval_every == 0 or row["step"] == settings.max_steps:
                        row["eval_loss"] = trainer.held_out_loss()
                    rows.append(row)
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    progress.update(task, completed=row["step"], info=f"loss {row['loss']:.4g}  {row['tokens_per_s']:,.0f} tok/s")
                if row["step"] % settings.checkpoint_every == 0 or row["step"] == settings.max_steps:
                    if procs.main:
                        trainer.save(checkpoint_dir, fingerprint, before)
                        plot_loss(rows, output / LOSS_PLOT)
                    procs.barrier()

    if not procs.main:
        procs.barrier()  # rank 0 evaluates and writes the export
        return FinetuneResult(output, trainer.step_count, True, None)
    after = _evaluate(student, teacher_model, clips, settings, trainer.autocast)
    state = {k: v.detach().to("cpu", dtypes[k]) for k, v in student.state_dict().items()}
    report = build_report(config, state, source_info=student_ckpt.info)
    for entry, utilisation in zip(report["layers"], after["utilisation"], strict=True):
        entry["mla"]["utilisation"] = utilisation
    report["summary"]["mean_utilisation"]["latents"] = float(np.mean([u["latents"]["utilisation"] for u in after["utilisation"]]))
    report["export"] = str(output)
    report["finetune"] = _finetune_report(trainer, rows, before, after, teacher_ckpt, teacher_sha)
    write_json(output / AGREEMENT_NAME, {"before": before["agreement"], "after": after["agreement"]})
    _publish(output, config, state, report)
    procs.barrier()
    return FinetuneResult(output, trainer.step_count, True, report["finetune"]["final_loss"], report=report, log=rows)
