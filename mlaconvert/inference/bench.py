"""`bench`: dense vs MLA in the same process on the same GPU — cache size, memory, chunk latency, streams.

Both variants are the same architecture with random weights (speed and memory do not depend on the values),
run through the same sampler; only the self-attention differs. Each configuration rolls out enough chunks
for the window to fill, and the latency is the median over the chunks after that (steady state). The number
of concurrent streams that fit a memory budget is extrapolated from the measured peaks at batch 1 and 2
(per-stream growth), and the long rollout measures the peak memory of a minute of video.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress, TaskID

from mlaconvert import __version__
from mlaconvert.checkpoints.builtin import TINY_WAN
from mlaconvert.conversion.export import parameter_count
from mlaconvert.devices import GiB, choose_device, default_dtype
from mlaconvert.fields import help_of, setting
from mlaconvert.inference.sampling import (FRAMES_PER_LATENT, ROPE_TABLE, SamplerOptions, SamplerSettings, check_video_size, latent_frames_for,
                                           rollout)
from mlaconvert.inference.bench_journal import FORMAT, BenchJournal, journal_path
from mlaconvert.inference.profile import device_rates, forward_breakdown, steady_forward
from mlaconvert.inference.video import StreamingDecoder, random_vae
from mlaconvert.modeling.config import MLAConfig, WanConfig, preset
from mlaconvert.modeling.model import WanModel
from mlaconvert.modeling.rope import leading_rope_pairs
from mlaconvert.progress import progress_bar



@dataclass
class BenchSettings:
    preset: str = setting("wan2.1-1.3b", "Architecture with random weights: wan2.1-1.3b, wan2.1-14b, or tiny.")
    height: int = setting(480, "Video height in pixels.")
    width: int = setting(832, "Video width in pixels.")
    steps: int | None = setting(None, help_of(SamplerOptions, "steps"))
    windows: tuple[int, ...] = setting((21,), "Window sizes in latent frames (repeat the option for a grid).")
    chunks: tuple[int, ...] = setting((3,), "Chunk sizes in latent frames (repeatable).")
    batches: tuple[int, ...] = setting((1,), "Batch sizes (repeatable).")
    dc: int = setting(192, "Latent width of the MLA variant (values per token and layer, besides the rope key).")
    rope_dim: int = setting(32, "Width of the MLA variant's shared 3D-RoPE key.")
    timed_chunks: int = setting(4, "Chunks timed after the window is full.")
    long_seconds: float = setting(60.0, "Length in seconds of the peak-memory rollout (0 skips it).")
    budget_gib: float = setting(80.0, "Memory budget in GiB for the concurrent-streams estimate.")
    seed: int = 0
    variants: tuple[str, ...] = ("dense", "mla")
    compile: bool = setting(False, "torch.compile the blocks of both variants.")
    graphs: bool = setting(False, "Replay each steady-state forward of both variants as a CUDA graph.")
    profile: bool = setting(False, "Profile one steady-state forward of each variant at batch 1: kernel time by kind beside its FLOP floor.")
    decode: bool = setting(False, "Decode every chunk of the batch-1 rollouts with a random-weight Wan 2.1 VAE, streamed as "
                                  "`sample` does (needs diffusers): end-to-end fps of one stream.")


def mla_variant(config: WanConfig, dc: int, rope_dim: int) -> WanConfig:
    """The MLA twin of a dense config, with Wan's first pairs of each axis as the rope pairs."""
    pairs = leading_rope_pairs(config.head_dim, rope_dim)
    return config.replace(
        mla=MLAConfig(dc=(dc,) * config.num_layers, rope_dim=rope_dim, nope_dim=config.head_dim - rope_dim, rope_pairs=(pairs,) * config.num_layers, init="random")
    )


