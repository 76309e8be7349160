"""`study`: the paper's claims measured on a model whose true future is known (DESIGN §9).

For each (init, dc) of a grid, a cell: convert the dense model, evaluate the export against the truth, fine-tune
it with the budget every cell gets, evaluate again. The dense model is evaluated once, as the reference row.
The headline cell re-runs the most promising cell whose cache is at most `headline_cache` of dense with a longer
fine-tune, and says whether it came within `margin_db` of dense in every horizon bucket.

    OUT/study.json                 schema mlaconvert.study/1: settings, the dense row, the cells, the headline
    OUT/study.md                   the four claims and the headline as tables
    OUT/study.png, OUT/strip.png   the claims, and truth | dense | MLA cells after their fine-tune
    OUT/dense/                     the dense eval (eval.json, eval.png, strip.png, strip.safetensors)
    OUT/cells/INIT-dcDC/           mla/ (the export), before/, finetuned/ (run and export), after/, cell.json

A cell is done when its cell.json exists; every stage inside it is kept when finished, and an interrupted
fine-tune resumes from its checkpoint, so running the same study again carries on where it stopped. With
several GPUs visible, or `workers` above one, the cells are shared among that many processes per device.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mlaconvert.conversion.convert import INITS, ConvertSettings
from mlaconvert.errors import MlaconvertError
from mlaconvert.evaluation.evaluate import EvalSettings, eval_source, write_eval
from mlaconvert.fields import check_types, setting
from mlaconvert.modeling.rope import rope_quota
from mlaconvert.outputs import atomic_file, check_writable, read_json_lines, write_json
from mlaconvert.training.finetune import FinetuneSettings

SCHEMA = "mlaconvert.study/1"
STRIP_TENSORS = "strip.safetensors"
CONVERT_OVERRIDES = ("rope_dim",)  # the remedies' settings that change the conversion, not the fine-tune
KEPT_TOLERANCE = 0.1  # a headline cell finds every ball in at most this share of frames fewer than dense


@dataclass(frozen=True)
class StudySettings:
    """The [study] table of a recipe; the grid is every (init, dc) pair."""

    dc: tuple[str, ...] = setting(("8", "16", "32", "64"), "Latent widths of the grid, each as convert's --dc (repeat the option).")
    init: tuple[str, ...] = setting(("svd", "random"), "Initialisations of the grid: svd, asvd, random (repeat the option).")
    rope_dim: int | None = setting(None, "Width of the shared rope key (default: a quarter of the head width).")
    max_steps: int = setting(100, "Fine-tune steps of every cell of the grid.")
    headline_steps: int = setting(500, "Fine-tune steps of the headline cell (0: no headline).")
    headline_cache: float = setting(0.10, "Largest share of the dense cache the headline cell may keep.")
    workers: int = setting(1, "Cells run at once on each device (a small model leaves a GPU mostly idle).")
    margin_db: float = 0.5  # the headline's target: within this of dense in every horizon bucket
    # Other fine-tunes of the headline's (init, dc), each a name and [finetune] settings (max_steps included)
    # that replace the recipe's, or a rope_dim that converts it with another rope key: the remedies the study
    # tries when the headline falls short.
    remedies: dict[str, dict[str, Any]] = field(default_factory=dict)

    def check(self) -> None:
        from mlaconvert.recipes import parse_dc

        unknown = sorted(set(self.init) - set(INITS))
        if unknown:
            raise MlaconvertError(f"--init {', '.join(unknown)}: choose from {', '.join(INITS)}")
        if not self.dc or not self.init:
            raise MlaconvertError("a study needs at least one --dc and one --init")
        for dc in self.dc:
            if parse_dc(dc) == "auto":
                raise MlaconvertError("--dc auto has no place in a grid: give the widths")
        known = {f.name for f in dataclasses.fields(FinetuneSettings)} - {"sampler"}
        for name, overrides in self.remedies.items():
            unknown = sorted(set(overrides) - known - set(CONVERT_OVERRIDES))
            if unknown:
                raise MlaconvertError(f"remedy '{name}': {', '.join(unknown)} is not a [finetune] setting or rope_dim")
            tuning = {k: v for k, v in overrides.items() if k not in CONVERT_OVERRIDES}
            check_types(FinetuneSettings, tuning, f"remedy '{name}'")  # now, not when its cell runs hours later
            check_types(ConvertSettings, {k: v for k, v in overrides.items() if k in CONVERT_OVERRIDES}, f"remedy '{name}'")
        settings = [tuple(sorted(o.items())) for o in self.remedies.values()]
        if len(set(settings)) < len(settings):
            raise MlaconvertError("two remedies have the same settings: they would be one cell")
        if self.max_steps < 1 or self.workers < 1 or self.headline_steps < 0 or not 0 < self.headline_cache <= 1:
            raise MlaconvertError("--max-steps and --workers must be positive, --headline-steps at least 0 and --headline-cache in (0, 1]")


@dataclass(frozen=True)
class Cell:
    init: str
    dc: str  # as convert's --dc takes it
    steps: int
    headline: bool = False
    remedy: str = ""  # the recipe's name for the fine-tune settings below
    overrides: tuple[tuple[str, Any], ...] = ()  # [finetune] settings that replace the recipe's

    @property
    def name(self) -> str:
        """The cell's folder: named by what it runs, so a changed remedy is a new cell, never a stale one."""
        tried = "".join(f"-{k}{v}" for k, v in (*self.overrides, *((("max_steps", self.steps),) if self.remedy else ())))
        return f"{'headline-' if self.headline else ''}{self.init}-dc{self.dc.replace(',', '_')}{tried}"

    def finetune(self, settings: FinetuneSettings) -> FinetuneSettings:
        tuning = {k: v for k, v in self.overrides if k not in CONVERT_OVERRIDES}
        return dataclasses.replace(settings, max_steps=self.steps, **tuning)

    def rope_dim(self, default: int) -> int:
        return dict(self.overrides).get("rope_dim", default)


