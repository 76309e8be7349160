"""The `mlaconvert` command: parses arguments, calls the library, prints. No logic lives here.

A setting of a library dataclass (sampler, finetune, eval, bench, pretrain, convert) is offered through
`options(...)`, which builds its option from the field (cli_options): its default and help are written there.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from mlaconvert import __version__
from mlaconvert.cli_options import options, with_options
from mlaconvert.conversion.convert import ConvertSettings
from mlaconvert.errors import MlaconvertError
from mlaconvert.evaluation.evaluate import EvalSettings
from mlaconvert.evaluation.study import StudySettings
from mlaconvert.inference.bench import BenchSettings
from mlaconvert.inference.sampling import SamplerOptions, SamplerSettings
from mlaconvert.training.finetune import FinetuneSettings
from mlaconvert.training.memory_plan import MemoryPlan
from mlaconvert.training.pretrain import PretrainSettings

app = typer.Typer(
    name="mlaconvert",
    help="Convert dense causal video DiTs (Wan2.1 and its streaming descendants) into MLA models with a latent KV cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
LOGGED_WIDTH = 160  # columns of results written to a file or a pipe
console = Console(stderr=True)
# Piped or logged, rich would assume 80 columns and cut the tables' headers short.
out = Console() if sys.stdout.isatty() else Console(width=LOGGED_WIDTH)

Device = Annotated[Optional[str], typer.Option(
    "--device", help="cuda or cpu (default: cuda when available, else the CPU; a full-size model needs --device cpu to run there).")]
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
    energy: float = typer.Option(ConvertSettings.energy, "--energy", help="Energy fraction that defines the effective rank."),
    config: Optional[str] = typer.Option(None, "--config", help="Preset name or config.json for checkpoints without one."),
    head_dim: int = typer.Option(128, "--head-dim", help="Head width assumed when a .pt checkpoint has no config."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu for the spectra (default: cuda when available, else the CPU)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
) -> None:
    """Singular spectra and effective rank of every layer's self-attention K/V -> rank report (JSON, PNG, table).

    Example: mlaconvert analyze builtin:bouncing-balls --dc 32 -o analysis
    """
    from mlaconvert.conversion.rank import analyze_source, print_report

    report = analyze_source(source, out_dir=output, dc=dc, energy=energy, config=config, head_dim=head_dim, device=device, force=force)
    print_report(report, out)
    out.print(f"wrote {output / 'rank_report.json'} and {output / 'rank_report.png'}")
    width = ["--dc", str(dc)] if dc is not None else ["--dc", "auto", *(["--energy", f"{energy:g}"] if energy != ConvertSettings.energy else [])]
    _next(shlex.join(["mlaconvert", "convert", source, *width, "-o", f"{output}-mla"]))


@app.command()
@with_options
def convert(
    source: Optional[str] = typer.Argument(None, help=SOURCE_HELP + " Optional with --recipe."),
    output: Path = typer.Option(..., "-o", "--output", help="Export folder (model.safetensors, config.json, rank report, README)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A recipes/*.toml file (or its name): source and \\[convert] settings; the options given override them."),
    overrides: dict[str, Any] = options(ConvertSettings, "dc", "rope_dim", "init", "q_rank", "seed", "energy", "measure"),
    device: Device = None,
    config: Optional[str] = typer.Option(None, "--config", help="Preset name or config.json for checkpoints without one."),
    head_dim: int = typer.Option(128, "--head-dim", help="Head width assumed when a .pt checkpoint has no config."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
) -> None:
    """Dense self-attention -> MLA with a latent KV cache and a shared decoupled 3D-RoPE key; writes an export.

    Example: mlaconvert convert builtin:bouncing-balls --dc 32 -o bb-mla
    """
    from mlaconvert.conversion.convert import convert_source
    from mlaconvert.conversion.rank import print_report
    from mlaconvert.recipes import convert_settings, load_recipe

    plan = load_recipe(recipe) if recipe else {}
    source = source or plan.get("source")
    if not source:
        raise MlaconvertError("give a SOURCE, or a --recipe that names one")
    settings = convert_settings(plan, **overrides)

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
@with_options
def finetune(
    model: str = typer.Argument(..., help="An MLA export (a folder written by `convert`)."),
    output: Path = typer.Option(..., "-o", "--output", help="Run folder: log, checkpoint, loss plot, agreement, and the fine-tuned export."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="The dense teacher (SOURCE); default: the source the export records."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A recipes/*.toml file (or its name): \\[finetune] settings; the options given override them."),
    overrides: dict[str, Any] = options(
        FinetuneSettings, "max_steps", "batch", "accumulate", "shard", "lr", "warmup", "train", "layer_loss_weight", "own_context", "context_noise", "horizon_frames", "clips", "frames",
        "height", "width", "chunk", "sampler_steps", "sampler_timesteps", "shift", "checkpoint_every", "gradient_checkpointing",
        "seed", sampler_steps="--steps", sampler_timesteps="--timesteps", gradient_checkpointing="--checkpointing/--no-checkpointing",
    ),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder of *.safetensors clips ('latents' N,C,F,h,w and 'prompt_embeds' N,L,D) instead of generating."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per line, for generated clips (needs the umT5 encoder)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Diffusers-layout repo or folder with text_encoder/ and tokenizer/ for --prompts."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where generated clips are cached (default OUT/data)."),
    device: Device = None,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from its latest checkpoint."),
    force: bool = typer.Option(False, "--force", help="Start over in an existing OUT."),
) -> None:
    """Brief data-free distillation of an MLA export from its dense teacher; writes the fine-tuned export.

    Example: mlaconvert finetune bb-mla --max-steps 20 -o bb-ft
    """
    from mlaconvert.conversion.export import next_steps
    from mlaconvert.recipes import load_recipe, merge
    from mlaconvert.training.finetune import finetune as run_finetune

    plan = load_recipe(recipe) if recipe else {}
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
            device=device, resume=resume, force=force, on_plan=print_memory_plan,
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


def print_memory_plan(plan: MemoryPlan) -> None:
    from rich.table import Table

    where = f"each of {plan.processes} processes" if plan.processes > 1 else "the device"
    table = Table(title=f"memory plan: what {where} will hold", title_justify="left")
    table.add_column("")
    table.add_column("GiB", justify="right")
    for what, gib in plan.rows():
        table.add_row(what, f"{gib:.2f}")
    out.print(table)


@app.command()
@with_options
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
    sampler: dict[str, Any] = options(SamplerOptions),
    device: Device = None,
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
) -> None:
    """Stream a video chunk by chunk with the model's KV cache (dense or latent); latents always, mp4 with --vae.

    Example: mlaconvert sample builtin:bouncing-balls --prompt "two balls: red, blue" --frames 30 -o sample
    """
    from mlaconvert.inference.sampling import sample as run_sample

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
@with_options
def eval_(
    model: str = typer.Argument(..., help="The model to judge: a dense source or an MLA export (any SOURCE form)."),
    output: Path = typer.Option(Path("eval"), "-o", "--output", help="Folder for eval.json, eval.png and strip.png."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="A dense teacher to compare with (default: the source an MLA export records)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder of *.safetensors clips with known continuations (as finetune --data); default: fresh clips of the model's world."),
    chosen: dict[str, Any] = options(EvalSettings, "clips", "frames", "prefix", "batch", "seed", prefix="--prefix-frames"),
    sampler: dict[str, Any] = options(SamplerOptions, "steps", "timesteps", "shift", "chunk", "window", "sink", "positions", "graphs", "compile"),
    device: Device = None,
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
) -> None:
    """Roll out after a true prefix and compare with the true continuation (and the dense teacher), per horizon.

    Example: mlaconvert eval builtin:bouncing-balls --clips 8 --frames 60 -o eval
    """
    from mlaconvert.checkpoints.hub import load_source
    from mlaconvert.evaluation.evaluate import run_eval

    config = load_source(model).config
    if teacher is None and config.is_mla:
        teacher = config.mla.source.get("repo")
    settings = EvalSettings(**chosen)
    rollouts = SamplerSettings.for_model(config, **sampler, seed=settings.seed)  # eval's --seed seeds the sampler too
    report = run_eval(model, output, teacher=teacher, data=data, settings=settings, sampler=rollouts, device=device, force=force)
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
@with_options
def study(
    model: str = typer.Argument(None, help="The dense model to study (any SOURCE form; default: the recipe's source)."),
    output: Path = typer.Option(Path("study"), "-o", "--output", help="Folder for study.json, study.png, strip.png and every cell."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A recipes/*.toml file (or its name) with \\[study], \\[finetune] and \\[eval] tables, e.g. bouncing-balls-study; the options given override it."),
    grid: dict[str, Any] = options(StudySettings, "dc", "init", "rope_dim", "max_steps", "headline_steps", "headline_cache", "workers"),
    evaluation: dict[str, Any] = options(EvalSettings, "clips", "frames", "batch"),
    device: Device = None,
    force: bool = typer.Option(False, "--force", help="Start over in a folder that holds another study."),
) -> None:
    """Convert, evaluate, fine-tune and evaluate again every (init, dc) of a grid; the headline cell re-runs the
    best small cache with a longer fine-tune. Running it again carries on where it stopped.

    Example: mlaconvert study --recipe bouncing-balls-study -o study
    """
    from mlaconvert.evaluation.study import study as run_study
    from mlaconvert.recipes import load_recipe, merge

    plan = load_recipe(recipe) if recipe else {}
    source = model or plan.get("source")
    if source is None:
        raise MlaconvertError("name the model to study, or give a --recipe with a source")
    settings = merge(StudySettings, dict(plan.get("study", {})), grid, "study")
    evaluation_settings = merge(EvalSettings, dict(plan.get("eval", {})), evaluation, "eval")
    finetune_settings = merge(FinetuneSettings, dict(plan.get("finetune", {})), {}, "finetune")

    def left_behind() -> str:
        again = shlex.join(["mlaconvert", *(a for a in sys.argv[1:] if a != "--force")])
        return f"study stopped; '{output}' keeps every finished stage; carry on with the same command: {again}"

    with _on_interrupt(left_behind):
        result = run_study(source, output, settings, finetune=finetune_settings, evaluation=evaluation_settings, device=device,
                           force=force, on_stage=lambda cell, stage: out.print(f"{cell}: {stage}", highlight=False))
    print_study(result)
    out.print(f"wrote {output / 'study.json'}; look at {output / 'study.png'} and {output / 'strip.png'}")


def print_study(result: dict) -> None:
    """Per cell: cache, then PSNR after fine-tuning per horizon bucket beside dense; the headline's verdict."""
    from rich.table import Table

    from mlaconvert.evaluation.study_report import headline_verdict, run_label

    dense = result["dense"]["horizons"]
    table = Table(title=f"{result['model']}: PSNR to the truth after fine-tuning (dB)")
    for column in ("cell", "cache", *(f"[{h['frames'][0]}, {h['frames'][1]})" for h in dense)):
        table.add_column(column, justify="right")
    table.add_row("dense", "100%", *(f"{h['psnr_db']:.2f}" for h in dense))
    for cell in result["cells"]:
        name = f"{cell['init']} dc {cell['dc']}, {cell['finetune_steps']} steps"
        table.add_row(name, f"{cell['cache_fraction']:.1%}", *(f"{h['psnr_db']:.2f}" for h in cell["after"]["horizons"]))
    for cell in result.get("headline_runs", []):
        name = f"headline {cell['init']} dc {cell['dc']}, {run_label(cell)}"
        table.add_row(name, f"{cell['cache_fraction']:.1%}", *(f"{h['psnr_db']:.2f}" for h in cell["after"]["horizons"]))
    out.print(table)
    if result.get("headline"):
        out.print(f"headline ({run_label(result['headline'])}): {headline_verdict(result['headline'])}")