def random_model(config: WanConfig, device: torch.device, dtype: torch.dtype, seed: int) -> WanModel:
    """Seeded random weights, built on `device` directly: a full-size model never passes through host memory."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = WanModel(config)
    return model.to(dtype).eval()


def _rollouts_per_variant(settings: BenchSettings) -> int:
    grid = len(settings.windows) * len(settings.chunks) * len(set(settings.batches) | {1, 2})
    return grid + (settings.long_seconds > 0)


def _measure(model: WanModel, batch: int, frames: int, latent_size: tuple[int, int], settings: SamplerSettings,
             decoder: StreamingDecoder | None = None) -> dict[str, Any]:
    cfg = model.config
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(settings.seed)) * 0.1
    torch.cuda.empty_cache()
    result = rollout(model, text, frames=frames, latent_size=latent_size, settings=settings)
    chunks_to_fill = -(-settings.window // settings.chunk)
    steady = result.chunk_seconds[chunks_to_fill:] or result.chunk_seconds[-1:]
    latency = statistics.median(steady)
    video_frames = batch * settings.chunk * FRAMES_PER_LATENT
    row = {
        "batch": batch,
        "window": settings.window,
        "chunk": settings.chunk,
        "latent_frames": frames,
        "chunk_latency_s": latency,
        "first_chunk_s": result.chunk_seconds[0],
        # The chunk that fills the window: with --graphs, the one whose forwards are captured.
        "filling_chunk_s": result.chunk_seconds[min(chunks_to_fill, len(result.chunk_seconds)) - 1],
        "fps": video_frames / latency,
        "peak_memory_gib": None if result.peak_memory is None else result.peak_memory / GiB,
        "cache_mib": result.cache_bytes / 2**20,
        "cached_values_per_token": cfg.kv_values_per_token(),
    }
    if decoder is not None:
        decoding = _decode_seconds(decoder, result.latents, settings.chunk, next(model.parameters()))
        decode = statistics.median(decoding[chunks_to_fill:] or decoding[-1:])
        row.update({"decode_latency_s": decode, "fps_end_to_end": video_frames / (latency + decode)})
    return row


def _row_line(variant: str, role: str, row: dict[str, Any]) -> str:
    if row.get("oom"):
        return f"{variant} {role} batch {row['batch']}: out of memory"
    decode = f", decode {row['decode_latency_s']:.3f} s" if "decode_latency_s" in row else ""
    return (f"{variant} {role} batch {row['batch']}, {row['latent_frames']} latent frames: "
            f"chunk {row['chunk_latency_s']:.3f} s, {row['fps']:.1f} fps, first chunk {row['first_chunk_s']:.1f} s{decode}")


def _decode_seconds(decoder: StreamingDecoder, latents: torch.Tensor, chunk: int, like: torch.Tensor) -> list[float]:
    """Seconds to decode each chunk of a finished rollout to pixels, streamed as `sample` does while it rolls out.
    The rows' peak memory is the DiT's own: the VAE comes to the GPU for this decode after the rollout and leaves
    again, with its cache (about 1.8 GiB per stream at 480x832) and its 0.24 GiB of weights."""
    decoder.to(like.device)
    seconds = []
    try:
        for start in range(0, latents.shape[2], chunk):
            x0 = latents[:, :, start : start + chunk].to(like.device, like.dtype)
            if x0.is_cuda:
                torch.cuda.synchronize(x0.device)
            tic = time.perf_counter()
            pixels = decoder.decode(x0)
            if pixels.is_cuda:
                torch.cuda.synchronize(pixels.device)
            seconds.append(time.perf_counter() - tic)
    finally:  # out of memory too: the rows after this one must not carry the VAE
        decoder.to(torch.device("cpu"))
        torch.cuda.empty_cache()
    return seconds


def _bench_device(settings: BenchSettings, device: str | None) -> tuple[WanConfig, torch.device]:
    """The dense architecture of the preset and the device it runs on (the one device policy)."""
    dense_cfg = TINY_WAN if settings.preset == "tiny" else preset(settings.preset)
    return dense_cfg, choose_device(device, parameter_count(dense_cfg))


def bench_output(settings: BenchSettings, device: str | None) -> Path:
    """The default output folder, named for the run: bench-<preset>-<device type>."""
    return Path(f"bench-{settings.preset}-{_bench_device(settings, device)[1].type}")


def run_bench(settings: BenchSettings, *, device: str | None = None, journal_dir: Path | None = None,
              resume: bool = False) -> dict[str, Any]:
    """Measure every (variant, window, chunk, batch) and the long rollout; returns the JSON-ready report.

    With `journal_dir`, every measurement is written down there as it finishes (see bench_journal), and `resume`
    carries on from what an earlier run of the same settings wrote. With `compile`, each process compiles each
    shape in a warm-up rollout that is not measured, resumed ones included.
    device "cpu" exists to exercise the code on tiny configs (preset "tiny"); memory figures need CUDA.
    """
    dense_cfg, dev = _bench_device(settings, device)
    latent_size = check_video_size(settings.height, settings.width, dense_cfg)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    journal = None
    if journal_dir is not None:
        # Rows from another build would not compare either: the version and torch's are part of what must match.
        identity = {"journal": FORMAT, "device": name, "mlaconvert": __version__, "torch": torch.__version__, **settings.__dict__}
        journal = BenchJournal(journal_path(journal_dir, report_stem(settings, name)), identity, resume)
    # The card's memory free to this process (its CUDA context and any other process's use come off the total).
    card = torch.cuda.mem_get_info(dev)[0] / GiB if dev.type == "cuda" else None
    report: dict[str, Any] = {"rows": [], "card_gib": card, "streams_in_budget": {}, "long_rollout": {}, "paths": {}, "profile": {}}
    rates = functools.cache(lambda: device_rates(dev, default_dtype(dev), 4096 if dev.type == "cuda" else 256))
    _warm_up(dev)
    start = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task("bench", total=len(settings.variants) * _rollouts_per_variant(settings))
        # The VAE waits in host memory between decodes (`_decode_seconds`).
        decoder = StreamingDecoder(random_vae(dense_cfg.out_dim, small=settings.preset == "tiny", device="cpu",
                                              dtype=default_dtype(dev))) if settings.decode else None
        measure = _Rollouts(settings, journal, decoder, progress, task)
        # A block the compiler gave up on would run eagerly, unseen, in a report that says "compiled": it stops the bench.
        compiled_only = torch._dynamo.config.patch(fail_on_recompile_limit_hit=True) if settings.compile else contextlib.nullcontext()
        for variant in settings.variants:
            cfg = dense_cfg if variant == "dense" else mla_variant(dense_cfg, settings.dc, settings.rope_dim)
            with compiled_only:
                _bench_variant(random_model(cfg, dev, default_dtype(dev), settings.seed), measure, settings, latent_size,
                               report, journal, rates)
            torch.cuda.empty_cache()
    report = {
        "schema": "mlaconvert.bench/1",
        "mlaconvert_version": __version__,
        "device": name,
        "torch": torch.__version__,
        "settings": {**settings.__dict__},
        "mode": ("torch.compile (dynamic) of every block" if settings.compile else "eager PyTorch")
        + (", steady state as CUDA graphs" if settings.graphs and dev.type == "cuda" else "") + ", both variants"
        + (", every chunk of batch 1 decoded by a random-weight Wan 2.1 VAE in the compute dtype" if settings.decode else ""),
        **report,
        "seconds": time.perf_counter() - start,
    }
    report["ratios"] = _ratios(report)
    if journal is not None:
        report["resumed"] = resume
    return report


class _Rollouts:
    """The bench's rollouts, each journaled (kept from the journal when an earlier run measured it), reported in a
    line, and with `compile` preceded by a warm-up rollout of the same shape that is not measured."""

    def __init__(self, settings: BenchSettings, journal: BenchJournal | None, decoder: StreamingDecoder | None,
                 progress: Progress, task: TaskID):
        self.settings, self.journal, self.decoder, self.progress, self.task = settings, journal, decoder, progress, task
        self.warmed: set[tuple[str, int, int, int, str]] = set()

    def _say(self, line: str) -> None:
        # A line per rollout, so that a run cut short still shows what it measured.
        self.progress.console.print(line, highlight=False, soft_wrap=True)

    def __call__(self, model: WanModel, batch: int, frames: int, latent_size: tuple[int, int], sampler: SamplerSettings,
                 role: str = "timed") -> dict[str, Any]:
        """One rollout; `role`: timed (a row, out of memory allowed) or long (memory)."""
        variant = _variant(model)
        key = f"{variant} {role} w{sampler.window} c{sampler.chunk} b{batch} f{frames}"
        row, kept = _journaled(self.journal, key, lambda: self._run(model, batch, frames, latent_size, sampler, role))
        self._say(("kept " if kept else "") + _row_line(variant, role, row))
        self.progress.advance(self.task)
        return row

    def _run(self, model: WanModel, batch: int, frames: int, latent_size: tuple[int, int], sampler: SamplerSettings,
             role: str) -> dict[str, Any]:
        # The VAE's time grows with the batch (it decodes each stream's pixels); one stream shows its cost.
        decoder = self.decoder if role == "timed" and batch == 1 else None
        try:
            warm_up = self._warm_up(model, batch, frames, latent_size, sampler)
            return {**_measure(model, batch, frames, latent_size, sampler, decoder), **warm_up}
        except torch.OutOfMemoryError:
            if role != "timed":
                raise
            # Written down like any row: a resumed run does not try it again, nor reports a batch this
            # process happens to fit where the first one could not.
            return {"batch": batch, "window": sampler.window, "chunk": sampler.chunk, "oom": True}
        finally:
            torch.cuda.empty_cache()

    def _warm_up(self, model: WanModel, batch: int, frames: int, latent_size: tuple[int, int],
                 sampler: SamplerSettings) -> dict[str, float]:
        """With `compile`, this process compiles each shape in a rollout of its own first: compiling (and the memory
        the compiler takes) stays out of the rollout measured, resumed runs included."""
        # A long rollout past the RoPE table re-indexes its positions: other code, compiled on its own.
        positions = sampler.positions_for(frames)
        shape = (_variant(model), batch, sampler.window, sampler.chunk, positions)
        if not self.settings.compile or shape in self.warmed:
            return {}
        same = replace(sampler, positions=positions)
        first = _measure(model, batch, sampler.window + sampler.chunk, latent_size, same)["first_chunk_s"]
        self.warmed.add(shape)
        self._say(f"{shape[0]} warm-up batch {batch}: first chunk {first:.1f} s")
        return {"warm_up_first_chunk_s": first}


def _variant(model: WanModel) -> str:
    return "mla" if model.config.is_mla else "dense"


def _journaled(journal: BenchJournal | None, key: str, measure: Callable[[], Any]) -> tuple[Any, bool]:
    return journal.measured(key, measure) if journal is not None else (measure(), False)


def _bench_variant(model: WanModel, measure: Callable[..., dict[str, Any]], settings: BenchSettings, latent_size: tuple[int, int],
                   report: dict[str, Any], journal: BenchJournal | None, rates: Callable[[], dict[str, float]]) -> None:
    """Every (window, chunk, batch), the long rollout and the profile of one variant, into `report`."""
    variant, cfg = _variant(model), model.config
    if settings.compile:
        # Both variants' blocks run Block.forward, whose compiled-code cache one model's batches and
        # window sizes can fill: each variant starts from an empty one and pays its own compilation.
        torch._dynamo.reset()
        model.compile_blocks()
    path = report["paths"][variant] = _sampler_path(model, settings)
    for window in settings.windows:
        for chunk in settings.chunks:
            sampler = SamplerSettings.for_model(cfg, steps=settings.steps, chunk=chunk, window=window, seed=settings.seed,
                                                graphs=settings.graphs)
            peaks, first = _measure_batches(measure, model, variant, sampler, latent_size, settings, report["rows"])
            if first is not None:  # a (window, chunk) whose every batch ran out of memory has none
                path.setdefault("time_to_first_chunk_s", first)
            if 1 in peaks and 2 in peaks:
                streams = _streams_in_budget(peaks, settings.budget_gib, report["card_gib"])
                report["streams_in_budget"][f"{variant}/w{window}/c{chunk}"] = streams
    long = report["long_rollout"]
    if settings.long_seconds > 0:
        sampler = SamplerSettings.for_model(cfg, steps=settings.steps, chunk=settings.chunks[0],
                                            window=settings.windows[0], seed=settings.seed, graphs=settings.graphs)
        frames = latent_frames_for(settings.long_seconds)
        # The memory targets' rollout: the DiT alone.
        long[variant] = {**measure(model, 1, frames, latent_size, sampler, role="long"), "seconds_of_video": settings.long_seconds}
    long.setdefault("weights_gib", {})[variant] = sum(p.numel() * p.element_size() for p in model.parameters()) / GiB
    if settings.profile:
        device = next(model.parameters()).device
        shape = {"chunk": settings.chunks[0], "window": settings.windows[0], "latent_size": latent_size, "seed": settings.seed}

        def profile() -> dict[str, Any]:
            # Kernels from the plain forward (a profiler may not see into a graph), the wall time as the rows ran it.
            return forward_breakdown(steady_forward(model, **shape), device, rates(),
                                     timed=steady_forward(model, **shape, graphs=settings.graphs))

        report["profile"][variant] = _journaled(journal, f"{variant} profile", profile)[0]


def _warm_up(device: torch.device) -> None:
    """The process's one-time GPU set-up (cuBLAS and attention handles) before either variant: the variant
    measured first would otherwise pay it in its time to the first chunk."""
    if device.type != "cuda":
        return
    x = torch.randn(1, 2, 64, 64, device=device, dtype=torch.bfloat16)
    torch.nn.functional.scaled_dot_product_attention(x, x, x) @ x.transpose(-1, -2)
    torch.cuda.synchronize(device)


def _sampler_path(model: WanModel, settings: BenchSettings) -> dict[str, Any]:
    """The optimisations a variant's rollouts use, so that the ratio's fairness can be read off the report."""
    timed = max(w + c * settings.timed_chunks for w in settings.windows for c in settings.chunks)
    longest = max(timed, latent_frames_for(settings.long_seconds) if settings.long_seconds > 0 else 0)
    return {
        "cache": "+".join(f"{w}" for w in model.blocks[0].self_attn.cache_widths()) + " values per token and layer",
        # Keys are cached rotated only with absolute positions, which the sampler keeps while the RoPE table lasts.
        "keys_cached_rotated": model.blocks[0].self_attn.rotates_at_write and longest <= ROPE_TABLE,
        "compiled_blocks": settings.compile,
        "cuda_graphs": settings.graphs and next(model.parameters()).device.type == "cuda",
    }


def _measure_batches(
    measure: Callable[..., dict[str, Any]], model: WanModel, variant: str, sampler: SamplerSettings,
    latent_size: tuple[int, int], settings: BenchSettings, rows: list[dict[str, Any]],
) -> tuple[dict[int, float], float | None]:
    """One (window, chunk) of one variant at every batch asked for, plus batches 1 and 2 for the per-stream
    growth; appends the rows asked for and returns the peak memory (GiB) of each batch that has one, and how long
    the first chunk of its first rollout took (with --compile, its warm-up's: compilation included)."""
    window, chunk = sampler.window, sampler.chunk
    frames = window + chunk * settings.timed_chunks
    first = None
    peaks = {}
    for batch in sorted(set(settings.batches) | {1, 2}):
        row = {"variant": variant, **measure(model, batch, frames, latent_size, sampler)}
        if batch in settings.batches:
            rows.append(row)
        if first is None and not row.get("oom"):
            first = row.get("warm_up_first_chunk_s", row["first_chunk_s"])
        if not row.get("oom") and row["peak_memory_gib"] is not None:
            peaks[batch] = row["peak_memory_gib"]
    return peaks, first


def _streams_in_budget(peaks: dict[int, float], budget_gib: float, card_gib: float | None) -> dict[str, Any]:
    """Streams that fit `budget_gib` and the card's free memory, extrapolated from the peaks at batch 1 and 2."""
    per_stream = peaks[2] - peaks[1]
    fixed = peaks[1] - per_stream

    def fit(gib: float | None) -> int | None:
        return max(0, int((gib - fixed) // per_stream)) if gib is not None and per_stream > 0 else None

    return {"per_stream_gib": per_stream, "fixed_gib": fixed, "max_streams": fit(budget_gib), "max_streams_card": fit(card_gib)}


def _ratios(report: dict[str, Any]) -> dict[str, Any]:
    """MLA relative to dense for each measured configuration: the headline numbers."""
    out: dict[str, Any] = {}
    dense = {(r["window"], r["chunk"], r["batch"]): r for r in report["rows"] if r["variant"] == "dense" and not r.get("oom")}
    for r in report["rows"]:
        key = (r["window"], r["chunk"], r["batch"])
        if r["variant"] != "mla" or r.get("oom") or key not in dense:
            continue
        d = dense[key]
        out[f"w{key[0]}/c{key[1]}/b{key[2]}"] = {
            "throughput": r["fps"] / d["fps"],
            **({"throughput_end_to_end": r["fps_end_to_end"] / d["fps_end_to_end"]} if "fps_end_to_end" in r else {}),
            "cache": r["cache_mib"] / d["cache_mib"],
            "peak_memory": r["peak_memory_gib"] / d["peak_memory_gib"] if d["peak_memory_gib"] else None,
            "cached_values_per_token": f"{r['cached_values_per_token']} vs {d['cached_values_per_token']}",
        }
    streams = report["streams_in_budget"]
    for key, value in streams.items():
        if key.startswith("mla/") and f"dense/{key[4:]}" in streams:
            dense_streams = streams[f"dense/{key[4:]}"]["max_streams"]
            if value["max_streams"] is not None and dense_streams:  # none fits dense: no ratio to give
                out[f"streams/{key[4:]}"] = value["max_streams"] / dense_streams
    return out


PRINTED_KERNELS = 6  # of the profile's costliest kernels, on the console (the JSON keeps more)


def print_bench(report: dict[str, Any], console: Console) -> None:
    from rich.table import Table

    table = Table(title=f"dense vs MLA on {report['device']} ({report['mode']})", title_justify="left")
    decoded = any("fps_end_to_end" in r for r in report["rows"])
    names = ("variant", "window", "chunk", "batch", "values/token", "cache MiB", "peak GiB", "chunk s", "fps")
    for name in names + (("decode s", "fps with decode") if decoded else ()):
        table.add_column(name, justify="right")
    for r in report["rows"]:
        if r.get("oom"):
            table.add_row(r["variant"], str(r["window"]), str(r["chunk"]), str(r["batch"]), "", "", "OOM", *[""] * (len(table.columns) - 7))
            continue
        cells = [
            r["variant"], str(r["window"]), str(r["chunk"]), str(r["batch"]), str(r["cached_values_per_token"]),
            f"{r['cache_mib']:.1f}", "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}", f"{r['chunk_latency_s']:.3f}", f"{r['fps']:.1f}",
        ]
        if decoded:
            cells += [f"{r['decode_latency_s']:.3f}", f"{r['fps_end_to_end']:.1f}"] if "decode_latency_s" in r else ["-", "-"]
        table.add_row(*cells)
    console.print(table)
    for key, value in report["ratios"].items():
        if isinstance(value, dict):
            parts = [f"{name} {v:.2f}x" for name, v in value.items() if isinstance(v, float)]
            console.print(f"MLA / dense {key}: " + ", ".join(parts), highlight=False)
        else:
            console.print(f"MLA / dense {key}: {value:.2f}x", highlight=False)
    for key, value in report["streams_in_budget"].items():
        card = f", in the card's free {report['card_gib']:.0f} GiB: {value['max_streams_card']}" if report.get("card_gib") else ""
        console.print(f"streams in {report['settings']['budget_gib']:g} GiB, {key}: {value['max_streams']}{card}", highlight=False)
    for variant, path in report.get("paths", {}).items():
        if path.get("time_to_first_chunk_s") is not None:
            console.print(f"time to the first chunk, {variant}: {path['time_to_first_chunk_s']:.1f} s", highlight=False)
    for variant, p in report.get("profile", {}).items():
        k = p["kernel_ms"]
        console.print(f"one forward, {variant}: wall {p['wall_ms']:.1f} ms, kernels {k['total']:.1f} ms (attention {k['attention']:.1f}, "
                      f"matmul {k['matmul']:.1f}, other {k['other']:.1f}), FLOP floor {p['floor_ms']:.1f} ms", highlight=False, soft_wrap=True)
        for kernel in p.get("top_kernels", [])[:PRINTED_KERNELS]:
            console.print(f"  {kernel['ms']:7.2f} ms  {kernel['calls']:5d} calls  {kernel['kind']:<9} {kernel['name'][:90]}",
                          highlight=False, markup=False, soft_wrap=True)
    for variant, value in report["long_rollout"].items():
        if variant != "weights_gib":
            peak = "-" if value["peak_memory_gib"] is None else f"{value['peak_memory_gib']:.2f}"
            console.print(f"{value['seconds_of_video']:g} s rollout, {variant}: peak {peak} GiB, {value['fps']:.1f} fps", highlight=False)


def plot_bench(report: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    from mlaconvert.outputs import atomic_file

    rows = [r for r in report["rows"] if not r.get("oom")]
    labels = sorted({(r["window"], r["chunk"], r["batch"]) for r in report["rows"]})
    oom = {(r["variant"], (r["window"], r["chunk"], r["batch"])) for r in report["rows"] if r.get("oom")}
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    axes = fig.subplots(1, 3)
    metrics = [("fps", "video frames / s"), ("peak_memory_gib", "peak GPU memory (GiB)"), ("cache_mib", "KV cache (MiB)")]
    width = 0.38
    for ax, (metric, title) in zip(axes, metrics):
        for offset, variant in ((-width / 2, "dense"), (width / 2, "mla")):
            values = [next((r[metric] or 0 for r in rows if r["variant"] == variant and (r["window"], r["chunk"], r["batch"]) == key), 0) for key in labels]
            ax.bar([i + offset for i in range(len(labels))], values, width, label=variant)
            for i, key in enumerate(labels):
                if (variant, key) in oom:  # an empty slot would read as zero
                    ax.text(i + offset, 0, "out of\nmemory", ha="center", va="bottom", fontsize=8, rotation=90)
        ax.set_xticks(range(len(labels)), [f"w{w} c{c} b{b}" for w, c, b in labels])
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    settings = report["settings"]
    fig.suptitle(f"mlaconvert bench: {settings['preset']} on {report['device']}, {settings['height']}x{settings['width']}")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def report_stem(settings: BenchSettings, device_name: str) -> str:
    """bench-<device>[-compiled][-graphs]: the file name of a report, before its suffix."""
    tags = ("-compiled" if settings.compile else "") + ("-graphs" if settings.graphs else "")
    return "bench-" + device_name.lower().replace(" ", "-") + tags


def write_bench(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """The report as JSON and PNG in `out_dir`; the journal of its measurements, which they now hold, goes."""
    from mlaconvert.outputs import write_json

    out_dir = Path(out_dir)
    stem = report_stem(BenchSettings(**report["settings"]), report["device"])
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    write_json(json_path, report)
    plot_bench(report, png_path)
    journal_path(out_dir, stem).unlink(missing_ok=True)
    return json_path, png_path
