"""Streaming autoregressive rollout with a KV cache: Self-Forcing's few-step flow-matching sampler.

Chunk by chunk: start from noise, run the denoising list (warped by the shift) — each step predicts the flow
v = noise - x0, so x0 = x_t - σ v, then re-noises x0 to the next σ with fresh noise — and finally run the
clean chunk once more at t = 0: only that context pass commits its keys to the cache. The same code drives a
dense model (dense cache) and an MLA model (latent cache); nothing here knows which.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlaconvert.devices import choose_device, default_dtype
from mlaconvert.errors import MlaconvertError
from mlaconvert.fields import setting
from mlaconvert.inference.graphs import ChunkForward
from mlaconvert.modeling.cache import KVCache
from mlaconvert.modeling.config import SamplerDefaults, WanConfig
from mlaconvert.modeling.model import WanModel

VIDEO_FPS = 16
FRAMES_PER_LATENT = 4  # Wan's VAE: 4 video frames per latent frame (the first latent frame decodes to 1)
ROPE_TABLE = 1024  # positions Wan was trained with; beyond it the cache re-indexes


def denoising_timesteps(n: int) -> tuple[float, ...]:
    """n evenly spaced denoising timesteps from 1000, before the shift: 4 -> (1000, 750, 500, 250)."""
    if n < 1:
        raise MlaconvertError(f"--steps must be at least 1 (got {n})")
    return tuple(1000.0 * (n - i) / n for i in range(n))


def parse_timesteps(text: str) -> tuple[float, ...]:
    """A --timesteps value: a comma list such as '1000,750,500,250' (checked by SamplerSettings.check)."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise MlaconvertError(f"--timesteps must be comma-separated numbers such as 1000,500 (got '{text}')") from None


@dataclass
class SamplerSettings:
    """A concrete sampler; its defaults are SamplerDefaults' (Wan's streaming models), for_model takes a model's own."""

    chunk: int = SamplerDefaults.chunk
    window: int = SamplerDefaults.window  # attention span in latent frames, the current chunk included
    sink: int = SamplerDefaults.sink
    timesteps: tuple[float, ...] = denoising_timesteps(SamplerDefaults.steps)  # denoising list before the shift
    shift: float = SamplerDefaults.shift
    positions: str = SamplerDefaults.positions  # absolute, reindex, or auto (absolute while it fits Wan's RoPE table)
    seed: int = 0
    graphs: bool = False  # on CUDA, replay the steady state's forwards as CUDA graphs (graphs.py)
    compile: bool = False  # torch.compile the model's blocks before its first rollout (the job that loads it does)

    @classmethod
    def for_model(cls, config: WanConfig, **options: Any) -> SamplerSettings:
        """Concrete settings from `options`, the fields of SamplerOptions: each None is the model's own
        (config.sampler), and a step count becomes an even list."""
        given, own = SamplerOptions(**options), config.sampler
        if given.steps is not None and given.timesteps is not None:
            raise MlaconvertError("--steps and --timesteps both set the denoising schedule: give one of them")

        def either(value: Any, models: Any) -> Any:
            return models if value is None else value

        schedule = (denoising_timesteps(either(given.steps, own.steps)) if given.timesteps is None
                    else tuple(float(t) for t in given.timesteps))
        settings = cls(
            chunk=either(given.chunk, own.chunk), window=either(given.window, own.window),
            sink=either(given.sink, own.sink), timesteps=schedule, shift=either(given.shift, own.shift),
            positions=either(given.positions, own.positions), seed=given.seed, graphs=given.graphs,
            compile=given.compile,
        )
        settings.check()
        return settings

    def positions_for(self, frames: int) -> str:
        """The RoPE positions of a rollout of `frames` latent frames (prefix included): "auto" resolved."""
        if self.positions != "auto":
            return self.positions
        return "absolute" if frames <= ROPE_TABLE else "reindex"

    def check(self) -> None:
        """One line per bad value, before any model runs."""
        if self.chunk < 1:
            raise MlaconvertError(f"--chunk must be at least 1 (got {self.chunk})")
        if self.window < self.chunk:
            raise MlaconvertError(f"--window ({self.window}) must be at least --chunk ({self.chunk})")
        if self.sink < 0 or self.sink + self.chunk > self.window:
            raise MlaconvertError(f"--sink ({self.sink}) plus --chunk ({self.chunk}) must fit in --window ({self.window})")
        if self.positions not in ("auto", "absolute", "reindex"):
            raise MlaconvertError("--positions must be auto, absolute or reindex")
        t = self.timesteps
        if not t or any(not 0 < x <= 1000 for x in t) or any(a <= b for a, b in zip(t, t[1:])):
            listed = ",".join(f"{x:g}" for x in t)
            raise MlaconvertError(f"--timesteps must be descending values in (0, 1000], e.g. 1000,750,500,250 (got '{listed}')")
        if self.shift <= 0:
            raise MlaconvertError(f"--shift must be positive (got {self.shift:g})")


