"""The study's report: the four claims as tables (study.md) and in one figure, and truth | dense | MLA side by
side (strip and video)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from mlaconvert.evaluation.evaluate import strip_columns, write_strip
from mlaconvert.evaluation.study import gaps_db, reaches

INIT_COLOURS = {"svd": "C0", "asvd": "C2", "random": "C3"}


def _label(cell: dict[str, Any]) -> str:
    return f"{cell['init']} dc {cell['dc']}"


def _widths(dc: str) -> list[int]:
    return [int(x) for x in dc.split(",")]


def plot_study(result: dict[str, Any], path: Path) -> None:
    """Four panels, one per claim: spectra against dc, quality against the spectral prediction, rank
    utilisation of the cached latents, and quality over the horizon of every cell beside dense."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 9), layout="constrained")
    axes = fig.subplots(2, 2)
    _plot_spectra(result, axes[0, 0])
    _plot_prediction(result, axes[0, 1])
    _plot_utilisation(result, axes[1, 0])
    _plot_horizons(result, axes[1, 1])
    fig.suptitle(f"study of {result['model']} ({result['device']})")
    fig.savefig(path, format="png", dpi=100)


def _plot_spectra(result: dict[str, Any], ax: Any) -> None:
    dense = result["dense"]
    layers = np.arange(len(dense["effective_rank"]))
    ax.bar(layers, dense["rank_budget"], color="lightgrey", label="rank budget (head width)")
    ax.bar(layers, dense["effective_rank"], color="C7", label=f"{dense['energy']:.0%}-energy effective rank")
    for i, dc in enumerate(sorted({c["dc"] for c in result["cells"]}, key=lambda d: sum(_widths(d)))):
        widths = _widths(dc) if "," in dc else [int(dc)] * len(layers)
        ax.step(np.arange(len(layers) + 1) - 0.5, [*widths, widths[-1]], where="post", color=f"C{i}", linestyle="--", label=f"dc {dc}")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("rank of the joint [K; V] map")
    ax.set_title("1. pretrained attention is not low-rank")
    ax.legend(fontsize=7)


