"""The rank report (DESIGN §4): the JSON that analyze writes and every export carries, its table and its figure.

Before converting, a user wants to know how much of each layer's key/value map a latent of width dc can hold.
For a dense model the report gives, per layer, the spectra, effective rank and truncation at dc of W_K, W_V and the
full joint matrix [s*W_K; W_V] (JSON key `kv`, kept for the schema); for an MLA model, the rank utilisation of its
latent budget. The numbers come from spectra.py; this module assembles them into one dict, written as
`rank_report.json`, drawn as `rank_report.png` and printed as a table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mlaconvert import __version__
from mlaconvert.conversion.spectra import effective_rank, layer_spectra, mla_utilisation, truncation_at
from mlaconvert.devices import choose_device
from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.config import WanConfig
from mlaconvert.outputs import atomic_dir, atomic_file, check_writable, write_json

SCHEMA = "mlaconvert.rank_report/1"
REPORT_JSON = "rank_report.json"
REPORT_PNG = "rank_report.png"

# "kv" is the full joint matrix (all key rows); convert's content joint matrix lives in factorize.py.
MATRICES = {"k": "W_K", "v": "W_V", "kv": "full joint [sW_K; W_V]"}
_PLOT_LABELS = {"k": "$W_K$", "v": "$W_V$", "kv": r"$[sW_K;\,W_V]$"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def spectrum_entry(sigma: torch.Tensor, *, energy: float, dc: int | None, rank_budget: int) -> dict[str, Any]:
    """One matrix's part of a layer in the report."""
    kept, error = truncation_at(sigma, dc) if dc is not None else (None, None)
    return {
        "effective_rank": effective_rank(sigma, energy),
        "rank_budget": rank_budget,
        "energy_at_dc": kept,
        "spectral_error_at_dc": error,
        # 7 digits is past what either route resolves and halves the file.
        "singular_values": [float(f"{x:.7g}") for x in sigma.tolist()],
    }


def check_options(dc: int | None, energy: float) -> None:
    """Reject a bad --dc/--energy before anything is loaded."""
    if dc is not None and dc <= 0:
        raise MlaconvertError(f"--dc must be a positive latent width, got {dc}")
    if not 0 < energy <= 1:  # also rejects NaN
        raise MlaconvertError(f"--energy must be in (0, 1], got {energy} (0.99 means 99% of the spectral energy)")


def _weight_names(index: int) -> tuple[str, str]:
    return f"blocks.{index}.self_attn.k.weight", f"blocks.{index}.self_attn.v.weight"


def _dense_layer(
    config: WanConfig,
    state_dict: Mapping[str, torch.Tensor],
    index: int,
    *,
    energy: float,
    dc: int | None,
    device: torch.device,
) -> dict[str, Any]:
    expected = (config.dim, config.dim)
    weights = []
    for name in _weight_names(index):
        if name not in state_dict:
            raise MlaconvertError(f"the checkpoint has no '{name}' although the config has {config.num_layers} layers")
        w = state_dict[name]
        if tuple(w.shape) != expected:
            raise MlaconvertError(
                f"'{name}' has shape {tuple(w.shape)}, the config (dim {config.dim}) expects {expected}"
            )
        if not torch.isfinite(w).all():
            raise MlaconvertError(f"'{name}' contains NaN or inf values; the checkpoint is damaged")
        weights.append(w)
    spectra = layer_spectra(*weights, device=device)
    budgets = _rank_budgets(config)
    entry: dict[str, Any] = {"index": index}
    for key in MATRICES:
        entry[key] = spectrum_entry(getattr(spectra, key), energy=energy, dc=dc, rank_budget=budgets[key])
    entry["kv"]["key_scale"] = spectra.key_scale
    return entry


def _rank_budgets(config: WanConfig) -> dict[str, int]:
    """min(rows, cols) of W_K, W_V (dim x dim) and [sW_K; W_V] (2*dim x dim)."""
    return {"k": config.dim, "v": config.dim, "kv": min(2 * config.dim, config.dim)}


def _mla_layer(config: WanConfig, state_dict: Mapping[str, torch.Tensor], index: int, *, energy: float) -> dict[str, Any]:
    prefix = f"blocks.{index}.self_attn."
    weights = {k[len(prefix) :]: state_dict[k] for k in state_dict if k.startswith(prefix)}
    mla = config.mla
    assert mla is not None
    return {
        "index": index,
        "mla": {
            "dc": mla.dc[index],
            "cached_values_per_token": {"dense": config.replace(mla=None).kv_values_per_token(),
                                        "mla": config.kv_values_per_token(index)},
            "utilisation": mla_utilisation(weights, energy=energy),
        },
    }


