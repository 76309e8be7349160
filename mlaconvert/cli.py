"""The `mlaconvert` command: parses arguments, calls the library, prints. No logic lives here."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from mlaconvert import __version__
from mlaconvert.errors import MlaconvertError

app = typer.Typer(
    name="mlaconvert",
    help="Convert dense causal video DiTs (Wan2.1 and its streaming descendants) into MLA models with a latent KV cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

STEPS_HELP = "Denoising steps per chunk, evenly spaced from 1000 before the shift (4: 1000,750,500,250; default: the model's own)."
TIMESTEPS_HELP = "The denoising timesteps themselves, before the shift: a descending comma list in (0, 1000], e.g. 1000,500 (instead of --steps)."
SHIFT_HELP = "Flow-matching timestep shift (default: the model's own)."
DEVICE_HELP = "cuda or cpu (default: cuda when available, else the CPU; a full-size model needs --device cpu to run there)."
SOURCE_HELP = "Hub repo id (org/name, org/name@revision, org/name/path/to/file.pt), a local folder, a checkpoint file, or a built-in model (builtin:bouncing-balls, builtin:tiny-wan)."


def _version(value: bool) -> None:
    if value:
        out.print(f"mlaconvert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


@app.command()
def analyze(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    output: Path = typer.Option(Path("analysis"), "-o", "--output", help="Folder for rank_report.json and rank_report.png."),
    dc: Optional[int] = typer.Option(None, "--dc", help="Latent width to evaluate: energy kept and spectral error at dc."),
    energy: float = typer.Option(0.99, "--energy", help="Energy fraction that defines the effective rank."),
    config: Optional[str] = typer.Option(None, "--config", help="Preset name or config.json for checkpoints without one."),
    head_dim: int = typer.Option(128, "--head-dim", help="Head width assumed when a .pt checkpoint has no config."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu for the spectra (default: cuda when available, else the CPU)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
) -> None:
    """Singular spectra and effective rank of every layer's self-attention K/V -> rank report (JSON, PNG, table).

    Example: mlaconvert analyze builtin:bouncing-balls --dc 32 -o analysis
    """
    from mlaconvert.rank import analyze_source, print_report

    report = analyze_source(source, out_dir=output, dc=dc, energy=energy, config=config, head_dim=head_dim, device=device, force=force)
    print_report(report, out)
    out.print(f"wrote {output / 'rank_report.json'} and {output / 'rank_report.png'}")
    width = ["--dc", str(dc)] if dc is not None else ["--dc", "auto", *(["--energy", f"{energy:g}"] if energy != 0.99 else [])]
    _next(shlex.join(["mlaconvert", "convert", source, *width, "-o", f"{output}-mla"]))


@app.command()
def convert(
    source: Optional[str] = typer.Argument(None, help=SOURCE_HELP + " Optional with --recipe."),
    output: Path = typer.Option(..., "-o", "--output", help="Export folder (model.safetensors, config.json, rank report, README)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A recipes/*.toml file (or its name): source and \\[convert] settings."),
    dc: Optional[str] = typer.Option(None, "--dc", help="Latent width (default 192): an integer, 'auto' (per layer from --energy), a comma list, or a .json/.toml list."),
    rope_dim: Optional[int] = typer.Option(None, "--rope-dim", help="Width of the shared decoupled 3D-RoPE key (default 32)."),
    init: Optional[str] = typer.Option(None, "--init", help="svd (weights, default), asvd (activation-aware, calibrated) or random."),
    q_rank: Optional[int] = typer.Option(None, "--q-rank", help="Low-rank query of this rank (default: full query)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for calibration inputs and random init (default 0)."),
    energy: Optional[float] = typer.Option(None, "--energy", help="Energy that defines effective ranks, and dc for --dc auto (default 0.99)."),
    measure: Optional[bool] = typer.Option(None, "--measure/--no-measure", help="Calibration pass measuring K/V/attention error (default on)."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    config: Optional[str] = typer.Option(None, "--config", help="Preset name or config.json for checkpoints without one."),
    head_dim: int = typer.Option(128, "--head-dim", help="Head width assumed when a .pt checkpoint has no config."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
) -> None:
    """Dense self-attention -> MLA with a latent KV cache and a shared decoupled 3D-RoPE key; writes an export.

    Example: mlaconvert convert builtin:bouncing-balls --dc 32 -o bb-mla
    """
    from mlaconvert.convert import convert_source
    from mlaconvert.rank import print_report
    from mlaconvert.recipes import convert_settings, load_recipe

    plan = load_recipe(recipe) if recipe else {}
    source = source or plan.get("source")
    if not source:
        raise MlaconvertError("give a SOURCE, or a --recipe that names one")
    settings = convert_settings(plan, dc=dc, rope_dim=rope_dim, init=init, q_rank=q_rank, seed=seed, energy=energy, measure=measure)

    def left_behind() -> str:
        again = _rerun("--force") if output.exists() else shlex.join(["mlaconvert", *sys.argv[1:]])
        kept = f"'{output}' is as it was before" if output.exists() else f"nothing was written to '{output}'"
        return f"convert stopped before it finished; {kept} (no partial export is left); to convert, run again: {again}"

    with _on_interrupt(left_behind):
        _, report = convert_source(
            source, output, settings, force=force, config=config or plan.get("config"), head_dim=head_dim, device=device
        )
    print_report(report, out)
    cache = report["cache"]
    out.print(
        f"cached values per token, all layers: dense {cache['dense_values_per_token_all_layers']:,} -> "
        f"MLA {cache['mla_values_per_token_all_layers']:,} ({cache['reduction'] * 100:.1f}% less); "
        f"took {report['conversion']['seconds']['total']:.1f} s on {report['conversion']['device']}"
    )
    out.print(f"wrote the export to {output} (its README.md is the model card)")
    _next(shlex.join(["mlaconvert", "finetune", str(output), "-o", f"{output}-ft"]))


@app.command()
def finetune(
    model: str = typer.Argument(..., help="An MLA export (a folder written by `convert`)."),
    output: Path = typer.Option(..., "-o", "--output", help="Run folder: log, checkpoint, loss plot, agreement, and the fine-tuned export."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="The dense teacher (SOURCE); default: the source the export records."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A recipes/*.toml file (or its name): \\[finetune] settings."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (default 200)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Clips per step over all processes (default 1)."),
    accumulate: Optional[int] = typer.Option(None, "--accumulate", help="Micro-batches per step in each process (default 1)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate of AdamW (default 1e-4)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear warmup steps before the cosine decay (default 10)."),
    train: Optional[str] = typer.Option(None, "--train", help="mla (the new attention tensors, default), attn (all self-attention) or all."),
    layer_loss_weight: Optional[float] = typer.Option(None, "--layer-loss-weight", help="Weight of per-layer self-attention-output matching (default 0)."),
    clips: Optional[int] = typer.Option(None, "--clips", help="Teacher-generated clips, 2 of them held out (default 16)."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Latent frames per generated clip (default 6)."),
    height: Optional[int] = typer.Option(None, "--height", help="Height of generated clips in pixels (default 128)."),
    width: Optional[int] = typer.Option(None, "--width", help="Width of generated clips in pixels (default 128)."),
    chunk: Optional[int] = typer.Option(None, "--chunk", help="Latent frames per chunk, as the sampler runs (default: the model's own)."),
    steps: Optional[int] = typer.Option(None, "--steps", help=STEPS_HELP + " For the teacher's clips and the agreement measure."),
    timesteps: Optional[str] = typer.Option(None, "--timesteps", help=TIMESTEPS_HELP),
    shift: Optional[float] = typer.Option(None, "--shift", help=SHIFT_HELP),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints (default 50)."),
    checkpointing: Optional[bool] = typer.Option(None, "--checkpointing/--no-checkpointing", help="Activation checkpointing (default on)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of data order, timesteps, noise and generated clips (default 0)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder of *.safetensors clips ('latents' N,C,F,h,w and 'prompt_embeds' N,L,D) instead of generating."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per line, for generated clips (needs the umT5 encoder)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Diffusers-layout repo or folder with text_encoder/ and tokenizer/ for --prompts."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where generated clips are cached (default OUT/data)."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from its latest checkpoint."),
    force: bool = typer.Option(False, "--force", help="Start over in an existing OUT."),
) -> None:
    """Brief data-free distillation of an MLA export from its dense teacher; writes the fine-tuned export.

    Example: mlaconvert finetune bb-mla --max-steps 20 -o bb-ft
    """
    from mlaconvert.export import next_steps
    from mlaconvert.finetune import FinetuneSettings, finetune as run_finetune
    from mlaconvert.recipes import load_recipe, merge
    from mlaconvert.sampling import parse_timesteps

    plan = load_recipe(recipe) if recipe else {}
    overrides = dict(
        max_steps=max_steps, sampler_steps=steps, sampler_timesteps=parse_timesteps(timesteps) if timesteps else None, shift=shift,
        batch=batch, accumulate=accumulate, lr=lr, warmup=warmup, train=train, layer_loss_weight=layer_loss_weight,
        clips=clips, frames=frames, height=height, width=width, chunk=chunk, checkpoint_every=checkpoint_every,
        gradient_checkpointing=checkpointing, seed=seed,
    )
    settings = merge(FinetuneSettings, dict(plan.get("finetune", {})), overrides, "finetune")
    prompt_list = None
    if prompts is not None:
        if not prompts.is_file():
            raise MlaconvertError(f"no such prompts file: '{prompts}'")
        prompt_list = [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
    def left_behind() -> str:
        if (output / "checkpoint" / "state.pt").is_file():
            return f"finetune stopped; '{output}' keeps its latest checkpoint, log and clips; continue with: {_rerun('--resume')}"
        return f"finetune stopped before its first checkpoint ('{output}' keeps any generated clips); start again with: {_rerun('--force')}"

    with _on_interrupt(left_behind):
        result = run_finetune(
            model, output, settings, teacher=teacher, data=data, prompts=prompt_list, encoder=encoder, cache_dir=cache_dir,
            device=device, resume=resume, force=force,
        )
    if result.report is None:  # another process of a torchrun job: rank 0 reports
        return
    info = result.report["finetune"]
    before, after = info["before"]["agreement"], info["after"]["agreement"]
    out.print(
        f"{result.step} steps, final loss {info['final_loss']:.4g}, {info['tokens_per_s']:,.0f} tokens/s on {info['device']} "
        f"x{info['processes']}; teacher agreement: flow error {before['flow_relative_error_mean']:.4f} -> "
        f"{after['flow_relative_error_mean']:.4f}, rollout PSNR {before['rollout_psnr_db_mean']:.2f} -> {after['rollout_psnr_db_mean']:.2f} dB"
    )
    out.print(f"wrote the fine-tuned export to {output} (with train_log.jsonl, loss.png, agreement.json)")
    _next(next_steps(output))


@app.command()
def sample(
    model: str = typer.Argument(..., help="A dense source or an MLA export (any SOURCE form)."),
    output: Path = typer.Option(Path("sample"), "-o", "--output", help="Folder for latents.safetensors, run.json and video.mp4."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="Text prompt; repeat for a batch."),
    prompt_embeds: Optional[Path] = typer.Option(None, "--prompt-embeds", help="A safetensors file with prompt_embeds (B, L, D)."),
    random_text: bool = typer.Option(False, "--random-text", help="Seeded random text embeddings (tests, benchmarks)."),
    text_encoder: str = typer.Option("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "--text-encoder", help="Diffusers-layout repo or folder with text_encoder/ and tokenizer/."),
    vae: Optional[str] = typer.Option(None, "--vae", help="Diffusers-layout repo or folder with vae/: decode while rolling out and write video.mp4."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Latent frames to generate (4 video frames each)."),
    seconds: Optional[float] = typer.Option(None, "--seconds", help="Seconds of 16 fps video (default 5)."),
    height: Optional[int] = typer.Option(None, "--height", help="Video height in pixels (default: the prefix's, else the model's world, else 480)."),
    width: Optional[int] = typer.Option(None, "--width", help="Video width in pixels (default: the prefix's, else the model's world, else 832)."),
    prefix: Optional[Path] = typer.Option(None, "--prefix", help="Continue this video: a safetensors file with 'latents' (B, C, F, h, w), e.g. a sample's latents.safetensors; --frames counts the new frames."),
    batch: int = typer.Option(1, "--batch", help="Streams at once with --random-text."),
    chunk: Optional[int] = typer.Option(None, "--chunk", help="Latent frames per autoregressive chunk (default: the model's own)."),
    window: Optional[int] = typer.Option(None, "--window", help="Attention span in latent frames, the current chunk included (default: the model's own)."),
    sink: int = typer.Option(0, "--sink", help="First latent frames kept in the cache forever."),
    steps: Optional[int] = typer.Option(None, "--steps", help=STEPS_HELP),
    timesteps: Optional[str] = typer.Option(None, "--timesteps", help=TIMESTEPS_HELP),
    shift: Optional[float] = typer.Option(None, "--shift", help=SHIFT_HELP),
    positions: str = typer.Option("auto", "--positions", help="RoPE positions: absolute, reindex (inside the window) or auto."),
    seed: int = typer.Option(0, "--seed", help="Seed for all noise."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
) -> None:
    """Stream a video chunk by chunk with the model's KV cache (dense or latent); latents always, mp4 with --vae.

    Example: mlaconvert sample builtin:bouncing-balls --prompt "two balls: red, blue" --frames 30 -o sample
    """
    from mlaconvert.sampling import parse_timesteps
    from mlaconvert.sampling import sample as run_sample

    sampler = dict(
        steps=steps, timesteps=parse_timesteps(timesteps) if timesteps else None, shift=shift, chunk=chunk, window=window,
        sink=sink, positions=positions, seed=seed,
    )
    report = run_sample(
        model, output, frames=frames, seconds=seconds, height=height, width=width, prefix=prefix, prompts=prompt,
        prompt_embeds=prompt_embeds, random_text=random_text, text_encoder=text_encoder, vae=vae, batch=batch,
        sampler=sampler, device=device, force=force,
    )
    peak = report["peak_memory_bytes"]
    out.print(
        f"{report['latent_frames']} latent frames ({report['video_seconds']:g} s) x {report['batch']} with {report['attention']} "
        f"attention: {report['fps_latent_only']:.1f} fps (latent), {report['fps_end_to_end']:.1f} fps end to end, "
        f"cache {report['cache_bytes'] / 2**20:.1f} MiB" + (f", peak {peak / 2**30:.2f} GiB" if peak else "")
    )
    out.print(f"wrote {', '.join(sorted(p.name for p in output.iterdir()))} to {output}")
    _next(f"look at them, continue the video with --prefix {output / 'latents.safetensors'}, or judge a world "
          f"model (or any with --data clips): {shlex.join(['mlaconvert', 'eval', model, '-o', f'{output}-eval'])}")


@app.command(name="eval")
def eval_(
    model: str = typer.Argument(..., help="The model to judge: a dense source or an MLA export (any SOURCE form)."),
    output: Path = typer.Option(Path("eval"), "-o", "--output", help="Folder for eval.json, eval.png and strip.png."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="A dense teacher to compare with (default: the source an MLA export records)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder of *.safetensors clips with known continuations (as finetune --data); default: fresh clips of the model's world."),
    clips: int = typer.Option(32, "--clips", help="Fresh world clips to judge on."),
    frames: int = typer.Option(240, "--frames", help="Frames to roll out after the true prefix."),
    prefix: Optional[int] = typer.Option(None, "--prefix-frames", help="True frames given before the rollout (default: one chunk)."),
    batch: int = typer.Option(8, "--batch", help="Clips rolled out at once."),
    steps: Optional[int] = typer.Option(None, "--steps", help=STEPS_HELP),
    timesteps: Optional[str] = typer.Option(None, "--timesteps", help=TIMESTEPS_HELP),
    shift: Optional[float] = typer.Option(None, "--shift", help=SHIFT_HELP),
    window: Optional[int] = typer.Option(None, "--window", help="Attention span in latent frames (default: the model's own)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the clips and of all sampling noise."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
) -> None:
    """Roll out after a true prefix and compare with the true continuation (and the dense teacher), per horizon.

    Example: mlaconvert eval builtin:bouncing-balls --clips 8 --frames 60 -o eval
    """
    from mlaconvert.evaluate import EvalSettings, run_eval
    from mlaconvert.hub import load_source
    from mlaconvert.sampling import SamplerSettings, parse_timesteps

    config = load_source(model).config
    if teacher is None and config.is_mla:
        teacher = config.mla.source.get("repo")
    sampler = SamplerSettings.for_model(config, steps=steps, timesteps=parse_timesteps(timesteps) if timesteps else None,
                                        shift=shift, window=window, seed=seed)
    settings = EvalSettings(clips=clips, frames=frames, prefix=prefix, batch=batch, seed=seed)
    report = run_eval(model, output, teacher=teacher, data=data, settings=settings, sampler=sampler, device=device, force=force)
    print_eval(report)
    out.print(f"wrote {output / 'eval.json'}; look at {output / 'eval.png'} and {output / 'strip.png'}")


def print_eval(report: dict) -> None:
    """PSNR to the truth per horizon bucket, beside the baselines (and the teacher)."""
    from rich.table import Table

    table = Table(title=f"{report['model']} vs the truth (PSNR, dB)")
    teacher = any("teacher_psnr_db" in h for h in report["horizons"])
    for name in ("frames", "model", *(("teacher",) if teacher else ()), "copy-last", "background"):
        table.add_column(name, justify="right")
    for h in report["horizons"]:
        a, b = h["frames"]
        row = [f"[{a}, {b})", f"{h['psnr_db']:.2f}", *([f"{h['teacher_psnr_db']:.2f}"] if teacher else []),
               f"{h['baseline_psnr_db']:.2f}", f"{h['background_psnr_db']:.2f}"]
        table.add_row(*row)
    out.print(table)


@app.command()
def bench(
    preset_name: str = typer.Option("wan2.1-1.3b", "--preset", help="Architecture with random weights: wan2.1-1.3b, wan2.1-14b, or tiny."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Folder for bench-<device>.json and .png (default: bench-PRESET-DEVICE)."),
    height: int = typer.Option(480, "--height", help="Video height in pixels."),
    width: int = typer.Option(832, "--width", help="Video width in pixels."),
    steps: Optional[int] = typer.Option(None, "--steps", help=STEPS_HELP),
    window: list[int] = typer.Option([21], "--window", help="Window sizes (repeat the option for a grid)."),
    chunk: list[int] = typer.Option([3], "--chunk", help="Chunk sizes (repeatable)."),
    batch: list[int] = typer.Option([1], "--batch", help="Batch sizes (repeatable)."),
    dc: int = typer.Option(192, "--dc", help="Latent width of the MLA variant (values per token and layer, besides the rope key)."),
    rope_dim: int = typer.Option(32, "--rope-dim", help="Width of the MLA variant's shared 3D-RoPE key."),
    timed_chunks: int = typer.Option(4, "--timed-chunks", help="Chunks timed after the window is full."),
    long_seconds: float = typer.Option(60.0, "--long-seconds", help="Length of the peak-memory rollout (0 skips it)."),
    budget: float = typer.Option(80.0, "--budget-gib", help="Memory budget for the concurrent-streams estimate."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    compile_blocks: bool = typer.Option(False, "--compile", help="torch.compile the blocks of both variants."),
    force: bool = typer.Option(False, "--force", help="Write into an existing output folder (replacing files of the same name)."),
) -> None:
    """Dense vs MLA in one process on one GPU: cache size, peak memory, chunk latency, fps, streams in a budget.

    Example: mlaconvert bench --preset tiny --device cpu --height 64 --width 64 --window 6 --long-seconds 0
    """
    from mlaconvert.bench import BenchSettings, bench_output, print_bench, run_bench, write_bench
    from mlaconvert.outputs import check_writable

    settings = BenchSettings(
        preset=preset_name, height=height, width=width, steps=steps, windows=tuple(window), chunks=tuple(chunk), batches=tuple(batch),
        dc=dc, rope_dim=rope_dim, timed_chunks=timed_chunks, long_seconds=long_seconds, budget_gib=budget,
        compile=compile_blocks,
    )
    output = output or bench_output(settings, device)
    check_writable(output, force)  # before the minutes of measuring, not after
    report = run_bench(settings, device=device)
    print_bench(report, out)
    json_path, png_path = write_bench(report, output)
    out.print(f"wrote {json_path}; look at {png_path}")


@app.command()
def pretrain(
    output: Path = typer.Option(..., "-o", "--output", help="Run folder: log, loss plot, checkpoint, and the trained model (a valid SOURCE)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A recipes/*.toml file (or its name) with a \\[pretrain] table, e.g. bouncing-balls."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (default: the recipe's)."),
    init: Optional[str] = typer.Option(None, "--init", help="SOURCE whose weights the run starts from (default: the recipe's, else random)."),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Seconds of training before stopping with a checkpoint (continue with --resume)."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from its latest checkpoint."),
    force: bool = typer.Option(False, "--force", help="Start over in an existing OUT."),
) -> None:
    """Train the built-in world model from scratch on the bouncing-balls world (one GPU, minutes).

    Example: mlaconvert pretrain --recipe bouncing-balls -o bouncing-balls
    """
    from mlaconvert.pretrain import pretrain as run_pretrain, settings_from_recipe
    from mlaconvert.progress import progress_bar
    from mlaconvert.recipes import load_recipe

    plan = load_recipe(recipe) if recipe else {}
    settings = settings_from_recipe(dict(plan.get("pretrain", {})))
    if max_steps is not None:
        settings.max_steps = max_steps
    if init is not None:
        settings.init = init

    def left_behind() -> str:
        return f"pretrain stopped; '{output}' keeps its latest checkpoint and log; continue with: {_rerun('--resume')}"

    with _on_interrupt(left_behind), progress_bar() as progress:
        task = progress.add_task("pretrain", total=settings.max_steps)
        result = run_pretrain(output, settings, device=device, resume=resume, force=force, time_limit=time_limit,
                              on_step=lambda row: progress.update(task, completed=row["step"]))
    last = result.log[-1] if result.log else {}
    if not result.finished:
        out.print(f"stopped at step {result.step} of {settings.max_steps} (time limit); continue with: {_rerun('--resume')}")
        return
    out.print(f"{result.step} steps, final loss {last.get('loss', float('nan')):.4g}; wrote the model to {output}")
    _next(f"mlaconvert eval {output} -o {output}-eval")


class Interrupted(Exception):
    """Ctrl-C during a long job, with what it leaves behind and how to carry on (exit status 130)."""


@contextlib.contextmanager
def _on_interrupt(explain: Callable[[], str]) -> Iterator[None]:
    # typer turns a KeyboardInterrupt into a bare exit status; catching it here keeps the job's context.
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(explain()) from None


def _next(step: str) -> None:
    """What to run next, on one line however narrow the terminal, so that it can be copied whole."""
    out.print(f"next: {step}", soft_wrap=True, highlight=False)


def _rerun(flag: str) -> str:
    """This very command line with `flag` instead of --force/--resume: what to run to carry on."""
    args = [a for a in sys.argv[1:] if a not in ("--force", "--resume")]
    return shlex.join(["mlaconvert", *args, flag])


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 1, usage errors click's usage
    message and status 2, Ctrl-C one line and status 130; anything else is a bug and shows its traceback."""
    try:
        code = app(standalone_mode=False)
    except Interrupted as e:
        console.print(f"[bold red]interrupted:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(130)
    except MlaconvertError as e:
        if os.environ.get("MLACONVERT_DEBUG"):
            raise
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.TyperException as e:  # click's usage errors, as typer (which bundles its own click) raises them
        e.show()
        sys.exit(e.exit_code)
    except typer.Abort:
        console.print("aborted", highlight=False)
        sys.exit(1)
    if code == 130:  # typer's answer to a Ctrl-C outside the long jobs
        console.print("interrupted; nothing was written", highlight=False)
    sys.exit(code if isinstance(code, int) else 0)
