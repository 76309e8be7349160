"""The `mlaconvert` command: parses arguments, calls the library, prints. No logic lives here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

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

SOURCE_HELP = (
    "Hub repo id (org/name[@revision][/file]), a local folder, a checkpoint file, or builtin:tiny-wan."
)


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
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
) -> None:
    """Singular spectra and effective rank of every layer's self-attention K/V -> rank report (JSON, PNG, table)."""
    from mlaconvert.rank import analyze_source, print_report

    report = analyze_source(source, out_dir=output, dc=dc, energy=energy, config=config, head_dim=head_dim, force=force)
    print_report(report, out)
    out.print(f"wrote {output / 'rank_report.json'} and {output / 'rank_report.png'}")


@app.command()
def convert(
    source: Optional[str] = typer.Argument(None, help=SOURCE_HELP + " Optional with --recipe."),
    output: Path = typer.Option(..., "-o", "--output", help="Export folder (model.safetensors, config.json, rank report, README)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A recipes/*.toml file (or its name): source and [convert] settings."),
    dc: Optional[str] = typer.Option(None, "--dc", help="Latent width (default 192): an integer, 'auto' (per layer from --energy), a comma list, or a .json/.toml list."),
    rope_dim: Optional[int] = typer.Option(None, "--rope-dim", help="Width of the shared decoupled 3D-RoPE key (default 32)."),
    init: Optional[str] = typer.Option(None, "--init", help="svd (weights, default), asvd (activation-aware, calibrated) or random."),
    q_rank: Optional[int] = typer.Option(None, "--q-rank", help="Low-rank query of this rank (default: full query)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for calibration inputs and random init (default 0)."),
    energy: Optional[float] = typer.Option(None, "--energy", help="Energy that defines effective ranks, and dc for --dc auto (default 0.99)."),
    measure: Optional[bool] = typer.Option(None, "--measure/--no-measure", help="Calibration pass measuring K/V/attention error (default on)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    config: Optional[str] = typer.Option(None, "--config", help="Preset name or config.json for checkpoints without one."),
    head_dim: int = typer.Option(128, "--head-dim", help="Head width assumed when a .pt checkpoint has no config."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
) -> None:
    """Dense self-attention -> MLA with a latent KV cache and a shared decoupled 3D-RoPE key; writes an export."""
    from mlaconvert.convert import ConvertSettings, convert_source, parse_dc
    from mlaconvert.rank import print_report
    from mlaconvert.recipes import load_recipe, merge

    plan = load_recipe(recipe) if recipe else {}
    source = source or plan.get("source")
    if not source:
        raise MlaconvertError("give a SOURCE, or a --recipe that names one")
    overrides = dict(dc=parse_dc(dc) if dc else None, rope_dim=rope_dim, init=init, q_rank=q_rank, seed=seed, energy=energy, measure=measure)
    section = dict(plan.get("convert", {}))
    if isinstance(section.get("dc"), str):
        section["dc"] = parse_dc(section["dc"])
    settings = merge(ConvertSettings, section, overrides, "convert")
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
    out.print(f"wrote {output}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 1, never a traceback."""
    debug = bool(os.environ.get("MLACONVERT_DEBUG"))
    try:
        app(standalone_mode=False)
    except MlaconvertError as e:
        if debug:
            raise
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted", highlight=False)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click's usage errors and anything unforeseen still get one line
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        if debug:
            raise
        console.print(
            f"[bold red]error:[/] {type(e).__name__}: {e} (set MLACONVERT_DEBUG=1 for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