def _layer_analysis(
    config: WanConfig, state_dict: Mapping[str, torch.Tensor], *, energy: float, dc: int | None, device: torch.device
) -> Callable[[int], dict[str, Any]]:
    """The per-layer view that fits the model: dense K/V spectra, or an MLA model's rank utilisation."""
    if config.is_mla:
        return lambda index: _mla_layer(config, state_dict, index, energy=energy)
    tightest, budget = min(_rank_budgets(config).items(), key=lambda item: item[1])
    if dc is not None and dc > budget:
        raise MlaconvertError(
            f"--dc {dc} is above the rank budget of {MATRICES[tightest]} (min(rows, cols) = {budget} for dim "
            f"{config.dim}); choose dc <= {budget}"
        )
    return lambda index: _dense_layer(config, state_dict, index, energy=energy, dc=dc, device=device)


def build_report(
    config: WanConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    dc: int | None = None,
    energy: float = 0.99,
    source_info: Mapping[str, Any] | None = None,
    on_layer: Callable[[int], None] | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """The rank report of a model given by its config and native-named state dict.

    `on_layer(index)` is called after each layer, for progress display. `device` runs the spectra (default:
    the GPU when there is one: float64 eigvalsh there is still several times faster than on CPU cores).
    """
    check_options(dc, energy)
    device = device or choose_device(None)
    dense_values = config.replace(mla=None).kv_values_per_token()
    analyse = _layer_analysis(config, state_dict, energy=energy, dc=dc, device=device)
    start = time.perf_counter()
    layers = []
    for index in range(config.num_layers):
        layers.append(analyse(index))
        if on_layer is not None:
            on_layer(index)
    seconds = time.perf_counter() - start
    return {
        "schema": SCHEMA,
        "mlaconvert_version": __version__,
        "source": dict(source_info or {}),
        "model": {
            "num_layers": config.num_layers,
            "dim": config.dim,
            "num_heads": config.num_heads,
            "head_dim": config.head_dim,
        },
        "energy": energy,
        "dc": dc,
        "device": device_name(device),
        "method": "eigvalsh of Gram matrices, float64 (float32 on a CPU above 2^21 weights per matrix)",
        "seconds": round(seconds, 3),
        "cache": {
            "dense_values_per_token": dense_values,
            "dense_values_per_token_all_layers": dense_values * config.num_layers,
            # The MLA cache adds the shared rope key (dR values) to this; analyze does not choose dR.
            "latent_content_values_per_token": dc,
        },
        "summary": _summary(layers, dc),
        "layers": layers,
    }


def _summary(layers: list[dict[str, Any]], dc: int | None) -> dict[str, Any]:
    if "k" not in layers[0]:
        return _mla_summary(layers)
    mean_ranks = {key: float(np.mean([layer[key]["effective_rank"] for layer in layers])) for key in MATRICES}
    summary: dict[str, Any] = {"mean_effective_rank": mean_ranks}
    if dc is not None:
        errors = [layer["kv"]["spectral_error_at_dc"] for layer in layers]
        worst = int(np.argmax(errors))
        summary["kv_mean_energy_at_dc"] = float(np.mean([layer["kv"]["energy_at_dc"] for layer in layers]))
        summary["kv_mean_spectral_error_at_dc"] = float(np.mean(errors))
        summary["kv_max_spectral_error_at_dc"] = {"layer": layers[worst]["index"], "value": errors[worst]}
    return summary


def _mla_summary(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean utilisation of each MLA matrix (and measured errors, when a conversion recorded them)."""
    summary: dict[str, Any] = {"mean_utilisation": {}}
    for name in ("kv_down", "k_up_kv_down", "v_up_kv_down", "latents"):
        values = [layer["mla"]["utilisation"][name]["utilisation"] for layer in layers if layer["mla"]["utilisation"].get(name)]
        if values:
            summary["mean_utilisation"][name] = float(np.mean(values))
    measured = [layer["mla"]["measured"] for layer in layers if "measured" in layer["mla"]]
    if measured:
        summary["mean_measured_error"] = {k: float(np.mean([m[k] for m in measured])) for k in measured[0]}
    return summary


def write_report(report: Mapping[str, Any], folder: Path) -> None:
    """Write rank_report.json and rank_report.png into `folder`, each atomically."""
    write_json(folder / REPORT_JSON, report)
    plot_report(report, folder / REPORT_PNG)


def analyze_source(
    source: str,
    *,
    out_dir: Path,
    dc: int | None = None,
    energy: float = 0.99,
    config: str | None = None,
    head_dim: int = 128,
    device: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Load SOURCE, build its rank report, and write it into the folder `out_dir` (replaced only with force).

    `config` (preset name or config.json) and `head_dim` go to the loader, for checkpoints without a config.
    `device` (--device) runs the spectra; their size is not checked, as eigvalsh of a full-size model's
    matrices on the CPU takes minutes, not the hours a forward pass would.
    """
    from mlaconvert.checkpoints.hub import load_source
    from mlaconvert.progress import progress_bar

    check_options(dc, energy)
    out_dir = Path(out_dir)
    check_writable(out_dir, force)  # refuse before a possibly long download, not after it
    dev = choose_device(device)
    checkpoint = load_source(source, config=config, head_dim=head_dim, lazy=True)  # two tensors of a layer at a time
    with progress_bar() as progress:
        task = progress.add_task("spectra", total=checkpoint.config.num_layers)
        report = build_report(
            checkpoint.config,
            checkpoint.state_dict,
            dc=dc,
            energy=energy,
            source_info=checkpoint.info,
            on_layer=lambda _: progress.advance(task),
            device=dev,
        )
    with atomic_dir(out_dir, force) as folder:
        write_report(report, folder)
    return report


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _source_label(report: Mapping[str, Any]) -> str:
    source = report.get("source") or {}
    return str(source.get("spec") or source.get("repo_id") or source.get("path") or "state dict")


def _dc_per_layer(report: Mapping[str, Any]) -> list[int] | None:
    """`analyze` records one dc or none; a converted model's report may carry one per layer."""
    dc = report["dc"]
    if dc is None:
        return None
    return [int(d) for d in dc] if isinstance(dc, list) else [int(dc)] * len(report["layers"])


def print_report(report: Mapping[str, Any], console: Console) -> None:
    """Per-layer tables: the dense K/V effective ranks and truncation, and for MLA models the rank utilisation."""
    if "k" in report["layers"][0]:
        _print_dense(report, console)
    if "mla" in report["layers"][0]:
        _print_mla(report, console)


def _print_mla(report: Mapping[str, Any], console: Console) -> None:
    layers = report["layers"]
    measured = "measured" in layers[0]["mla"]
    title = f"MLA utilisation = effective rank / dc ({_percent(report['energy'])} energy) of W_KV_down, W_K_up W_KV_down, W_V_up W_KV_down, latents c"
    if measured:
        title += "; relative errors on calibration tokens vs the spectral prediction"
    table = Table(title=f"{title}: {_source_label(report)}", title_justify="left")
    for name in ("layer", "dc", "down", "Kup", "Vup", "c"):
        table.add_column(name, justify="right")
    if measured:
        for name in ("pred.", "K err", "V err", "attn err"):
            table.add_column(name, justify="right")
    for layer in layers:
        mla = layer["mla"]
        util = mla["utilisation"]
        cells = [util[k]["utilisation"] if util.get(k) else None for k in ("kv_down", "k_up_kv_down", "v_up_kv_down", "latents")]
        row = [str(layer["index"]), str(mla["dc"])]
        row += ["-" if c is None else f"{c:.0%}" for c in cells]
        if measured:
            m = mla["measured"]
            row += [f"{v:.3f}" for v in (mla["spectral_prediction"]["spectral_error_at_dc"], m["k_error"], m["v_error"], m["attn_error"])]
        table.add_row(*row)
    console.print(table)
    means = report["summary"].get("mean_utilisation") or _mla_summary(layers)["mean_utilisation"]
    console.print("mean utilisation: " + ", ".join(f"{k} {v:.0%}" for k, v in means.items()), highlight=False)


def _print_dense(report: Mapping[str, Any], console: Console) -> None:
    layers, summary = report["layers"], report["summary"]
    dcs = _dc_per_layer(report)
    uniform_dc = dcs[0] if dcs and len(set(dcs)) == 1 else None
    at_dc = f"at {uniform_dc}" if uniform_dc is not None else "at dc"
    truncation = layers[0]["kv"]["energy_at_dc"] is not None
    budgets = {key: layers[0][key]["rank_budget"] for key in MATRICES}  # every layer has the config's shapes
    table = Table(
        title=f"{_percent(report['energy'])}-energy effective rank of self-attention K/V: {_source_label(report)}",
        title_justify="left",
    )
    table.add_column("layer", justify="right")
    for key, label in MATRICES.items():
        table.add_column(Text(f"{label}\nof {budgets[key]}"), justify="right")  # Text: "[...]" is not markup
    if dcs and uniform_dc is None:
        table.add_column("dc", justify="right")
    if truncation:
        table.add_column(f"KV energy\nkept {at_dc}", justify="right")
        table.add_column(f"KV spectral\nerror {at_dc}", justify="right")
    for position, layer in enumerate(layers):
        row = [str(layer["index"])] + [str(layer[key]["effective_rank"]) for key in MATRICES]
        if dcs and uniform_dc is None:
            row.append(str(dcs[position]))
        if truncation:
            row += [f"{layer['kv']['energy_at_dc']:.2%}", f"{layer['kv']['spectral_error_at_dc']:.4f}"]
        table.add_row(*row)
    console.print(table)

    means = summary["mean_effective_rank"]
    line = f"mean effective rank: K {means['k']:.0f}, V {means['v']:.0f}, KV {means['kv']:.0f} of {budgets['kv']}"
    if "kv_mean_energy_at_dc" in summary:
        worst = summary["kv_max_spectral_error_at_dc"]
        line += (
            f"; dc {uniform_dc} keeps {summary['kv_mean_energy_at_dc']:.2%} of the KV energy on average "
            f"(spectral error mean {summary['kv_mean_spectral_error_at_dc']:.4f}, worst {worst['value']:.4f} "
            f"in layer {worst['layer']})"
        )
    line += f"; dense cache {report['cache']['dense_values_per_token']} values per token and layer"
    if uniform_dc is not None:
        line += f", latent {uniform_dc} + rope key"
    console.print(line, highlight=False)
    console.print(f"[dim]{report['method']} on {report['device']}, {report['seconds']:.1f} s[/]")


def plot_report(report: Mapping[str, Any], path: Path) -> None:
    """The report's picture as a PNG (see `report_figure`)."""
    with atomic_file(path) as tmp:
        report_figure(report).savefig(tmp, format="png", dpi=110)


def report_figure(report: Mapping[str, Any]) -> Any:
    """Figure: (a) effective rank per layer for K, V, KV against dc; (b) normalised joint KV spectra by depth;
    for an MLA model (c) rank utilisation and, when a conversion measured them, (d) the measured errors."""
    # Imported here so the CLI starts fast; a bare Figure renders through Agg without touching pyplot's
    # global backend or needing a display.
    from matplotlib.figure import Figure

    layers = report["layers"]
    has_dense, has_mla = "k" in layers[0], "mla" in layers[0]
    has_errors = has_mla and "measured" in layers[0]["mla"]
    panels = 2 * has_dense + has_mla + has_errors
    fig = Figure(figsize=(6.5 * panels, 5.5), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(1, panels)))
    if has_dense:
        _plot_dense(report, fig, axes[0], axes[1])
    tags = iter(["(c)", "(d)"] if has_dense else ["(a)", "(b)"])
    if has_mla:
        _plot_mla(report, axes[2 * has_dense], next(tags) if panels > 1 else "")
    if has_errors:
        _plot_errors(report, axes[-1], next(tags))
    title = "Self-attention K/V rank" if has_dense else "MLA rank utilisation"
    # An export is titled by itself, with the model it was made from.
    label = f"{report['export']} (from {_source_label(report)})" if report.get("export") else _source_label(report)
    fig.suptitle(f"{title}: {label}")
    return fig


def _plot_mla(report: Mapping[str, Any], ax: Any, tag: str) -> None:
    layers = report["layers"]
    indices = [layer["index"] for layer in layers]
    # Distinct dashes and marker sizes: the weight utilisations often coincide at 1.0 and would hide each other.
    styles = {"kv_down": ("o", "-", 8), "k_up_kv_down": ("^", "--", 6), "v_up_kv_down": ("s", ":", 4), "latents": ("D", "-", 4)}
    for name, (marker, line, size) in styles.items():
        values = [(layer["mla"]["utilisation"].get(name) or {}).get("utilisation") for layer in layers]
        if any(v is not None for v in values):
            ax.plot(indices, [np.nan if v is None else v for v in values], marker=marker, linestyle=line, markersize=size, label=name)
    ax.set_ylim(0, 1.05)
    _per_layer_axes(ax, "effective rank / dc", f"{tag} rank utilisation of the latent budget", columns=2)


def _per_layer_axes(ax: Any, ylabel: str, title: str, columns: int) -> None:
    """Integer layer ticks, labels, grid, and the legend below the plot where it covers no line."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title.strip())
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=columns, fontsize="small")


def _plot_errors(report: Mapping[str, Any], ax: Any, tag: str) -> None:
    layers = report["layers"]
    indices = [layer["index"] for layer in layers]
    names = {"attn_error": ("attention output", "k", "o"), "k_error": ("pre-norm key", "tab:blue", "^"),
             "k_normed_error": ("key after the norm", "tab:purple", "v"), "v_error": ("value", "tab:orange", "s")}
    top = 0.0
    for key, (label, color, marker) in names.items():
        values = [layer["mla"]["measured"].get(key) for layer in layers]
        if any(v is not None for v in values):  # reports written before k_normed_error lack it
            ax.plot(indices, [np.nan if v is None else v for v in values], color=color, marker=marker, markersize=4, label=label)
            top = max(top, np.nanmax([np.nan if v is None else v for v in values]))
    prediction = [layer["mla"]["spectral_prediction"]["spectral_error_at_dc"] for layer in layers]
    ax.plot(indices, prediction, "k:", label="spectral prediction at dc")
    ax.set_ylim(0, 1.1 * max(top, max(prediction), 1e-3))
    _per_layer_axes(ax, "relative error on calibration tokens", f"{tag} measured conversion error", columns=3)


def _plot_dense(report: Mapping[str, Any], fig: Any, rank_ax: Any, spectrum_ax: Any) -> None:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    layers = report["layers"]
    dcs = _dc_per_layer(report)
    uniform_dc = dcs[0] if dcs and len(set(dcs)) == 1 else None
    indices = [layer["index"] for layer in layers]

    styles = {"k": ("tab:blue", "o"), "v": ("tab:orange", "s"), "kv": ("tab:green", "^")}
    for key, label in _PLOT_LABELS.items():
        color, marker = styles[key]
        ranks = [layer[key]["effective_rank"] for layer in layers]
        rank_ax.plot(indices, ranks, color=color, marker=marker, markersize=4, label=label)
    budget = layers[0]["kv"]["rank_budget"]
    rank_ax.axhline(budget, color="0.4", linestyle=":", label=f"rank budget {budget}")
    if uniform_dc is not None:
        rank_ax.axhline(uniform_dc, color="tab:red", linestyle="--", label=f"dc = {uniform_dc}")
    elif dcs:
        rank_ax.step(indices, dcs, where="mid", color="tab:red", linestyle="--", label="dc per layer")
    rank_ax.set_ylim(0, budget * 1.3)  # headroom above the budget line for the legend
    rank_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    rank_ax.set_xlabel("layer")
    rank_ax.set_ylabel("effective rank")
    rank_ax.set_title(f"(a) {_percent(report['energy'])}-energy effective rank per layer")
    rank_ax.grid(alpha=0.3)
    rank_ax.legend(loc="upper center", ncol=3, fontsize="small")

    cmap = colormaps["viridis"]
    depth = Normalize(vmin=min(indices), vmax=max(max(indices), min(indices) + 1))
    floor = 1.0
    for layer in layers:
        sigma = np.asarray(layer["kv"]["singular_values"])
        if sigma.size == 0 or sigma[0] == 0:
            continue
        ratio = sigma / sigma[0]
        ranks = np.arange(1, sigma.size + 1)
        positive = ratio > 0  # a log axis cannot show exact zeros
        spectrum_ax.plot(ranks[positive], ratio[positive], color=cmap(depth(layer["index"])), linewidth=1)
        floor = min(floor, ratio[positive].min())
    spectrum_ax.set_yscale("log")
    # Snap to whole decades, at least two, so the log axis is labelled at powers of ten only.
    spectrum_ax.set_ylim(min(1e-2, 10 ** np.floor(np.log10(max(floor, 1e-6)))), 1.5)
    if uniform_dc is not None:
        spectrum_ax.axvline(uniform_dc, color="tab:red", linestyle="--", label=f"dc = {uniform_dc}")
        spectrum_ax.legend(loc="upper right", fontsize="small")
    spectrum_ax.set_xlabel("index i")
    spectrum_ax.set_ylabel(r"$\sigma_i\,/\,\sigma_1$")
    spectrum_ax.set_title(rf"(b) normalised spectrum of {_PLOT_LABELS['kv']}, coloured by depth")
    spectrum_ax.grid(alpha=0.3, which="major")
    colorbar = fig.colorbar(ScalarMappable(norm=depth, cmap=cmap), ax=spectrum_ax, label="layer")
    colorbar.locator = MaxNLocator(integer=True)
    colorbar.update_ticks()