@dataclass(frozen=True)
class SamplerOptions:
    """The sampler as a user sets it: the command line's sampler options, the keywords of
    `SamplerSettings.for_model` and of `sample(sampler=...)`. None leaves the model's own (config.sampler)."""

    steps: int | None = setting(
        None, "Denoising steps per chunk, evenly spaced from 1000 before the shift (4: 1000,750,500,250; default: the model's own).")
    timesteps: tuple[float, ...] | None = setting(
        None, "The denoising timesteps themselves, before the shift: a descending comma list in (0, 1000], e.g. 1000,500 "
        "(instead of --steps).", parse=parse_timesteps)
    shift: float | None = setting(None, "Flow-matching timestep shift (default: the model's own).")
    chunk: int | None = setting(None, "Latent frames per autoregressive chunk (default: the model's own).")
    window: int | None = setting(
        None, "Attention span in latent frames, the current chunk included (default: the model's own).")
    sink: int | None = setting(None, "First latent frames kept in the cache forever (default: the model's own).")
    positions: str | None = setting(
        None, "RoPE positions: absolute, reindex (inside the window) or auto (default: the model's own).")
    seed: int = setting(SamplerSettings.seed, "Seed for all noise.")
    graphs: bool = setting(False, "On CUDA, replay each forward against the full window as a CUDA graph (the same frames, fewer launches).")
    compile: bool = setting(False, "torch.compile the model's blocks first: the first chunks wait for the compiler (its cache keeps "
                                   "the work for later runs), every chunk after runs faster. With --graphs: the fastest path.")


@dataclass
class Rollout:
    latents: torch.Tensor  # (B, C, F, h, w), float32, on the CPU
    chunk_seconds: list[float] = field(default_factory=list)
    cache_bytes: int = 0
    peak_memory: int | None = None


def warp_timesteps(steps: Sequence[float], shift: float) -> list[float]:
    """σ' = shift σ / (1 + (shift - 1) σ) on σ = t / 1000: [1000, 750, 500, 250] -> [1000, 937.5, 833.3, 625]."""
    out = []
    for t in steps:
        sigma = t / 1000.0
        out.append(1000.0 * shift * sigma / (1 + (shift - 1) * sigma))
    return out


def latent_frames_for(seconds: float) -> int:
    """Latent frames for a duration at 16 fps, 4 video frames per latent frame (60 s -> 240)."""
    return max(1, round(seconds * VIDEO_FPS / FRAMES_PER_LATENT))


def check_video_size(height: int, width: int, config: WanConfig) -> tuple[int, int]:
    """Pixel size -> latent size; both must divide by the model's VAE stride times its patch."""
    unit = config.vae_stride[1] * config.patch_size[1], config.vae_stride[2] * config.patch_size[2]
    if height % unit[0] or width % unit[1] or height <= 0 or width <= 0:
        raise MlaconvertError(f"--height/--width must be positive multiples of {unit[0]}/{unit[1]} pixels (got {height}x{width})")
    return height // config.vae_stride[1], width // config.vae_stride[2]


def check_settings(settings: SamplerSettings, frames: int) -> None:
    if frames < 1:
        raise MlaconvertError("the number of frames must be positive")
    settings.check()


