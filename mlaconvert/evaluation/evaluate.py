"""Quality of a model's rollouts against the truth and against its dense teacher (`mlaconvert eval`).

Clips with a known continuation — fresh clips of the world a model was trained on, or a `finetune --data`
folder — are cut after a true prefix; the model (and the teacher, when given) rolls out the rest from that
prefix, and the rollout is compared with the true continuation per horizon bucket: half-open frame ranges
[a, b) counted from the clip's first frame, the prefix included. PSNR pools the squared error over every clip
and frame of a bucket (a mean of per-frame PSNRs would let a few perfect frames hide broken ones). Two trivial
predictors set the floor any model must beat: repeating the last prefix frame, and a static background (the
per-pixel median of the prefix). World clips also get the health figures of `mlaconvert.evaluation.health`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlaconvert.errors import MlaconvertError
from mlaconvert.evaluation import health, world
from mlaconvert.evaluation.agreement import MIN_MSE
from mlaconvert.fields import setting
from mlaconvert.inference.sampling import SamplerSettings, rollout
from mlaconvert.modeling.config import WanConfig
from mlaconvert.modeling.model import WanModel

SCHEMA = "mlaconvert.eval/1"
DEFAULT_EDGES = (21, 60, 120, 243)  # bucket ends after a 3-frame prefix: short, medium, long, very long range
PEAK_SQUARED = 4.0  # values live in [-1, 1]: the peak-to-peak range is 2
STRIP_SCALE_TO = 128  # strip frames are enlarged (nearest neighbour) to about this many pixels


@dataclass(frozen=True)
class EvalSettings:
    clips: int = setting(32, "Fresh world clips to judge on.")
    frames: int = setting(240, "Frames to roll out after the true prefix.")
    prefix: int | None = setting(None, "True frames given before the rollout (default: one chunk).")
    edges: tuple[int, ...] | None = None  # bucket ends counted from the first frame; None = DEFAULT_EDGES clipped
    batch: int = setting(8, "Clips rolled out at once (bounds memory).")
    seed: int = setting(0, "Seed of the clips and of all sampling noise.")
    agreement_clips: int = 4  # clips for teacher agreement
    strip_clips: int = 2  # clips shown in strip.png

    def check(self) -> None:
        if min(self.clips, self.frames, self.batch, self.agreement_clips, self.strip_clips) < 1:
            raise MlaconvertError("--clips, --frames, --batch, --agreement-clips and --strip-clips must be positive")
        if self.prefix is not None and self.prefix < 1:
            raise MlaconvertError("--prefix must be at least one frame")


@dataclass
class Truth:
    """Clips with a known continuation: (N, C, F, h, w) values, their text (N, L, D), and where they came from."""

    video: torch.Tensor
    text: torch.Tensor
    origin: dict[str, Any]
    state: world.Balls | None = None  # world clips only: the initial state (counts, colours, speeds)
    world: world.WorldSettings | None = None


def buckets(prefix: int, total: int, edges: tuple[int, ...] | None = None) -> list[tuple[int, int]]:
    """Horizon buckets [a, b) after a `prefix`-frame prefix in clips of `total` frames.

    Without `edges` the default ones are clipped to the frames that exist; given edges must fit."""
    if edges is None:
        edges = tuple(e for e in DEFAULT_EDGES if prefix < e < total) + (total,)
    elif list(edges) != sorted(set(edges)) or edges[0] <= prefix or edges[-1] > total:
        raise MlaconvertError(f"bucket edges {list(edges)} must rise from above the prefix ({prefix}) to at most {total} frames")
    starts = (prefix, *edges[:-1])
    return list(zip(starts, edges))


def frame_sse(prediction: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(F,) float64: squared error summed over clips, channels and pixels, per frame of (N, C, F, h, w)."""
    return (prediction.double() - truth.double()).pow(2).sum(dim=(0, 1, 3, 4))


def psnr_db(mse: float) -> float:
    """10 log10(4 / MSE) for values in [-1, 1], floored like agreement.MIN_MSE so it is always finite."""
    return 10 * math.log10(PEAK_SQUARED / max(mse, MIN_MSE))


