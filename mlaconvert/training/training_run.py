"""The run folder of a training job that survives a kill, and the seeded draws that let it resume exactly.

    OUT/train_log.jsonl   one row per optimizer step (`trim_log` drops the rows a killed run did not checkpoint)
    OUT/loss.png          the log's picture
    OUT/checkpoint/       the latest checkpoint: state.pt (weights, optimizer, schedule, RNG, data position) and
                          run.json (the step, the run's fingerprint, its measurements before training)
    OUT/...               the export, moved in file by file when the run ends (`publish`)

Reproducibility: every random draw of step s (which clips, timesteps, noise) comes from a generator seeded by
`derived_seed(seed, purpose, s)`, never from a stream shared across steps, so a resumed run — and a run split
over several processes, each taking its rows of the same global batch — sees exactly what one uninterrupted
process sees. `finetune` uses all of this; `pretrain` shares the draws, the schedule and the log.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.config import WanConfig
from mlaconvert.outputs import atomic_dir, atomic_file, check_writable, read_json_lines, write_json, write_json_lines

LOG_NAME, LOSS_PLOT, CHECKPOINT_DIR = "train_log.jsonl", "loss.png", "checkpoint"


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor of every training recipe here: linear warmup, then cosine decay to zero at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(1, total - warmup), 1.0)))


def derived_seed(seed: int, purpose: str, index: int) -> int:
    """The seed of one draw (a step's noise, an epoch's order, a batch of generated clips), independent of
    every other draw, so no draw depends on how many came before it in this process."""
    digest = hashlib.sha256(f"{seed}/{purpose}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # manual_seed takes up to 2**63


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        # weights_only loading accepts tensors, not numpy arrays.
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output: Path, state: dict[str, Any], run: dict[str, Any]) -> None:
    """Replace the run's checkpoint atomically: `state` (tensors, with the RNG state added) and `run` (JSON)."""
    with atomic_dir(output / CHECKPOINT_DIR, force=True) as tmp:
        torch.save({**state, "rng": _rng_state()}, tmp / "state.pt")
        write_json(tmp / "run.json", run)


def load_checkpoint(output: Path) -> dict[str, Any]:
    """The state `save_checkpoint` saved, with the RNG state restored."""
    state = torch.load(output / CHECKPOINT_DIR / "state.pt", map_location="cpu", weights_only=True)
    _set_rng_state(state.pop("rng"))
    return state


def read_run(output: Path) -> dict[str, Any]:
    """The run.json of the checkpoint in `output`, or a one-line error when there is none to resume."""
    path = output / CHECKPOINT_DIR / "run.json"
    if not path.is_file() or not (output / CHECKPOINT_DIR / "state.pt").is_file():
        raise MlaconvertError(f"nothing to resume in '{output}': it has no {CHECKPOINT_DIR}/ from an earlier finetune run")
    return json.loads(path.read_text())


def check_same_run(output: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A resume continues the run whose fingerprint (model, teacher, data, settings) it has, or none."""
    diff = [k for k in sorted(set(saved) | set(current)) if k != "settings" and saved.get(k) != current.get(k)]
    s, c = saved.get("settings", {}), current.get("settings", {})
    diff += [k for k in sorted(set(s) | set(c)) if s.get(k) != c.get(k)]
    if diff:
        raise MlaconvertError(
            f"the checkpoint in '{output / CHECKPOINT_DIR}' is from another run ({', '.join(diff)} differ); "
            "resume with the same model, teacher, data and settings, or pass --force to start over"
        )


def check_output(output: Path, *, force: bool, resume: bool) -> None:
    """Refuse, before any model is loaded, what the run folder cannot do: --resume needs a checkpoint, and a
    fresh start must not meet one unless --force."""
    if resume and force:
        raise MlaconvertError("--resume continues the run in the output folder and --force starts it over: pass one")
    if resume:
        read_run(output)
        return
    if not force and (output / CHECKPOINT_DIR / "state.pt").is_file():
        raise MlaconvertError(f"'{output}' already holds a finetune run: pass --resume to continue it from its checkpoint, or --force to start over")
    check_writable(output, force)


def clear_output(output: Path, products: Iterable[str] = ()) -> None:
    """Starting over in `output` (made if new): the earlier run's log, plot, checkpoint and `products` go; its
    cached clips stay (they are keyed by what made them)."""
    output.mkdir(parents=True, exist_ok=True)
    for name in (LOG_NAME, LOSS_PLOT, *products):
        (output / name).unlink(missing_ok=True)
    shutil.rmtree(output / CHECKPOINT_DIR, ignore_errors=True)


def trim_log(path: Path, step: int, *, write: bool = True) -> list[dict[str, Any]]:
    """The log up to `step`, cut there when `write`: rows of steps after the checkpoint were lost with the killed
    run and are redone."""
    rows = read_json_lines(path) if path.is_file() else []
    rows = [r for r in rows if r["step"] <= step]
    if write:
        write_json_lines(path, rows)
    return rows


def training_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of optimizer steps (the step-0 row holds only the held-out loss before training)."""
    return [r for r in rows if "loss" in r]


def plot_loss(rows: list[dict[str, Any]], path: Path) -> None:
    """The log's picture as a PNG (see `loss_figure`)."""
    with atomic_file(path) as tmp:
        loss_figure(rows).savefig(tmp, format="png", dpi=100)


def loss_figure(rows: list[dict[str, Any]]) -> Any:
    """Training loss and the held-out loss (log scale) and the learning rate against the step."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    train, held = training_rows(rows), [r for r in rows if "eval_loss" in r]
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["loss"] for r in train], label="training loss (fresh batch each step)")
    if train and "layer_loss" in train[0]:
        ax.plot(steps, [r["flow_loss"] for r in train], label="flow loss", alpha=0.7)
    ax.plot([r["step"] for r in held], [r["eval_loss"] for r in held], "o-", color="tab:red", markersize=4,
            label="held-out loss (fixed clips, noise, timesteps)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in train], color="grey", linestyle=":", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    # One legend for both axes, below the plot, where it hides no curve.
    handles = [h for a in (ax, lr_ax) for h in a.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize="small")
    fig.suptitle("finetune: student vs teacher")
    return fig


def publish(output: Path, config: WanConfig, state: dict[str, torch.Tensor], report: dict[str, Any]) -> None:
    """Write the export into the run folder: written whole beside it, then moved in file by file.

    The run folder holds the log and checkpoint, so it cannot be swapped as a whole; each file replaces its
    predecessor atomically, and the final checkpoint was saved first, so a crash here is mended by --resume.
    """
    from mlaconvert.conversion.export import write_export

    staging = output.with_name(f".{output.name}.export-{os.getpid()}")
    write_export(staging, config, state, report, force=True)
    fresh = {p.name for p in staging.iterdir()}
    for old in output.glob("model*.safetensors*"):
        if old.name not in fresh:  # shards of an earlier, differently split export
            old.unlink()
    for path in staging.iterdir():
        os.replace(path, output / path.name)
    staging.rmdir()