@dataclass(frozen=True)
class Plan:
    """Everything a cell needs, picklable for the processes of other GPUs."""

    model: str
    output: Path
    study: StudySettings
    finetune: FinetuneSettings
    evaluation: EvalSettings
    rope_dim: int


def grid(settings: StudySettings) -> list[Cell]:
    return [Cell(init, dc, settings.max_steps) for init in settings.init for dc in settings.dc]


def study(
    model: str,
    output: str | Path,
    settings: StudySettings = StudySettings(),
    *,
    finetune: FinetuneSettings | None = None,
    evaluation: EvalSettings = EvalSettings(),
    device: str | None = None,
    force: bool = False,
    on_stage: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Run (or carry on) the study of `model` in `output` and write OUT/study.json and its pictures; returns
    the study. `on_stage(cell, stage)` hears each stage as it starts."""
    from mlaconvert.checkpoints.hub import load_source

    settings.check()
    evaluation.check()
    config = load_source(model).config
    if config.is_mla:
        raise MlaconvertError(f"'{model}' is already an MLA model: a study starts from the dense one")
    plan = Plan(model, Path(output), settings, finetune or FinetuneSettings(), evaluation,
                settings.rope_dim if settings.rope_dim is not None else config.head_dim // 4)
    for name, overrides in settings.remedies.items():
        if "rope_dim" in overrides:  # now, not when the remedy's cell converts hours later
            try:
                rope_quota(config.head_dim, overrides["rope_dim"])
            except MlaconvertError as error:
                raise MlaconvertError(f"remedy '{name}': {error}") from None
    _claim(plan, force)
    notify = on_stage or (lambda _cell, _stage: None)
    dense = _dense(plan, device, notify)
    _run_cells(plan, grid(settings), device, notify)
    result = assemble(plan, dense)
    best = headline_candidate(result) if settings.headline_steps else None
    if best is not None:
        _run_cells(plan, headline_cells(settings, best["init"], best["dc"]), device, notify)
        result = assemble(plan, dense)
    publish(plan, result)
    return result


def headline_cells(settings: StudySettings, init: str, dc: str) -> list[Cell]:
    """The headline cell with the recipe's fine-tune, then one per remedy."""
    cells = [Cell(init, dc, settings.headline_steps, headline=True)]
    for name, overrides in settings.remedies.items():
        tried = {k: v for k, v in overrides.items() if k != "max_steps"}
        cells.append(Cell(init, dc, overrides.get("max_steps", settings.headline_steps), headline=True, remedy=name,
                          overrides=tuple(sorted(tried.items()))))
    return cells


def _fingerprint(plan: Plan) -> dict[str, Any]:
    """What decides the numbers: a study folder carries on only under the same. Remedies are left out: each
    cell's folder is named by what it runs."""
    grid_settings = {k: v for k, v in dataclasses.asdict(plan.study).items() if k not in ("workers", "remedies")}
    return json.loads(json.dumps({"model": plan.model, "study": grid_settings, "rope_dim": plan.rope_dim,
                                  "finetune": {k: v for k, v in dataclasses.asdict(plan.finetune).items() if k != "max_steps"},
                                  "eval": dataclasses.asdict(plan.evaluation)}, default=str))


def _claim(plan: Plan, force: bool) -> None:
    """A fresh folder, or the same study's folder to carry on in; another study's only with force."""
    import shutil

    marker = plan.output / "settings.json"
    if plan.output.exists() and marker.is_file():
        if json.loads(marker.read_text()) == _fingerprint(plan) and not force:
            return
        if not force:
            raise MlaconvertError(f"'{plan.output}' holds a study with other settings: pass --force to start over, or another -o")
    check_writable(plan.output, force)
    if plan.output.exists():
        shutil.rmtree(plan.output)
    plan.output.mkdir(parents=True)
    write_json(marker, _fingerprint(plan))


def _evaluate(source: str, folder: Path, plan: Plan, device: str | None, notify: Callable[[], None]) -> dict[str, Any]:
    """eval of `source` into `folder` (kept when done), with the strip clips' frames beside it for the study's own strip."""
    if not (folder / "eval.json").is_file():
        notify()
        result = eval_source(source, settings=plan.evaluation, device=device)
        write_eval(result, folder, force=True)
        save_file({k: v.to(torch.float16).contiguous() for k, v in result.strip.items()}, str(folder / STRIP_TENSORS))
    return json.loads((folder / "eval.json").read_text())


def _dense(plan: Plan, device: str | None, notify: Callable[[str, str], None]) -> dict[str, Any]:
    """The reference row: the dense model against the truth, and its spectra (the first claim)."""
    from mlaconvert.checkpoints.hub import load_source
    from mlaconvert.conversion.rank import build_report

    report = _evaluate(plan.model, plan.output / "dense", plan, device, lambda: notify("dense", "eval"))
    checkpoint = load_source(plan.model)
    spectra = build_report(checkpoint.config, checkpoint.state_dict, source_info=checkpoint.info)
    return {
        "horizons": report["horizons"],
        "count_kept": _count_kept(report),
        "prefix_frames": report["prefix_frames"],
        "eval": "dense/eval.json",
        "device": report["device"],
        "effective_rank": [layer["kv"]["effective_rank"] for layer in spectra["layers"]],
        "rank_budget": [layer["kv"]["rank_budget"] for layer in spectra["layers"]],
        "energy": spectra["energy"],
        "values_per_token": checkpoint.config.kv_values_per_token() * checkpoint.config.num_layers,
    }


def _count_kept(report: dict[str, Any]) -> list[float] | None:
    """Per horizon bucket, the share of frames in which every ball of the caption is found (world clips only)."""
    health = report.get("health")
    return None if not health else [h["count_kept"] for h in health["model"]["horizons"]]


def _run_cells(plan: Plan, cells: list[Cell], device: str | None, notify: Callable[[str, str], None]) -> None:
    """The cells not done yet: here, or shared among `workers` processes per device (every visible GPU)."""
    todo = [c for c in cells if not (plan.output / "cells" / c.name / "cell.json").is_file()]
    slots = _slots(device, plan.study.workers)
    if len(slots) < 2 or len(todo) < 2:
        for cell in todo:
            run_cell(plan, cell, device, notify)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    n = min(len(slots), len(todo))
    workers = [context.Process(target=_worker, args=(plan, todo[i::n], slots[i], n)) for i in range(n)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    failed = [c.name for c in todo if not (plan.output / "cells" / c.name / "cell.json").is_file()]
    if failed:
        raise MlaconvertError(f"cells {', '.join(failed)} did not finish (their processes failed, see above); run the study again to carry on")


def _slots(device: str | None, workers: int) -> list[str]:
    """One device name per process: every visible GPU `workers` times, GPUs taking turns, or the one device asked for."""
    if device in (None, "cuda") and torch.cuda.is_available():
        return [f"cuda:{i}" for _ in range(workers) for i in range(torch.cuda.device_count())]
    return [device or "cpu"] * workers


def _worker(plan: Plan, cells: list[Cell], device: str, processes: int) -> None:
    import os

    # The processes share the cores: each taking them all for its CPU work (calibration, ball detection)
    # oversubscribes them many times over, GPU cells included.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
    for cell in cells:
        run_cell(plan, cell, device, lambda name, stage: print(f"[{device}] {name}: {stage}", flush=True))


def run_cell(plan: Plan, cell: Cell, device: str | None, notify: Callable[[str, str], None]) -> dict[str, Any]:
    """Convert, evaluate, fine-tune, evaluate; each stage kept when done, the cell's record written last."""
    from mlaconvert.conversion.convert import convert_source
    from mlaconvert.training.finetune import finetune

    folder = plan.output / "cells" / cell.name
    done = folder / "cell.json"
    if done.is_file():
        return json.loads(done.read_text())
    export, tuned = folder / "mla", folder / "finetuned"
    if cell.headline and cell.rope_dim(plan.rope_dim) == plan.rope_dim:
        _reuse_grid_conversion(plan, cell, folder)
    if not (export / "config.json").is_file():
        notify(cell.name, "convert")
        convert_source(plan.model, export, _convert_settings(plan, cell), device=device, force=True)
    before = _evaluate(str(export), folder / "before", plan, device, lambda: notify(cell.name, "eval before fine-tuning"))
    if not (tuned / "config.json").is_file():
        notify(cell.name, f"finetune {cell.steps} steps")
        resume = (tuned / "checkpoint" / "state.pt").is_file()
        finetune(str(export), tuned, cell.finetune(plan.finetune), teacher=plan.model,
                 device=device, resume=resume, force=not resume)
    after = _evaluate(str(tuned), folder / "after", plan, device, lambda: notify(cell.name, "eval after fine-tuning"))
    record = cell_record(cell, folder, before, after)
    write_json(done, record)
    return record


def _reuse_grid_conversion(plan: Plan, cell: Cell, folder: Path) -> None:
    """The headline converts as its grid cell did: that cell's export and first eval serve it too."""
    import shutil

    grid_folder = plan.output / "cells" / Cell(cell.init, cell.dc, cell.steps).name
    for stage in ("mla", "before"):
        if (grid_folder / stage).is_dir() and not (folder / stage).exists():
            partial = folder / f".{stage}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(grid_folder / stage, partial)
            partial.rename(folder / stage)


def _convert_settings(plan: Plan, cell: Cell) -> ConvertSettings:
    from mlaconvert.recipes import parse_dc

    return ConvertSettings(dc=parse_dc(cell.dc), rope_dim=cell.rope_dim(plan.rope_dim), init=cell.init)


def cell_record(cell: Cell, folder: Path, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One row of study.json: what the cell keeps (cache), what truncation predicted, what was measured."""
    converted = json.loads((folder / "mla" / "rank_report.json").read_text())
    tuned = json.loads((folder / "finetuned" / "rank_report.json").read_text())
    log = read_json_lines(folder / "finetuned" / "train_log.jsonl")
    cache, ft = converted["cache"], tuned["finetune"]
    layers = converted["layers"]
    return {
        "init": cell.init,
        "dc": cell.dc,
        **({"remedy": cell.remedy, "overrides": dict(cell.overrides)} if cell.remedy else {}),
        "rope_dim": converted["cache"]["rope_dim"],
        "values_per_token": cache["mla_values_per_token_all_layers"],
        "cache_fraction": cache["mla_values_per_token_all_layers"] / cache["dense_values_per_token_all_layers"],
        "spectral_error_at_dc": [layer["mla"]["spectral_prediction"]["spectral_error_at_dc"] for layer in layers],
        "attn_error": [layer["mla"].get("measured", {}).get("attn_error") for layer in layers],
        "latent_utilisation": {
            "before": [u["latents"]["utilisation"] for u in ft["before"]["utilisation"]],
            "after": [u["latents"]["utilisation"] for u in ft["after"]["utilisation"]],
        },
        "agreement": {stage: {k: ft[stage]["agreement"][k] for k in ("flow_relative_error_mean", "rollout_psnr_db_mean")}
                      for stage in ("before", "after")},
        "finetune_steps": ft["steps"],
        "finetune_seconds": sum(r["seconds"] for r in log if "seconds" in r),
        "finetune_device": ft["device"],
        "before": {"horizons": before["horizons"], "count_kept": _count_kept(before)},
        "after": {"horizons": after["horizons"], "count_kept": _count_kept(after)},
        "folder": f"cells/{cell.name}",
    }


def assemble(plan: Plan, dense: dict[str, Any]) -> dict[str, Any]:
    """study.json from the dense row and every finished cell, in grid order, the headline apart."""
    cells = [json.loads((plan.output / "cells" / c.name / "cell.json").read_text()) for c in grid(plan.study)]
    result = {"schema": SCHEMA, "model": plan.model, "device": dense["device"], "settings": _fingerprint(plan),
              "dense": dense, "cells": cells, "headline": None, "headline_runs": []}
    best = headline_candidate(result) if plan.study.headline_steps else None
    if best is not None:
        done = [plan.output / "cells" / c.name / "cell.json" for c in headline_cells(plan.study, best["init"], best["dc"])]
        runs = [_headline(json.loads(path.read_text()), dense, plan.study) for path in done if path.is_file()]
        result["headline_runs"] = runs
        cap = plan.study.headline_cache
        result["headline"] = min(runs, key=lambda c: (not c["reached"], c["cache_fraction"] > cap, not c["keeps_the_balls"], max(c["gaps_db"])),
                                 default=None)
    return {**result, "settings": {**result["settings"], "remedies": plan.study.remedies}}


def gaps_db(cell: dict[str, Any], dense: dict[str, Any]) -> list[float]:
    """Per horizon bucket, how far below dense the cell's fine-tuned model lies (negative: above it)."""
    return [d["psnr_db"] - c["psnr_db"] for d, c in zip(dense["horizons"], cell["after"]["horizons"], strict=True)]


def keeps_the_balls(cell: dict[str, Any], dense: dict[str, Any]) -> bool:
    """Whether the fine-tuned cell finds the caption's balls about as often as dense in every bucket. PSNR alone
    rewards a model that paints the background and drops the balls, so a headline must keep them too."""
    kept, reference = cell["after"]["count_kept"], dense["count_kept"]
    return kept is None or reference is None or all(k >= r - KEPT_TOLERANCE for k, r in zip(kept, reference, strict=True))


def headline_candidate(result: dict[str, Any]) -> dict[str, Any] | None:
    """The cell within the headline's cache whose worst bucket lies closest to dense, among those that keep the
    balls when any does."""
    cap, dense = result["settings"]["study"]["headline_cache"], result["dense"]
    fits = [c for c in result["cells"] if c["cache_fraction"] <= cap]
    return min(fits, key=lambda c: (not keeps_the_balls(c, dense), max(gaps_db(c, dense))), default=None)


def reaches(cell: dict[str, Any], dense: dict[str, Any], margin_db: float, cache_cap: float) -> bool:
    """The headline's test, for any cell: within the margin of dense in every bucket, keeping the balls, at a
    cache within the cap."""
    return max(gaps_db(cell, dense)) <= margin_db and keeps_the_balls(cell, dense) and cell["cache_fraction"] <= cache_cap


def _headline(cell: dict[str, Any], dense: dict[str, Any], settings: StudySettings) -> dict[str, Any]:
    return {**cell, "gaps_db": gaps_db(cell, dense), "target_db": settings.margin_db, "keeps_the_balls": keeps_the_balls(cell, dense),
            "kept_tolerance": KEPT_TOLERANCE, "reached": reaches(cell, dense, settings.margin_db, settings.headline_cache)}


def publish(plan: Plan, result: dict[str, Any]) -> None:
    """study.json, study.md, study.png, strip.png and (with imageio-ffmpeg) strip.mp4, each written atomically."""
    import importlib.util

    from mlaconvert.evaluation.study_report import plot_study, study_markdown, write_study_strip, write_study_video

    result["video"] = "strip.mp4" if importlib.util.find_spec("imageio_ffmpeg") else None
    write_json(plan.output / "study.json", result)
    with atomic_file(plan.output / "study.md") as tmp:
        tmp.write_text(study_markdown(result) + "\n")
    with atomic_file(plan.output / "study.png") as tmp:
        plot_study(result, tmp)
    with atomic_file(plan.output / "strip.png") as tmp:
        write_study_strip(plan.output, result, tmp)
    if result["video"]:
        write_study_video(plan.output, result, plan.output / result["video"])