def copy_last(truth: torch.Tensor, prefix: int) -> torch.Tensor:
    """The prefix, then its last frame repeated for every later frame."""
    out = truth.clone()
    out[:, :, prefix:] = truth[:, :, prefix - 1 : prefix]
    return out


def static_background(truth: torch.Tensor, prefix: int) -> torch.Tensor:
    """The prefix, then the per-pixel median of the prefix frames (numpy's median: the mean of the middle two)."""
    out = truth.clone()
    out[:, :, prefix:] = torch.from_numpy(np.median(truth[:, :, :prefix].numpy(), axis=2, keepdims=True)).to(truth.dtype)
    return out


def world_truth(config: WanConfig, settings: EvalSettings, frames: int) -> Truth:
    """`settings.clips` fresh clips of the model's world, `frames` long, with their embedded captions."""
    if config.in_dim != 3 or config.out_dim != 3:
        raise MlaconvertError(f"the model records a world but has {config.in_dim} input channels; world clips have 3")
    state = world.new_worlds(settings.clips, settings.seed, config.world)
    video, _ = world.simulate(state, frames)
    caps = world.captions(state)
    text = world.embed_captions(caps, config.text_len, config.text_dim)
    origin = {"kind": "world", "clips": settings.clips, "seed": settings.seed, "world": dataclasses.asdict(config.world),
              "captions": caps}
    return Truth(video, text, origin, state, config.world)


def data_truth(folder: str | Path, config: WanConfig, settings: EvalSettings, chunk: int, prefix: int) -> Truth:
    """The first `settings.clips` clips of a `finetune --data` folder."""
    from mlaconvert.training.clips import load_clips

    clips = load_clips(folder, config, chunk)
    if clips.latents.shape[2] < prefix + 1:
        raise MlaconvertError(f"the clips in '{folder}' have {clips.latents.shape[2]} frames; eval needs the {prefix}-frame prefix and at least one more")
    n = min(settings.clips, clips.latents.shape[0])
    return Truth(clips.latents[:n], clips.text[:n], {**clips.origin, "kind": "data", "clips": n})


@dataclass
class EvalResult:
    report: dict[str, Any]  # horizons, per-frame PSNR, health and agreement: the heart of eval.json
    strip: dict[str, torch.Tensor]  # "truth", "model"[, "teacher"]: the first strip clips, all frames


# JSON names of the per-frame squared-error tallies.
PSNR_KEYS = {"model": "psnr_db", "teacher": "teacher_psnr_db", "baseline": "baseline_psnr_db", "background": "background_psnr_db"}


@torch.no_grad()
def evaluate(model: WanModel, truth: Truth, *, settings: EvalSettings, sampler: SamplerSettings, prefix: int,
             teacher: WanModel | None = None, on_chunk: Callable[[int, torch.Tensor], None] | None = None) -> EvalResult:
    """Roll `model` (and `teacher`) out after the first `prefix` frames of every truth clip, in batches, and
    compare with the truth. Batch i draws its initial noise from seed `settings.seed + i`; the teacher gets the
    same noise, so model and teacher differ only by their weights."""
    n, channels, total, h, w = truth.video.shape
    spans = buckets(prefix, total, settings.edges)
    models = {"model": model, **({"teacher": teacher} if teacher is not None else {})}
    sse = {name: torch.zeros(total, dtype=torch.float64) for name in (*models, "baseline", "background")}
    detections: dict[str, list[health.Detection]] = {name: [] for name in ("truth", *models)}
    strip: dict[str, list[torch.Tensor]] = {name: [] for name in ("truth", *models)}
    noise_seeds = []
    for index, first in enumerate(range(0, n, settings.batch)):
        clean, text = truth.video[first : first + settings.batch], truth.text[first : first + settings.batch]
        noise_seeds.append(settings.seed + index)
        noise = torch.randn(clean.shape[0], model.config.in_dim, total - prefix, h, w, generator=torch.Generator().manual_seed(noise_seeds[-1]))
        videos = {"truth": clean}
        for name, m in models.items():
            videos[name] = rollout(m, text, frames=total - prefix, latent_size=(h, w), settings=sampler, noise=noise,
                                   prefix=clean[:, :, :prefix], on_chunk=on_chunk).latents
            sse[name] += frame_sse(videos[name], clean)
        sse["baseline"] += frame_sse(copy_last(clean, prefix), clean)
        sse["background"] += frame_sse(static_background(clean, prefix), clean)
        if truth.state is not None:
            background = health.background_colour(clean[:, :, :prefix])
            area = health.min_area(truth.world)
            for name, video in videos.items():
                detections[name].append(health.detect_balls(video, background, area))
        for name, video in videos.items():
            strip[name].append(video[: max(0, settings.strip_clips - first)])
    report = psnr_report(sse, n * channels * h * w, prefix, spans)
    report["noise_seeds"] = noise_seeds
    report["health"] = None if truth.state is None else {
        name: health.health(health.Detection.concat(parts), truth.state, prefix, spans) for name, parts in detections.items()
    }
    report["agreement"] = None if teacher is None else _agreement(model, teacher, truth, settings, sampler)
    return EvalResult(report, {name: torch.cat(parts) for name, parts in strip.items()})