@torch.no_grad()
def rollout(
    model: WanModel,
    text: torch.Tensor,
    *,
    frames: int,
    latent_size: tuple[int, int],
    settings: SamplerSettings = SamplerSettings(),
    noise: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    on_chunk: Callable[[int, torch.Tensor], None] | None = None,
) -> Rollout:
    """Generate `frames` latent frames for each text embedding in `text` (B, L, text_dim).

    noise: optional initial noise (B, C, frames, h, w); otherwise drawn from `settings.seed`. All noise comes
    from a CPU generator, so a seeded rollout is the same on any device. prefix: given frames (B, C, P, h, w)
    committed to the cache first, chunk by chunk at t = 0 as if the model had generated them; the rollout
    continues after them and its latents hold the prefix followed by the `frames` new ones (video extension).
    on_chunk(first_frame, x0) is called with each finished chunk, prefix chunks included (on the model's
    device) — a streaming VAE decoder hooks in here.
    """
    check_settings(settings, frames)
    cfg = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    batch = text.shape[0]
    h, w = latent_size
    given = _check_prefix(prefix, batch, cfg.in_dim, latent_size)
    if h % cfg.patch_size[1] or w % cfg.patch_size[2]:
        raise MlaconvertError(f"latent size {h}x{w} is not divisible by the patch size {cfg.patch_size[1]}x{cfg.patch_size[2]}")
    positions = settings.positions_for(given + frames)
    cache = KVCache(
        model, batch=batch, frame_shape=(h // cfg.patch_size[1], w // cfg.patch_size[2]), window=settings.window,
        sink=settings.sink, positions=positions,
    )
    gen = torch.Generator().manual_seed(settings.seed)
    if noise is None:
        noise = torch.randn(batch, cfg.in_dim, frames, h, w, generator=gen)
    sigmas = [t / 1000.0 for t in warp_timesteps(settings.timesteps, settings.shift)]
    text = text.to(device, dtype)
    out = torch.empty(batch, cfg.out_dim, given + frames, h, w)
    result = Rollout(latents=out, cache_bytes=cache.nbytes)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    forward = ChunkForward(model, settings.graphs)
    for start in range(0, given, settings.chunk):
        x0 = prefix[:, :, start : start + settings.chunk].to(device, dtype)
        n = x0.shape[2]
        forward(x0, torch.zeros(batch, n, device=device), text, cache.step(n, commit=True))
        out[:, :, start : start + n] = prefix[:, :, start : start + n].float().cpu()
        if on_chunk is not None:
            on_chunk(start, x0)
    for first in range(0, frames, settings.chunk):
        start = given + first
        n = min(settings.chunk, frames - first)
        tic = time.perf_counter()
        x = noise[:, :, first : first + n].to(device, dtype)
        for i, sigma in enumerate(sigmas):
            t = torch.full((batch, n), sigma * 1000.0, device=device)
            flow = forward(x, t, text, cache.step(n, commit=False))
            x0 = x.float() - sigma * flow
            if i + 1 < len(sigmas):
                fresh = torch.randn(x0.shape, generator=gen).to(device)
                x = ((1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * fresh).to(dtype)
        forward(x0.to(dtype), torch.zeros(batch, n, device=device), text, cache.step(n, commit=True))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result.chunk_seconds.append(time.perf_counter() - tic)
        out[:, :, start : start + n] = x0.float().cpu()
        if on_chunk is not None:
            on_chunk(start, x0)
    if device.type == "cuda":
        result.peak_memory = torch.cuda.max_memory_allocated(device)
    return result


def _check_prefix(prefix: torch.Tensor | None, batch: int, channels: int, latent_size: tuple[int, int]) -> int:
    """Frames in the prefix (0 without one), after checking that it fits the rollout."""
    if prefix is None:
        return 0
    expected = (batch, channels, "frames", *latent_size)
    if prefix.ndim != 5 or (prefix.shape[0], prefix.shape[1], *prefix.shape[3:]) != (batch, channels, *latent_size):
        raise MlaconvertError(f"the prefix has shape {tuple(prefix.shape)}; this rollout needs {expected}")
    return prefix.shape[2]


def sample(
    model_spec: str,
    out_dir: str | Path,
    *,
    frames: int | None = None,
    seconds: float | None = None,
    height: int | None = None,
    width: int | None = None,
    prefix: str | Path | None = None,
    prompts: list[str] | None = None,
    prompt_embeds: str | Path | None = None,
    random_text: bool = False,
    text_encoder: str = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    vae: str | None = None,
    batch: int = 1,
    sampler: dict[str, Any] | None = None,
    device: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Roll out a dense or MLA model and write OUT/latents.safetensors, OUT/run.json and, with a VAE, OUT/video.mp4.

    sampler: fields of `SamplerOptions` (steps, timesteps, shift, chunk, window, sink, positions, seed); what
    they leave out is the model's own. prefix: a safetensors file with `latents`
    (B, C, F, h, w), e.g. an earlier sample's: committed first, continued for `frames` new frames, and written
    in front of them. height/width (pixels) default to the prefix's size, else the model's world, else 480x832.
    """
    from safetensors.torch import save_file

    from mlaconvert.checkpoints.hub import load_source
    from mlaconvert.modeling.model import load_model
    from mlaconvert.outputs import atomic_dir, check_writable, write_json

    out_dir = Path(out_dir)
    check_writable(out_dir, force)
    frames = _frame_count(frames, seconds)
    checkpoint = load_source(model_spec)
    cfg = checkpoint.config
    given = load_prefix(prefix, cfg) if prefix is not None else None
    height, width = _frame_size(cfg, given, height, width)
    latent_size = check_video_size(height, width, cfg)
    settings = SamplerSettings.for_model(cfg, **(sampler or {}))
    check_settings(settings, frames)
    params = sum(t.numel() for t in checkpoint.state_dict.values())
    dev = choose_device(device, params)
    dtype = default_dtype(dev)
    if given is not None:
        batch = given.shape[0]
    text, prompt_list = _text_embeddings(cfg, prompts, prompt_embeds, random_text, text_encoder, batch, settings.seed, dev)
    if given is not None and text.shape[0] != given.shape[0]:
        raise MlaconvertError(f"the prefix holds {given.shape[0]} stream(s) but {text.shape[0]} prompt(s) were given: give one per stream")
    model = load_model(cfg, checkpoint.state_dict, device=dev, dtype=dtype).eval()
    if settings.compile:
        model.compile_blocks()

    start = time.perf_counter()
    with atomic_dir(out_dir, force) as tmp, contextlib.ExitStack() as videos:
        decode = _video_sink(vae, tmp, text.shape[0], dev, videos)
        try:
            with _progress(frames, settings.chunk) as advance:

                def on_chunk(_first: int, x0: torch.Tensor) -> None:
                    decode(x0)
                    advance()

                result = rollout(model, text, frames=frames, latent_size=latent_size, settings=settings, prefix=given,
                                 on_chunk=on_chunk)
        except torch.OutOfMemoryError:
            raise MlaconvertError(
                f"out of GPU memory for batch {text.shape[0]} at {height}x{width} with a {settings.window}-frame window: "
                "lower --batch, --window or the resolution"
            ) from None
        videos.close()  # finish the mp4 files before the folder is moved into place
        total = time.perf_counter() - start
        save_file({"latents": result.latents.contiguous()}, str(tmp / "latents.safetensors"), metadata={"prompts": json.dumps(prompt_list)})
        report = run_report(result, model_spec, cfg, settings, frames, (height, width), dev, total, prompt_list)
        report["prefix"] = None if given is None else {"file": str(prefix), "frames": given.shape[2]}
        if cfg.vae_stride == (1, 1, 1) and cfg.in_dim == 3:  # a model of pixels: the frames themselves, to look at
            _write_frames(result.latents, tmp / "frames.png")
        write_json(tmp / "run.json", report)
    return report


def _frame_count(frames: int | None, seconds: float | None) -> int:
    """Latent frames from --frames or --seconds (one of them; 5 s when neither is given)."""
    if frames is not None and seconds is not None:
        raise MlaconvertError("--frames and --seconds both set the length: give one of them")
    if seconds is not None and seconds <= 0:
        raise MlaconvertError(f"--seconds must be positive (got {seconds:g})")
    return frames if frames is not None else latent_frames_for(seconds if seconds is not None else 5.0)


def load_prefix(path: str | Path, config: WanConfig) -> torch.Tensor:
    """The `latents` (B, C, F, h, w) of a safetensors file, checked against the model's channels and patch."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MlaconvertError(f"no such prefix file: '{path}'")
    try:
        with safe_open(path, framework="pt") as f:
            if "latents" not in f.keys():
                raise MlaconvertError(f"the prefix '{path}' has no 'latents' tensor (it has: {', '.join(f.keys()) or 'nothing'})")
            latents = f.get_tensor("latents").float()
    except SafetensorError as e:
        raise MlaconvertError(f"the prefix '{path}' is not a readable safetensors file: {e}") from None
    _, ph, pw = config.patch_size
    if latents.ndim != 5 or latents.shape[1] != config.in_dim or latents.shape[2] < 1 or latents.shape[3] % ph or latents.shape[4] % pw:
        raise MlaconvertError(
            f"the prefix '{path}' holds latents of shape {tuple(latents.shape)}; this model needs (streams, {config.in_dim}, "
            f"frames >= 1, height, width) with height and width divisible by the patch {ph}x{pw}"
        )
    return latents


def _frame_size(config: WanConfig, prefix: torch.Tensor | None, height: int | None, width: int | None) -> tuple[int, int]:
    """Pixels: the prefix fixes them; otherwise what was asked for, else the model's world, else Wan's 480x832."""
    if prefix is not None:
        size = prefix.shape[3] * config.vae_stride[1], prefix.shape[4] * config.vae_stride[2]
        if (height or size[0], width or size[1]) != size:
            raise MlaconvertError(f"the prefix is {size[0]}x{size[1]} pixels; --height/--width cannot change that (got {height}x{width})")
        return size
    default = (config.world.size, config.world.size) if config.world is not None else (480, 832)
    return height or default[0], width or default[1]


def _write_frames(video: torch.Tensor, path: Path, columns: int = 8, streams: int = 4) -> None:
    """Up to `columns` evenly spaced frames of the first `streams` streams of a pixel-space video, as one PNG."""
    from mlaconvert.evaluation.evaluate import write_strip

    frames = video.shape[2]
    picked = sorted({round(i * (frames - 1) / max(1, columns - 1)) for i in range(min(columns, frames))})
    write_strip({"sample": video[:streams]}, picked, path)


def _video_sink(vae: str | None, folder: Path, batch: int, dev: torch.device, stack: contextlib.ExitStack) -> Callable[[torch.Tensor], None]:
    """Decode each finished chunk with the streaming VAE into one mp4 per stream (video.mp4, or video-<i>.mp4)."""
    if vae is None:
        return lambda _x0: None
    from mlaconvert.inference.video import Mp4Writer, StreamingDecoder, load_vae

    decoder = StreamingDecoder(load_vae(vae, device=dev, dtype=default_dtype(dev)))
    names = ["video.mp4"] if batch == 1 else [f"video-{i}.mp4" for i in range(batch)]
    writers = [stack.enter_context(Mp4Writer(folder / name, fps=VIDEO_FPS)) for name in names]

    def decode(x0: torch.Tensor) -> None:
        pixels = decoder.decode(x0)
        for writer, stream in zip(writers, pixels):
            writer.write(stream)

    return decode


def run_report(result: Rollout, spec: str, cfg: WanConfig, settings: SamplerSettings, frames: int, size: tuple[int, int], dev: torch.device, total: float, prompts: list[str] | None) -> dict[str, Any]:
    video_frames = frames * cfg.vae_stride[0] * result.latents.shape[0]
    rollout_seconds = sum(result.chunk_seconds)
    return {
        "model": spec,
        "attention": "mla" if cfg.is_mla else "dense",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "batch": result.latents.shape[0],
        "latent_frames": frames,
        "video_seconds": frames * cfg.vae_stride[0] / VIDEO_FPS,
        "size": list(size),
        "settings": {**settings.__dict__, "timesteps": list(settings.timesteps), "warped_timesteps": warp_timesteps(settings.timesteps, settings.shift)},
        "fps_latent_only": video_frames / rollout_seconds,
        "fps_end_to_end": video_frames / total,
        "chunk_seconds": result.chunk_seconds,
        "peak_memory_bytes": result.peak_memory,
        "cache_bytes": result.cache_bytes,
        "cached_values_per_token": [cfg.kv_values_per_token(i) for i in range(cfg.num_layers)],
        "prompts": prompts,
    }


def _text_embeddings(cfg, prompts, prompt_embeds, random_text, text_encoder, batch, seed, dev) -> tuple[torch.Tensor, list[str] | None]:
    given = sum(x is not None and x is not False for x in (prompts or None, prompt_embeds, random_text or None))
    if given != 1:
        raise MlaconvertError("give exactly one of --prompt, --prompt-embeds or --random-text")
    if random_text:
        from mlaconvert.inference.text import random_prompt_embeds

        return random_prompt_embeds(batch, cfg.text_len, cfg.text_dim, seed), None
    if prompt_embeds is not None:
        from mlaconvert.inference.text import load_prompt_embeds

        embeds, names = load_prompt_embeds(prompt_embeds)
    elif cfg.text_encoder == "captions":
        from mlaconvert.evaluation.world import embed_captions

        embeds, names = embed_captions(list(prompts), cfg.text_len, cfg.text_dim), list(prompts)
    else:
        from mlaconvert.inference.text import encode_prompts

        embeds, names = encode_prompts(list(prompts), text_encoder, device=dev, text_len=cfg.text_len).cpu(), list(prompts)
    if embeds.shape[-1] != cfg.text_dim:
        raise MlaconvertError(f"text embeddings have width {embeds.shape[-1]} but the model expects {cfg.text_dim}")
    return embeds.float(), names


@contextlib.contextmanager
def _progress(frames: int, chunk: int):
    from mlaconvert.progress import progress_bar

    with progress_bar() as progress:
        task = progress.add_task("chunks", total=-(-frames // chunk))
        yield lambda: progress.advance(task)