@app.command()
@with_options
def bench(
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Folder for bench-<device>.json and .png (default: bench-PRESET-DEVICE)."),
    chosen: dict[str, Any] = options(
        BenchSettings, "preset", "height", "width", "steps", "windows", "chunks", "batches", "dc", "rope_dim", "timed_chunks",
        "long_seconds", "budget_gib", "compile", "graphs", "profile", "decode", windows="--window", chunks="--chunk", batches="--batch",
    ),
    device: Device = None,
    resume: bool = typer.Option(False, "--resume", help="Carry on a bench cut short: keep what it measured in OUT (same settings, same device)."),
    force: bool = typer.Option(False, "--force", help="Write into an existing output folder (replacing files of the same name)."),
) -> None:
    """Dense vs MLA in one process on one GPU: cache size, peak memory, chunk latency, fps, streams in a budget.

    Example: mlaconvert bench --preset tiny --device cpu --height 64 --width 64 --window 6 --long-seconds 0
    """
    from mlaconvert.inference.bench import bench_output, print_bench, run_bench, write_bench
    from mlaconvert.outputs import check_writable

    settings = BenchSettings(**chosen)
    output = output or bench_output(settings, device)
    if not resume:
        check_writable(output, force)  # before the minutes of measuring, not after

    def left_behind() -> str:
        return f"bench stopped; '{output}' keeps what it measured; continue with: {_rerun('--resume')}"

    with _on_interrupt(left_behind):
        report = run_bench(settings, device=device, journal_dir=output, resume=resume)
    print_bench(report, out)
    json_path, png_path = write_bench(report, output)
    out.print(f"wrote {json_path}; look at {png_path}")


@app.command()
@with_options
def pretrain(
    output: Path = typer.Option(..., "-o", "--output", help="Run folder: log, loss plot, checkpoint, and the trained model (a valid SOURCE)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A recipes/*.toml file (or its name) with a \\[pretrain] table, e.g. bouncing-balls; the options given override it."),
    overrides: dict[str, Any] = options(PretrainSettings, "max_steps", "init"),
    time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Seconds of training before stopping with a checkpoint (continue with --resume)."),
    device: Device = None,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from its latest checkpoint."),
    force: bool = typer.Option(False, "--force", help="Start over in an existing OUT."),
) -> None:
    """Train the built-in world model from scratch on the bouncing-balls world (one GPU, minutes).

    Example: mlaconvert pretrain --recipe bouncing-balls -o bouncing-balls
    """
    from mlaconvert.progress import progress_bar
    from mlaconvert.recipes import load_recipe
    from mlaconvert.training.pretrain import pretrain as run_pretrain, settings_from_recipe

    plan = load_recipe(recipe) if recipe else {}
    settings = settings_from_recipe({**plan.get("pretrain", {}), **overrides})

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