def psnr_report(sse: dict[str, torch.Tensor], values_per_frame: int, prefix: int, spans: list[tuple[int, int]]) -> dict[str, Any]:
    """Per horizon bucket and per frame after the prefix: PSNR of each predictor from its pooled squared error."""
    horizons = [
        {"frames": [a, b], **{PSNR_KEYS[name]: psnr_db(float(s[a:b].sum()) / (values_per_frame * (b - a))) for name, s in sse.items()}}
        for a, b in spans
    ]
    per_frame = {PSNR_KEYS[name]: [psnr_db(float(x) / values_per_frame) for x in s[prefix:]] for name, s in sse.items()}
    return {"horizons": horizons, "per_frame": per_frame}


def _agreement(model: WanModel, teacher: WanModel, truth: Truth, settings: EvalSettings, sampler: SamplerSettings) -> dict[str, Any]:
    """Teacher agreement on the first few clips, cut to one attention window (what agreement is defined on)."""
    from mlaconvert.evaluation.agreement import teacher_agreement

    frames = min(truth.video.shape[2], max(sampler.window, sampler.chunk))
    k = settings.agreement_clips
    return teacher_agreement(model, teacher, truth.video[:k, :, :frames], truth.text[:k], settings=sampler, seed=settings.seed)


def _check_teacher(config: WanConfig, teacher: WanConfig) -> None:
    mine = (config.in_dim, config.out_dim, config.patch_size, config.text_dim)
    theirs = (teacher.in_dim, teacher.out_dim, teacher.patch_size, teacher.text_dim)
    if mine != theirs:
        raise MlaconvertError(f"the teacher's (channels in, out, patch, text width) {theirs} differ from the model's {mine}")


def run_eval(model_spec: str, output: str | Path, *, teacher: str | None = None, data: str | Path | None = None,
             settings: EvalSettings = EvalSettings(), sampler: SamplerSettings | None = None, device: str | None = None,
             force: bool = False) -> dict[str, Any]:
    """Evaluate `model_spec` (and `teacher`) and write OUT/eval.json, OUT/eval.png and OUT/strip.png."""
    from mlaconvert.outputs import check_writable

    output = Path(output)
    check_writable(output, force)
    result = eval_source(model_spec, teacher=teacher, data=data, settings=settings, sampler=sampler, device=device)
    write_eval(result, output, force)
    return result.report


