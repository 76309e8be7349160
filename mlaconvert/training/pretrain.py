"""`pretrain`: train the built-in world model from scratch (DESIGN §9) — a single-device recipe, top to bottom.

Data: every step draws fresh clips of the bouncing-balls world (`world.py`), seeded by (seed, step), rendered on
the training device; there are no files and no epochs. Captions go through the world's caption embedder.

Objective: flow matching on the ground truth with clean-context teacher forcing through the block-causal mask,
the forward that `finetune` uses and that the cached rollout computes chunk by chunk. Each chunk of a clip is
noised to its own σ ~ U(0, 1), x_σ = (1-σ) x + σ ε, and the model predicts v = ε - x while attending to the
earlier chunks of the clean clip. At sampling time that context is the model's own output, never the truth; to
make it robust to its own mistakes the context is itself lightly noised during training (σ_ctx ~ U(0,
context_noise) per chunk) while still presented at t = 0, and for the last `own_context_steps` steps the
context of a share of the clips (`own_context_share`) is the model's own cached rollout after the clip's true
first chunk (Self-Forcing's idea, with the truth as target): the model learns to continue, and to correct, what
it will really see when it samples, while the clips that keep the true context keep it sharp — with every clip's
context its own rollout, the truth a rollout has drifted from teaches the model to hedge.

The output folder is the run and the model at once:
    OUT/train_log.jsonl        one row per step (loss, lr, grad norm, rate), eval_loss every eval_every steps
    OUT/loss.png               training and held-out loss
    OUT/checkpoint/            the latest checkpoint: weights, optimizer, schedule (resume with resume=True)
    OUT/config.json, OUT/diffusion_pytorch_model.safetensors (bf16), OUT/README.md   — the model, a valid SOURCE
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlaconvert.devices import choose_device, held_memory, job_peak_gib
from mlaconvert.errors import MlaconvertError
from mlaconvert.evaluation import world
from mlaconvert.fields import setting
from mlaconvert.inference.sampling import SamplerSettings
from mlaconvert.modeling.config import SamplerDefaults, WanConfig
from mlaconvert.modeling.model import WanModel
from mlaconvert.outputs import atomic_dir, check_writable, write_json
from mlaconvert.training.objective import chunk_sigmas, noised, own_continuation
from mlaconvert.training.training_run import CHECKPOINT_DIR, LOG_NAME, LOSS_PLOT, derived_seed, trim_log, warmup_cosine

# The built-in world model: Wan's architecture at a size that trains in minutes on one GPU and ships in ~14 MB.
WORLD_MODEL = WanConfig(
    dim=256, ffn_dim=1024, num_heads=4, num_layers=6, in_dim=3, out_dim=3, text_dim=32, text_len=16, freq_dim=64,
    vae_stride=(1, 1, 1), text_encoder="captions", world=world.WorldSettings(),
    sampler=SamplerDefaults(steps=8, shift=1.0, chunk=3, window=21, sink=3),
)


@dataclass
class PretrainSettings:
    """The [pretrain] table of a recipe; its [pretrain.model] table overrides fields of WORLD_MODEL."""

    max_steps: int = setting(3000, "Optimizer steps.")
    batch: int = 16  # clips per step
    frames: int = 21  # frames per training clip (pixels: one latent frame per video frame)
    lr: float = 3e-4
    warmup: int = 200  # steps of linear warmup, then cosine decay to zero
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    context_noise: float = 0.1  # largest σ of the noise put on the clean context
    own_context_steps: int = 0  # the last steps, whose context is the model's own rollout, not the true clip
    own_context_share: float = 1.0  # the share of those steps' clips that get it; the rest keep the true context
    init: str = setting("", "SOURCE whose weights the run starts from, a model of this config (default: random weights).")
    eval_every: int = 250  # steps between held-out losses
    eval_clips: int = 16
    checkpoint_every: int = 250
    seed: int = 0
    compile: bool = True  # torch.compile the blocks on CUDA
    model: WanConfig = field(default_factory=lambda: WORLD_MODEL)

    def check(self) -> None:
        positive = {"max_steps": self.max_steps, "batch": self.batch, "eval_every": self.eval_every,
                    "eval_clips": self.eval_clips, "checkpoint_every": self.checkpoint_every, "frames": self.frames}
        for name, value in positive.items():
            if value < 1:
                raise MlaconvertError(f"{name} must be at least 1 (got {value})")
        if self.model.world is None or self.model.text_encoder != "captions":
            raise MlaconvertError("pretrain trains a world model: its config needs a world and the captions text encoder")
        if self.frames < self.model.sampler.chunk or not 0 <= self.context_noise < 1 or self.lr <= 0:
            raise MlaconvertError("frames must hold a chunk, context_noise lie in [0, 1) and lr be positive")
        if not 0 <= self.own_context_steps <= self.max_steps:
            raise MlaconvertError(f"own_context_steps must lie in [0, max_steps] (got {self.own_context_steps})")
        if not 0 < self.own_context_share <= 1 or self.own_context_rows < 1:
            raise MlaconvertError(f"own_context_share must give at least one clip of a batch of {self.batch} and lie in "
                                  f"(0, 1] (got {self.own_context_share})")

    @property
    def own_context_rows(self) -> int:
        return round(self.own_context_share * self.batch)


@dataclass
class Batch:
    clean: torch.Tensor  # (B, 3, F, size, size)
    text: torch.Tensor  # (B, text_len, text_dim)
    noise: torch.Tensor
    timesteps: torch.Tensor  # (B, F), per chunk
    context_noise: torch.Tensor
    context_timesteps: torch.Tensor  # (B, F), per chunk: how much noise the context carries
    context: torch.Tensor  # the frames the model sees as context (the clean clip, lightly noised)

    def with_context(self, frames: torch.Tensor) -> Batch:
        """The same batch whose first clips see other context frames (e.g. the model's own rollout), noised as the
        clean clip was; the clips after them keep theirs."""
        rows = len(frames)
        own = noised(frames, self.context_noise[:rows], self.context_timesteps[:rows])
        return dataclasses.replace(self, context=torch.cat([own, self.context[rows:]]))

    def head(self, rows: int) -> Batch:
        """The first `rows` clips."""
        return Batch(*(getattr(self, f.name)[:rows] for f in dataclasses.fields(self)))


def make_batch(settings: PretrainSettings, rows: int, seed: int, device: torch.device, context_noise: float) -> Batch:
    """Fresh world clips and every random draw of one step, all from `seed`: the same on any device."""
    cfg, chunk = settings.model, settings.model.sampler.chunk
    clean, caps, _ = world.clips(rows, settings.frames, seed, cfg.world, device)
    text = world.embed_captions(caps, cfg.text_len, cfg.text_dim).to(device)
    g = torch.Generator().manual_seed(seed)
    sigma = chunk_sigmas(chunk, rows, settings.frames, g)
    noise = torch.randn(clean.shape, generator=g)
    ctx_sigma = chunk_sigmas(chunk, rows, settings.frames, g) * context_noise
    ctx_noise = torch.randn(clean.shape, generator=g)
    ctx_noise, ctx_timesteps = ctx_noise.to(device), (ctx_sigma * 1000).to(device)
    context = noised(clean, ctx_noise, ctx_timesteps)
    return Batch(clean, text, noise.to(device), (sigma * 1000).to(device), ctx_noise, ctx_timesteps, context)


def own_rollout(model: WanModel, batch: Batch, seed: int) -> torch.Tensor:
    """The model's own continuation of each clip's true first chunk with its own sampler settings."""
    sampler = SamplerSettings.for_model(model.config, seed=seed)
    return own_continuation(model, batch.clean, batch.text, sampler)


def flow_loss(model: nn.Module, batch: Batch, sampler: SamplerDefaults) -> torch.Tensor:
    """MSE of the predicted flow against v = ε - x on every noisy chunk, each seeing the context before it within
    the sampler's window — on clips longer than the window, the context a sliding cache gives."""
    noisy = noised(batch.clean, batch.noise, batch.timesteps)
    flow = model(noisy, batch.timesteps, batch.text, chunk_frames=sampler.chunk, window=sampler.window, sink=sampler.sink,
                 clean=batch.context)
    return F.mse_loss(flow.float(), (batch.noise - batch.clean).float())


def init_weights(model: WanModel, seed: int) -> None:
    """Xavier linears and zero biases as Wan trains them, modulation tables of scale 1/sqrt(dim), and a zero output
    layer so training starts from v = 0 — every draw from `seed`, none from torch's global generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("modulation"):
                param.copy_(torch.randn(param.shape, generator=g) / math.sqrt(param.shape[-1]))
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv3d)):
                fan_out, fan_in = module.weight.shape[0], module.weight[0].numel()
                bound = math.sqrt(6 / (fan_in + fan_out))
                module.weight.copy_(torch.rand(module.weight.shape, generator=g) * 2 * bound - bound)
                if module.bias is not None:
                    module.bias.zero_()
        model.head.head.weight.zero_()


def initial_weights(settings: PretrainSettings) -> dict[str, torch.Tensor]:
    """The float32 weights of `settings.init`, a model of exactly the configuration being trained."""
    from mlaconvert.checkpoints.hub import load_source

    checkpoint = load_source(settings.init)
    if checkpoint.config != settings.model:
        raise MlaconvertError(f"init '{settings.init}' is not a model of the configuration being trained; "
                              "give a model that pretrain wrote with the same [pretrain.model]")
    return {k: v.float() for k, v in checkpoint.state_dict.items()}


@dataclass
class PretrainResult:
    output: Path
    step: int
    finished: bool  # False when stopped by the time limit (resume to continue)
    log: list[dict[str, Any]]


class Run:
    """Model, optimizer and schedule of one pretraining run, and the checkpoint that carries them across processes."""

    def __init__(self, settings: PretrainSettings, device: torch.device):
        self.settings, self.device = settings, device
        self.held_before = held_memory(device)
        self.model = WanModel(settings.model)
        if settings.init:
            self.model.load_state_dict(initial_weights(settings))
        else:
            init_weights(self.model, settings.seed)
        self.model.to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, betas=(0.9, 0.99),
                                           weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, settings.warmup, settings.max_steps))
        self.step_count = 0
        cuda = device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
        self.forward: nn.Module = self.model
        if cuda and settings.compile:
            for block in self.model.blocks:
                block.compile()
        # The held-out objective: the same clips, noise and timesteps at every evaluation, no context noise.
        held_seed = derived_seed(settings.seed, "held-out", 0)
        self.held_out = make_batch(settings, settings.eval_clips, held_seed, device, context_noise=0.0)

    def train_step(self) -> dict[str, Any]:
        s = self.settings
        tic = time.perf_counter()
        seed = derived_seed(s.seed, "step", self.step_count)
        batch = make_batch(s, s.batch, seed, self.device, s.context_noise)
        own_context = self.step_count >= s.max_steps - s.own_context_steps
        with self.autocast:
            if own_context:
                batch = batch.with_context(own_rollout(self.model, batch.head(s.own_context_rows), seed))
            loss = flow_loss(self.forward, batch, s.model.sampler)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        row = {"step": self.step_count, "loss": float(loss.detach()), "lr": lr, "grad_norm": float(grad_norm),
               "own_context": own_context, "seconds": time.perf_counter() - tic}
        peak = job_peak_gib(self.device, self.held_before)
        if peak is not None:
            row["peak_memory_gib"] = peak
        return row

    @torch.no_grad()
    def eval_loss(self) -> float:
        with self.autocast:
            return float(flow_loss(self.forward, self.held_out, self.settings.model.sampler))

    def save(self, folder: Path, fingerprint: dict[str, Any]) -> None:
        state = {"step": self.step_count, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        with atomic_dir(folder, force=True) as tmp:
            torch.save(state, tmp / "state.pt")
            write_json(tmp / "run.json", {"step": self.step_count, "fingerprint": fingerprint})

    def load(self, folder: Path, fingerprint: dict[str, Any]) -> None:
        saved = json.loads((folder / "run.json").read_text())["fingerprint"]
        if saved != fingerprint:
            changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
            raise MlaconvertError(f"the checkpoint in '{folder}' is from another run ({', '.join(changed)} differ); "
                                  "resume with the same recipe, or pass --force to start over")
        state = torch.load(folder / "state.pt", map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = state["step"]


def fingerprint_of(settings: PretrainSettings) -> dict[str, Any]:
    """What determines the computation; a resume must match it. Run-only settings may change between calls."""
    d = dataclasses.asdict(settings)
    d["model"] = settings.model.to_dict()
    for name in ("checkpoint_every", "eval_every", "compile"):
        d.pop(name)
    return json.loads(json.dumps(d))


def pretrain(
    output: str | Path,
    settings: PretrainSettings = PretrainSettings(),
    *,
    device: str | None = None,
    resume: bool = False,
    force: bool = False,
    time_limit: float | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> PretrainResult:
    """Train the world model into `output` (run + model folder). `time_limit` (seconds) ends the run early with a
    checkpoint, for time-boxed jobs; call again with resume=True to go on. on_step receives every log row."""
    settings.check()
    output = Path(output)
    if resume and force:
        raise MlaconvertError("--resume continues the run in the output folder and --force starts it over: pass one")
    checkpoint = output / CHECKPOINT_DIR
    if resume and not (checkpoint / "state.pt").is_file():
        raise MlaconvertError(f"nothing to resume in '{output}': it has no {CHECKPOINT_DIR}/ from an earlier pretrain run")
    if not resume:
        if output.exists() and (checkpoint / "state.pt").is_file() and not force:
            raise MlaconvertError(f"'{output}' holds an unfinished pretrain run: pass --resume to continue it or --force to start over")
        check_writable(output, force)
        if output.exists():
            shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    dev = choose_device(device)
    run = Run(settings, dev)
    fingerprint = fingerprint_of(settings)
    if resume:
        run.load(checkpoint, fingerprint)
    rows = trim_log(output / LOG_NAME, run.step_count)
    start = time.perf_counter()
    with open(output / LOG_NAME, "a") as log:
        while run.step_count < settings.max_steps:
            row = run.train_step()
            if row["step"] == 1 or row["step"] % settings.eval_every == 0 or row["step"] == settings.max_steps:
                row["eval_loss"] = run.eval_loss()
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            if on_step is not None:
                on_step(row)
            out_of_time = time_limit is not None and time.perf_counter() - start > time_limit
            if row["step"] % settings.checkpoint_every == 0 or row["step"] == settings.max_steps or out_of_time:
                run.save(checkpoint, fingerprint)
                plot_loss(rows, output / LOSS_PLOT)
            if out_of_time and run.step_count < settings.max_steps:
                return PretrainResult(output, run.step_count, False, rows)
    export_model(run.model, settings, rows, output, device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU")
    return PretrainResult(output, run.step_count, True, rows)


def export_model(model: WanModel, settings: PretrainSettings, rows: list[dict[str, Any]], folder: Path, device: str = "") -> None:
    """The trained model in Wan's native layout, bf16, with its model card (quality: run `mlaconvert eval` on it)."""
    from mlaconvert.checkpoints.formats import save_native
    from mlaconvert.outputs import atomic_file

    state = {k: v.detach().to("cpu", torch.bfloat16) for k, v in model.state_dict().items()}
    save_native(settings.model, state, folder)
    earlier = training_history(settings.init) if settings.init else ""
    with atomic_file(folder / "README.md") as tmp:
        tmp.write_text(model_card(settings, rows, device=device, earlier=earlier))


def training_history(source: str) -> str:
    """The "Training" section of the card of the model a run started from, so a card tells every stage."""
    from mlaconvert.checkpoints.hub import resolve_source

    path = resolve_source(source).path
    card = path / "README.md" if path.is_dir() else path.with_name("README.md")
    text = card.read_text() if card.is_file() else ""
    if "\n## Training\n" not in text:
        return f"From the weights of `{source}`, whose training is not recorded beside them.\n\n"
    return text.split("\n## Training\n", 1)[1].split("\n## ", 1)[0].strip() + "\n\n"


def model_card(settings: PretrainSettings, rows: list[dict[str, Any]], quality: str = "", device: str = "",
               earlier: str = "") -> str:
    """The world model's card: what it models, how it was trained (from the log; `earlier` is the training of the
    weights it started from), how to sample it, how good it is."""
    cfg, s = settings.model, settings
    params = sum(p.numel() for p in WanModel(cfg).parameters())
    evals = [r for r in rows if "eval_loss" in r]
    minutes = sum(r["seconds"] for r in rows) / 60
    training = {k: v for k, v in dataclasses.asdict(s).items() if k != "model"}
    held_out = f"{evals[-1]['eval_loss']:.4f}" if evals else "not measured"
    gpu = ", bf16 autocast" + (", compiled blocks" if s.compile else "") if device not in ("", "CPU") else ""
    start = "Then, from those weights, " if s.init else "From scratch, "
    window = f", each chunk seeing the last {cfg.sampler.window} frames as the sampler's cache does" if s.frames > cfg.sampler.window else ""
    sink = f", sink {cfg.sampler.sink} ({cfg.sampler.positions} positions)" if cfg.sampler.sink else ""
    own = (f" In the last {s.own_context_steps} steps the context of {s.own_context_rows} of the {s.batch} clips was the "
           "model's own rollout after the clip's true first chunk (the truth still the target), the rest kept the true "
           "context." if s.own_context_steps else "")
    return f"""---
library_name: mlaconvert
tags: [video-diffusion, wan2.1, world-model, bouncing-balls]
---

# bouncing-balls — a small causal Wan trained on a procedural world

A dense, causal Wan2.1-architecture DiT ({params / 1e6:.1f} M parameters: dim {cfg.dim}, {cfg.num_heads} heads x
{cfg.head_dim}, {cfg.num_layers} layers) trained from scratch by `mlaconvert pretrain` on the bouncing-balls world
(`mlaconvert.evaluation.world`: {cfg.world.min_balls}-{cfg.world.max_balls} balls on {cfg.world.size}x{cfg.world.size} pixels,
constant velocity, elastic wall bounces). It works on pixels (3 channels in [-1, 1], patch 1x2x2), in chunks of
{cfg.sampler.chunk} frames with per-frame timesteps, and reads captions like "two balls: red, blue" through the
world's deterministic caption embedder. Its true future is known, so conversions of it are measured against the truth.

## Training
{earlier}{start}{len(rows)} steps of {s.batch} clips x {s.frames} frames, fresh clips every step (seed {s.seed}); flow
matching on the ground truth with clean-context teacher forcing through the block-causal mask{window}, the context
noised to σ <= {s.context_noise}.{own} AdamW (lr {s.lr}, warmup {s.warmup}, cosine to zero){gpu}: {minutes:.1f} min of
training steps{" on one " + device if device else ""}. Final held-out flow-matching loss
{held_out}. `mlaconvert pretrain` with these settings repeats it: `{json.dumps(training)}`.

## Sampling
Its own sampler settings live in `config.json` (`sampler`): {cfg.sampler.steps} denoising steps, shift {cfg.sampler.shift},
chunk {cfg.sampler.chunk}, window {cfg.sampler.window}{sink}; `mlaconvert sample` and `eval` use them without flags:

    mlaconvert sample builtin:bouncing-balls --prompt "two balls: red, blue" --frames 24 --device cpu -o sample

{quality}
"""


def plot_loss(rows: list[dict[str, Any]], path: Path) -> None:
    """Training loss per step and the held-out loss, log scale, with the learning rate."""
    from matplotlib.figure import Figure

    from mlaconvert.outputs import atomic_file

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], alpha=0.5, label="training loss")
    evals = [r for r in rows if "eval_loss" in r]
    ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], marker="o", label="held-out loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    lr_ax = ax.twinx()
    lr_ax.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="grey", linestyle=":", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()
    lr_lines = lr_ax.get_legend_handles_labels()
    ax.legend(lines[0] + lr_lines[0], lines[1] + lr_lines[1], loc="upper right")
    fig.suptitle("pretrain: the bouncing-balls world model")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def settings_from_recipe(table: dict[str, Any]) -> PretrainSettings:
    """A recipe's [pretrain] table: its own keys, and a [pretrain.model] table of WanConfig fields."""
    from mlaconvert.checkpoints.formats import config_from_dict
    from mlaconvert.recipes import check_section

    check_section(PretrainSettings, table, "[pretrain]", "pretrain")
    table = dict(table)
    model = table.pop("model", None)
    config = config_from_dict({**WORLD_MODEL.to_dict(), **model}, "[pretrain.model]") if model else WORLD_MODEL
    return PretrainSettings(**table, model=config)