def _plot_prediction(result: dict[str, Any], ax: Any) -> None:
    dense = result["dense"]["horizons"]
    for cell in result["cells"]:
        error = float(np.mean(cell["spectral_error_at_dc"]))
        gaps = [d["psnr_db"] - c["psnr_db"] for d, c in zip(dense, cell["after"]["horizons"])]
        colour = INIT_COLOURS.get(cell["init"], "k")
        ax.scatter([error], [gaps[0]], color=colour, marker="o")
        ax.scatter([error], [max(gaps[1:], default=gaps[0])], color=colour, marker="x")
        ax.annotate(f"dc {cell['dc']}", (error, gaps[0]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xlabel("spectral error at dc (mean over layers): what truncation predicts")
    ax.set_ylabel("dB below dense after fine-tuning")
    ax.set_title("2. quality kept where truncation predicts large error\n(o: first bucket, x: worst later bucket)")
    for init, colour in INIT_COLOURS.items():
        ax.scatter([], [], color=colour, label=init)
    ax.legend(fontsize=7)


def _plot_utilisation(result: dict[str, Any], ax: Any) -> None:
    cells = result["cells"]
    x = np.arange(len(cells))
    before = [np.mean(c["latent_utilisation"]["before"]) for c in cells]
    after = [np.mean(c["latent_utilisation"]["after"]) for c in cells]
    ax.bar(x - 0.2, before, width=0.4, color="C0", alpha=0.5, label="before fine-tuning")
    ax.bar(x + 0.2, after, width=0.4, color="C0", label="after")
    ax.set_xticks(x, [_label(c) for c in cells], rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("effective rank / dc of the cached latents")
    ax.set_title("3. the bottleneck, not the pretrained spectrum, sets the rank")
    ax.legend(fontsize=7)


def _plot_horizons(result: dict[str, Any], ax: Any) -> None:
    dense = result["dense"]["horizons"]
    names = [f"[{h['frames'][0]}, {h['frames'][1]})" for h in dense]
    x = np.arange(len(dense))
    ax.plot(x, [h["psnr_db"] for h in dense], color="k", linewidth=2.5, marker="o", label="dense")
    ax.plot(x, [h["baseline_psnr_db"] for h in dense], color="grey", linestyle=":", label="copy last frame")
    largest = max(sum(_widths(c["dc"])) for c in result["cells"])
    headline = [result["headline"]] if result.get("headline") else []
    for cell, is_headline in [*((c, False) for c in result["cells"]), *((c, True) for c in headline)]:
        ax.plot(x, [h["psnr_db"] for h in cell["after"]["horizons"]], color=INIT_COLOURS.get(cell["init"], "k"), marker=".",
                linewidth=2.5 if is_headline else 1, linestyle="-" if is_headline else "--",
                alpha=1.0 if is_headline else 0.4 + 0.6 * min(1.0, sum(_widths(cell["dc"])) / largest),
                label=("headline " if is_headline else "") + _label(cell))
    ax.set_xticks(x, names)
    ax.set_xlabel("frames (horizon bucket)")
    ax.set_ylabel("PSNR to the truth after fine-tuning (dB)")
    ax.set_title("4. quality over the horizon; small dc loses detail")
    ax.legend(fontsize=6, ncol=2)


def shown_cells(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows the strip and the video show beside dense: the smallest dc (its best init) and the headline
    (or, without one, the largest dc's best)."""
    cells = result["cells"]
    # The best of a group finds the balls most often (PSNR alone favours blank rollouts), then scores highest.
    best = lambda group: max(group, key=lambda c: (np.mean(c["after"]["count_kept"] or [0.0]), c["after"]["horizons"][0]["psnr_db"]))  # noqa: E731
    smallest = min(sum(_widths(c["dc"])) for c in cells)
    largest = max(sum(_widths(c["dc"])) for c in cells)
    other = result.get("headline") or best([c for c in cells if sum(_widths(c["dc"])) == largest])
    first = best([c for c in cells if sum(_widths(c["dc"])) == smallest])
    return [first] if other["folder"] == first["folder"] else [first, other]


def strip_videos(output: Path, result: dict[str, Any]) -> dict[str, torch.Tensor]:
    """truth, dense and the shown cells after fine-tuning: the first clips of their evals, every frame."""
    dense = load_file(str(output / "dense" / "strip.safetensors"))
    videos = {"truth": dense["truth"].float(), "dense": dense["model"].float()}
    for cell in shown_cells(result):
        videos[f"MLA {_label(cell)}, {cell['finetune_steps']} steps"] = load_file(str(output / cell["folder"] / "after" / "strip.safetensors"))["model"].float()
    return videos


def write_study_strip(output: Path, result: dict[str, Any], path: Path) -> None:
    import json

    prefix = json.loads((output / "dense" / "eval.json").read_text())["prefix_frames"]
    write_strip(strip_videos(output, result), strip_columns(prefix, result["dense"]["horizons"]), path)


def write_study_video(output: Path, result: dict[str, Any], path: Path, fps: float = 12, scale: int = 4) -> None:
    """The strip as an mp4: for each clip, truth | dense | the shown cells side by side, enlarged."""
    from mlaconvert.inference.video import Mp4Writer

    videos = strip_videos(output, result)
    gap = torch.ones(3, next(iter(videos.values())).shape[2], next(iter(videos.values())).shape[3] * scale, 2)
    with Mp4Writer(path, fps=fps, force=True) as mp4:
        for clip in range(next(iter(videos.values())).shape[0]):
            tiles = [v[clip, :3].repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3) for v in videos.values()]
            mp4.write(torch.cat([t for tile in tiles for t in (tile, gap)][:-1], dim=3))


def _buckets(horizons: list[dict[str, Any]]) -> list[str]:
    return [f"[{h['frames'][0]}, {h['frames'][1]})" for h in horizons]


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return [_row(*head), _row(*("---:" for _ in head)), *(_row(*r) for r in rows), ""]


def _psnr(horizons: list[dict[str, Any]]) -> list[str]:
    return [f"{h['psnr_db']:.2f}" for h in horizons]


def _kept(kept: list[float] | None) -> str:
    return "–" if not kept else " / ".join(f"{k:.2f}" for k in kept)


def study_markdown(result: dict[str, Any]) -> str:
    """The four claims and the headline as markdown tables, every figure from study.json."""
    dense, cells = result["dense"], result["cells"]
    buckets = _buckets(dense["horizons"])
    lines = [f"Study of `{result['model']}` on {result['device']}: PSNR to the true continuation (dB) after a "
             f"{dense['prefix_frames']}-frame prefix; balls kept: share of frames in which every ball "
             "of the caption is found, per bucket.", ""]
    lines += ["**1. Pretrained attention is not low-rank.** Per layer, the "
              f"{dense['energy']:.0%}-energy effective rank of the joint [K; V] map beside its rank budget, and the "
              "relative error that truncating it to dc predicts (Eckart–Young).", ""]
    widths = sorted({c["dc"] for c in cells if c["init"] != "asvd"}, key=lambda d: sum(_widths(d)))
    by_dc = {c["dc"]: c for c in cells if c["init"] != "asvd"}
    lines += _table(["layer", "effective rank", "budget", *(f"error at dc {d}" for d in widths)],
                    [[i, rank, budget, *(f"{by_dc[d]['spectral_error_at_dc'][i]:.2f}" for d in widths)]
                     for i, (rank, budget) in enumerate(zip(dense["effective_rank"], dense["rank_budget"]))])
    lines += ["**2. Quality kept where truncation predicts large error.** Per cell: cache, the mean predicted and "
              "measured (attention output, on clips) errors, PSNR before fine-tuning in the first bucket, then after "
              "it in every bucket, agreement with the dense teacher (rollout PSNR) and balls kept.", ""]
    lines += _table(["cell", "cache", "predicted", "measured", f"before {buckets[0]}", *buckets, "teacher", "balls kept", "fine-tune"],
                    [["dense", "100%", "–", "–", _psnr(dense["horizons"])[0], *_psnr(dense["horizons"]), "–", _kept(dense["count_kept"]), "–"],
                     *([_label(c), f"{c['cache_fraction']:.1%}", f"{np.mean(c['spectral_error_at_dc']):.2f}", _measured(c),
                        _psnr(c["before"]["horizons"])[0], *_psnr(c["after"]["horizons"]),
                        f"{c['agreement']['after']['rollout_psnr_db_mean']:.1f}", _kept(c["after"]["count_kept"]),
                        f"{c['finetune_steps']} steps, {c['finetune_seconds']:.0f} s"] for c in cells)])
    lines += ["**3. The bottleneck, not the pretrained spectrum, sets the rank.** Effective rank / dc of the cached "
              "latents c (mean over layers), before and after fine-tuning.", ""]
    lines += _table(["cell", "before", "after"],
                    [[_label(c), f"{np.mean(c['latent_utilisation']['before']):.2f}", f"{np.mean(c['latent_utilisation']['after']):.2f}"]
                     for c in cells])
    smallest = min(sum(_widths(c["dc"])) for c in cells)
    lines += ["**4. Too small a dc loses detail.** The smallest dc beside dense, after fine-tuning (see strip.png).", ""]
    lines += _table(["model", *buckets, "balls kept"],
                    [["dense", *_psnr(dense["horizons"]), _kept(dense["count_kept"])],
                     *([_label(c), *_psnr(c["after"]["horizons"]), _kept(c["after"]["count_kept"])]
                       for c in cells if sum(_widths(c["dc"])) == smallest)])
    return "\n".join([*lines, *_headline_lines(result)])


def _measured(cell: dict[str, Any]) -> str:
    errors = [e for e in cell["attn_error"] if e is not None]
    return f"{np.mean(errors):.2f}" if errors else "–"


def headline_verdict(cell: dict[str, Any], bold: bool = False) -> str:
    """The headline's target and whether it was reached, as the CLI and study.md both say it."""
    verdict = "reached" if cell["reached"] else "not reached"
    balls = "kept" if cell["keeps_the_balls"] else "not kept"
    return (f"within {cell['target_db']} dB of dense in every bucket, every ball found in at most {cell['kept_tolerance']:.0%} "
            f"fewer frames than dense: {f'**{verdict}**' if bold else verdict} (largest gap {max(cell['gaps_db']):.2f} dB, "
            f"balls {balls}, at {cell['cache_fraction']:.1%} of the cache)")


def run_label(cell: dict[str, Any]) -> str:
    """A headline run's name: its remedy and what it changed, or the recipe's own fine-tune."""
    if not cell.get("remedy"):
        return f"headline fine-tune, {cell['finetune_steps']} steps"
    changed = ", ".join(f"{k} {v}" for k, v in cell["overrides"].items())
    return f"{cell['remedy']} ({changed}{', ' if changed else ''}{cell['finetune_steps']} steps)"


def _reached(cell: dict[str, Any], result: dict[str, Any]) -> bool:
    study = result["settings"]["study"]
    return reaches(cell, result["dense"], study["margin_db"], study["headline_cache"])


def _headline_lines(result: dict[str, Any]) -> list[str]:
    cell, dense = result.get("headline"), result["dense"]
    if cell is None:
        return ["**Headline.** Not run (no cell within the headline's cache, or headline_steps 0).", ""]
    lines = [f"**Headline.** {_label(cell)} ({cell['cache_fraction']:.1%} of the dense cache), {run_label(cell)}, "
             f"{cell['finetune_seconds']:.0f} s: {headline_verdict(cell, bold=True)}.", ""]
    lines += _table(["model", *_buckets(dense["horizons"]), "balls kept"],
                    [["dense", *_psnr(dense["horizons"]), _kept(dense["count_kept"])],
                     [_label(cell), *_psnr(cell["after"]["horizons"]), _kept(cell["after"]["count_kept"])],
                     ["gap (dB)", *(f"{g:+.2f}" for g in cell["gaps_db"]), ""]])
    grid = [c for c in result["cells"] if (c["init"], c["dc"]) == (cell["init"], cell["dc"])]
    runs = [*(("grid's fine-tune, " + f"{c['finetune_steps']} steps", c) for c in grid),
            *((run_label(r), r) for r in result.get("headline_runs", []))]
    if len(runs) > 1:
        lines += [f"**What limits it.** Every fine-tune of {_label(cell)} the study ran: the gap to dense per bucket (dB).", ""]
        lines += _table(["fine-tune", "cache", "seconds", *_buckets(dense["horizons"]), "balls kept", "reached"],
                        [[name, f"{r['cache_fraction']:.1%}", f"{r['finetune_seconds']:.0f}", *(f"{g:+.2f}" for g in gaps_db(r, dense)),
                          _kept(r["after"]["count_kept"]), "yes" if _reached(r, result) else "no"] for name, r in runs])
    return lines