def eval_source(model_spec: str, *, teacher: str | None = None, data: str | Path | None = None,
                settings: EvalSettings = EvalSettings(), sampler: SamplerSettings | None = None,
                device: str | None = None) -> EvalResult:
    """What `run_eval` writes, in memory: eval.json's report and the strip clips' frames."""
    from mlaconvert.checkpoints.hub import load_source
    from mlaconvert.devices import choose_device, default_dtype
    from mlaconvert.modeling.model import load_model
    from mlaconvert.progress import progress_bar

    settings.check()
    checkpoint = load_source(model_spec)
    cfg = checkpoint.config
    sampler = sampler or SamplerSettings.for_model(cfg)
    prefix = settings.prefix or sampler.chunk
    if data is not None:
        truth = data_truth(data, cfg, settings, sampler.chunk, prefix)
        truth.video = truth.video[:, :, : prefix + settings.frames]
    elif cfg.world is not None:
        truth = world_truth(cfg, settings, prefix + settings.frames)
    else:
        raise MlaconvertError(f"'{model_spec}' records no world in its config: give --data with clips that have a known continuation")
    buckets(prefix, truth.video.shape[2], settings.edges)  # bad edges fail before any model runs
    teacher_ckpt = load_source(teacher) if teacher is not None else None
    if teacher_ckpt is not None:
        _check_teacher(cfg, teacher_ckpt.config)
    dev = choose_device(device, sum(t.numel() for t in checkpoint.state_dict.values()))
    dtype = default_dtype(dev)
    model = load_model(cfg, checkpoint.state_dict, device=dev, dtype=dtype).eval()
    teacher_model = None if teacher_ckpt is None else load_model(teacher_ckpt.config, teacher_ckpt.state_dict, device=dev, dtype=dtype).eval()
    if sampler.compile:
        for each in (model, teacher_model):
            if each is not None:
                each.compile_blocks()

    start = time.perf_counter()
    rollouts = -(-truth.video.shape[0] // settings.batch) * (1 if teacher is None else 2)
    chunks = -(-prefix // sampler.chunk) + -(-(truth.video.shape[2] - prefix) // sampler.chunk)
    with progress_bar() as bar:
        task = bar.add_task("rollouts", total=rollouts * chunks)
        result = evaluate(model, truth, settings=settings, sampler=sampler, prefix=prefix, teacher=teacher_model,
                          on_chunk=lambda _first, _x0: bar.advance(task))
    result.report = {
        "schema": SCHEMA,
        "model": model_spec,
        "teacher": teacher,
        "attention": "mla" if cfg.is_mla else "dense",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "truth": truth.origin,
        "prefix_frames": prefix,
        "frames": truth.video.shape[2] - prefix,
        "settings": dataclasses.asdict(settings),
        "sampler": dataclasses.asdict(sampler),
        **result.report,
        "seconds": time.perf_counter() - start,
    }
    return result


def write_eval(result: EvalResult, output: Path, force: bool = False) -> None:
    """OUT/eval.json, OUT/eval.png and OUT/strip.png, written together."""
    from mlaconvert.outputs import atomic_dir, write_json

    report = result.report
    with atomic_dir(output, force) as tmp:
        write_json(tmp / "eval.json", report)
        plot_eval(report, tmp / "eval.png")
        write_strip(result.strip, strip_columns(report["prefix_frames"], report["horizons"]), tmp / "strip.png")


# Plot labels and colours of the per-frame PSNR curves.
CURVES = {"psnr_db": ("model", "C0"), "teacher_psnr_db": ("teacher", "C1"), "baseline_psnr_db": ("copy last frame", "grey"),
          "background_psnr_db": ("static background", "silver")}
HEALTH_COLOURS = {"truth": "k", "model": "C0", "teacher": "C1"}


def plot_eval(report: dict[str, Any], path: Path) -> None:
    """PSNR to the truth over the horizon for the model, teacher and both baselines; for the world, balls kept."""
    from matplotlib.figure import Figure

    healthy = report.get("health") is not None
    fig = Figure(figsize=(8, 6.5 if healthy else 4), layout="constrained")
    axes = fig.subplots(2 if healthy else 1, 1, sharex=True, squeeze=False)[:, 0]
    first = report["prefix_frames"]
    x = np.arange(first, first + report["frames"])
    for key, values in report["per_frame"].items():
        label, colour = CURVES[key]
        axes[0].plot(x, values, label=label, color=colour, linewidth=1.2 if key in ("psnr_db", "teacher_psnr_db") else 1)
    axes[0].set_ylabel("PSNR to the truth (dB)")
    axes[0].legend(loc="upper right")
    if healthy:
        for name, figures in report["health"].items():
            axes[1].plot(x, figures["per_frame"]["count_kept"], label=name, color=HEALTH_COLOURS[name])
        axes[1].set_ylabel("clips with every ball (count kept)")
        axes[1].set_ylim(-0.03, 1.03)
        axes[1].legend(loc="best")
    for ax in axes:
        for h in report["horizons"]:
            ax.axvline(h["frames"][0] - 0.5, color="lightgrey", linestyle=":", linewidth=0.8)
    axes[-1].set_xlabel(f"frame (the first {first} are the true prefix)")
    fig.suptitle(f"eval: {report['model']} after a {first}-frame prefix")
    fig.savefig(path, format="png", dpi=100)


def strip_columns(prefix: int, horizons: list[dict[str, Any]]) -> list[int]:
    """The last prefix frame, the first new one, and the last frame of every horizon bucket."""
    return sorted({prefix - 1, prefix, *(h["frames"][1] - 1 for h in horizons)})


def _to_rgb(video: torch.Tensor, low: float, high: float) -> np.ndarray:
    """(N, C, F, h, w) -> (N, F, h, w, 3) in [0, 1]: three-channel video as pixels, other latents as their first
    channels (grey for fewer than three) scaled by the truth's range."""
    x = video[:, :3] if video.shape[1] >= 3 else video[:, :1].expand(-1, 3, -1, -1, -1)
    return ((x.float() - low) / (high - low)).clamp(0, 1).permute(0, 2, 3, 4, 1).numpy()


def write_strip(strip: dict[str, torch.Tensor], columns: list[int], path: Path) -> None:
    """Rows truth | model | teacher (or whatever `strip` names, the first setting the colour range) for each clip,
    columns the given frames, enlarged with nearest neighbour."""
    from matplotlib.figure import Figure

    truth = next(iter(strip.values()))
    low, high = (-1.0, 1.0) if truth.shape[1] == 3 else (float(truth.min()), float(truth.max()) + 1e-6)
    scale = max(1, STRIP_SCALE_TO // max(truth.shape[3:]))
    gap = 2
    rgb = {name: _to_rgb(video[:, :, columns], low, high).repeat(scale, axis=2).repeat(scale, axis=3) for name, video in strip.items()}
    tile_h, tile_w = next(iter(rgb.values())).shape[2:4]
    rows = [(f"{name} #{i}", rgb[name][i]) for i in range(truth.shape[0]) for name in strip]
    image = np.ones((len(rows) * (tile_h + gap) - gap, len(columns) * (tile_w + gap) - gap, 3))
    for r, (_, tiles) in enumerate(rows):
        for c, tile in enumerate(tiles):
            image[r * (tile_h + gap) : r * (tile_h + gap) + tile_h, c * (tile_w + gap) : c * (tile_w + gap) + tile_w] = tile
    # One image pixel per figure pixel at 100 dpi, with margins (inches) for the row labels (about 0.07 inch a
    # character at 8 points) and the column labels.
    width, height, bottom = image.shape[1] / 100, image.shape[0] / 100, 0.4
    left = max(1.1, 0.2 + 0.07 * max(len(name) for name, _ in rows))
    fig = Figure(figsize=(width + left + 0.1, height + bottom + 0.1))
    ax = fig.add_axes((left / (width + left + 0.1), bottom / (height + bottom + 0.1), width / (width + left + 0.1), height / (height + bottom + 0.1)))
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([c * (tile_w + gap) + tile_w / 2 for c in range(len(columns))], [f"frame {f}" for f in columns], fontsize=8)
    ax.set_yticks([r * (tile_h + gap) + tile_h / 2 for r in range(len(rows))], [name for name, _ in rows], fontsize=8)
    ax.tick_params(length=0)
    fig.savefig(path, format="png", dpi=100)
