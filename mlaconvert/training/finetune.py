"""`finetune`: brief data-free distillation of an MLA export from its dense teacher (DESIGN §7) — a recipe,
read top to bottom: settings, the trainer, then the run in three phases (start or resume, train, finish).

The pieces it is made of:
    objective.py     noising, timesteps per chunk, the distillation loss, layer outputs, which tensors learn, FLOPs
    clips.py         the clips: a --data folder, the built-in world, or the teacher's own rollouts (cached)
    training_run.py  the run folder: seeded draws, log, checkpoints that resume exactly, publishing the export
    processes.py     torchrun's processes: each takes its rows of the global batch; only rank 0 writes
    sharding.py      a whole copy of the models in each process (DDP) or a share of them (FSDP2, --shard)
    finetune_report.py  teacher agreement and rank utilisation before and after, and the report's finetune section
    finetune_settings.py  the settings and their checks
    horizon.py       the long-horizon check at the checkpoints, and the best checkpoint the export keeps
    memory_plan.py   what each process will hold (weights, gradients, optimizer, activations), before the first step

The output folder is the run and the export at once:
    OUT/train_log.jsonl   one row per optimizer step; `eval_loss` at step 0, every `eval_every` steps and the end;
                          `horizon` (PSNR per bucket, gap below the teacher) at step 0 and every checkpoint
    OUT/loss.png          training loss, held-out loss and learning rate
    OUT/checkpoint/       the latest checkpoint (trainable weights, optimizer, scheduler, RNG, data position)
    OUT/data/<key>/       generated clips (unless a cache folder is given)
    OUT/agreement.json    teacher agreement before and after training
    OUT/model.safetensors, config.json, rank_report.json/.png, README.md   — the export, a valid SOURCE
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlaconvert.checkpoints.formats import Checkpoint
from mlaconvert.devices import default_dtype
from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.config import WanConfig
from mlaconvert.modeling.model import WanModel, load_model
from mlaconvert.training.clips import Clips, training_clips
from mlaconvert.training.finetune_settings import FinetuneSettings, check_sampler_fit, check_settings
from mlaconvert.training.finetune_report import finetune_section, measure_student
from mlaconvert.training.horizon import HorizonCheck, best_of, horizon_check, restore
from mlaconvert.training.memory_plan import MemoryPlan, memory_plan
from mlaconvert.training.objective import (AttentionOutputs, autocast_for, chunk_timesteps, context_draw, distill_loss, held_out_loss,
                                           noised, own_continuation, set_trainable, trainable_names)
from mlaconvert.outputs import append_json_line, write_json
from mlaconvert.training.processes import Processes, processes
from mlaconvert.training.sharding import (full_parameters, gradient_sync, load_optimizer_state, load_parameters, optimizer_state,
                                          spread, whole)
from mlaconvert.training.training_run import (LOG_NAME, LOSS_PLOT, check_same_run, derived_seed, load_checkpoint, plot_loss,
                                     check_output, clear_output, publish, read_run, save_checkpoint, training_rows, trim_log, warmup_cosine)

AGREEMENT_NAME = "agreement.json"


@dataclass
class FinetuneResult:
    output: Path
    step: int  # optimizer steps done
    exported: bool  # False when stopped early (stop_after)
    final_loss: float | None
    report: dict[str, Any] | None = None  # the export's rank report, with the "finetune" section
    log: list[dict[str, Any]] = field(default_factory=list)


def _dense_mismatch(student: WanConfig, teacher: WanConfig) -> list[str]:
    return [
        f"{f.name} {getattr(teacher, f.name)} vs {getattr(student, f.name)}"
        for f in dataclasses.fields(WanConfig)
        if f.name not in ("mla", "text_len") and getattr(teacher, f.name) != getattr(student, f.name)
    ]


def load_pair(model: str, teacher: str | None = None) -> tuple[Checkpoint, Checkpoint]:
    """The MLA student and its dense teacher (by default the source the export records), checked to match."""
    from mlaconvert.checkpoints.hub import load_source

    student = load_source(model)
    if not student.config.is_mla:
        raise MlaconvertError(f"'{model}' is a dense model; finetune needs an MLA export written by `mlaconvert convert`")
    teacher = teacher or student.config.mla.source.get("repo")
    if not teacher:
        raise MlaconvertError(f"the export '{model}' records no source model; name the dense teacher with --teacher")
    dense = load_source(teacher, head_dim=student.config.head_dim)
    if dense.config.is_mla:
        raise MlaconvertError(f"the teacher '{teacher}' is an MLA export; it must be the dense source model")
    mismatch = _dense_mismatch(student.config, dense.config)
    if mismatch:
        raise MlaconvertError(f"the teacher '{teacher}' does not match the student (teacher vs student): {', '.join(mismatch)}")
    if dense.info.get("config_inferred"):
        # A bare .pt carries no config: its shapes agree with the student's, whose other fields are the source's.
        dense.config = student.config.replace(mla=None)
    return student, dense


class Trainer:
    """Student, teacher, optimizer and schedule of one run; `step` does one optimizer step over the global batch."""

    def __init__(self, student: WanModel, teacher: WanModel, settings: FinetuneSettings, procs: Processes):
        self.settings, self.procs = settings, procs
        self.student, self.teacher = student, teacher
        self.clips: Clips  # set once made: with --shard, making them needs the sharded teacher
        self.trained = set_trainable(student, settings.train)
        teacher.requires_grad_(False)
        student.gradient_checkpointing = settings.gradient_checkpointing
        self.module = spread(student, teacher, procs, settings.shard)
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, settings.warmup, settings.max_steps))
        self.student_attn, self.teacher_attn = AttentionOutputs(student), AttentionOutputs(teacher)
        self.step_count = 0
        self.data_position = 0  # clips drawn so far from the stream of shuffled epochs
        self.autocast = autocast_for(procs.device)

    def _clip_indices(self, position: int, count: int) -> torch.Tensor:
        """Clips `position .. position+count` of the stream: each epoch a fresh seeded permutation."""
        n, orders, out = self.clips.latents.shape[0] - self.settings.held_out, {}, []
        for p in range(position, position + count):
            epoch = p // n
            if epoch not in orders:
                generator = torch.Generator().manual_seed(derived_seed(self.settings.seed, "epoch", epoch))
                orders[epoch] = torch.randperm(n, generator=generator)
            out.append(int(orders[epoch][p % n]))
        return torch.tensor(out)

    def step(self) -> dict[str, Any]:
        s, procs = self.settings, self.procs
        tic = time.perf_counter()
        generator = torch.Generator().manual_seed(derived_seed(s.seed, "step", self.step_count))
        index = self._clip_indices(self.data_position, s.batch)
        clean = self.clips.latents[index]
        frames = clean.shape[2]
        timesteps = chunk_timesteps(s, s.batch, frames, generator)
        noise = torch.randn(clean.shape, generator=generator)
        context_noise = context_draw(s, clean.shape, generator)
        text = self.clips.text[index]
        per_rank = s.batch // procs.world
        micro = per_rank // s.accumulate
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for a in range(s.accumulate):
            rows = slice(procs.rank * per_rank + a * micro, procs.rank * per_rank + (a + 1) * micro)
            last = a == s.accumulate - 1
            part = [x[rows].to(procs.device) for x in (clean, text, noise, timesteps)]
            with gradient_sync(self.module, last):
                with self.autocast:
                    part[0] = self._with_own_context(part[0], part[1], rows)
                    context = None if context_noise is None else noised(part[0], *(x[rows].to(procs.device) for x in context_noise))
                    loss, parts = distill_loss(
                        self.module, self.teacher, *part, context=context,
                        sampler=s.sampler, layer_loss_weight=s.layer_loss_weight,
                        student_attn=self.student_attn, teacher_attn=self.teacher_attn,
                    )
                # Mean over the global batch: each micro-batch weighs 1/accumulate here, DDP or FSDP averages the ranks.
                (loss / s.accumulate).backward()
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / s.accumulate
        grad_norm = whole(torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        for block in self.student.blocks:
            block.self_attn.project_key_form()
        self.scheduler.step()
        means = procs.mean(list(sums.values()))
        self.step_count += 1
        self.data_position += s.batch
        seconds = time.perf_counter() - tic  # reading the losses back waited for the device
        # Tokens the student processes: each clip runs twice, clean (context) and noisy.
        tokens = s.batch * 2 * clean[0, 0].numel() // math.prod(self.student.config.patch_size)
        row = {"step": self.step_count, **dict(zip(sums, means, strict=True)), "lr": lr, "grad_norm": float(grad_norm),
               "tokens_per_s": tokens / seconds, "seconds": seconds}
        peak = procs.peak_memory_gib()
        if peak is not None:
            row["peak_memory_gib"] = peak
        return row

    def _with_own_context(self, clean: torch.Tensor, text: torch.Tensor, rows: slice) -> torch.Tensor:
        """The micro-batch's clips, the first `own_context` share of the global batch replaced by the student's
        own continuation of their true first chunk: Self-Forcing's remedy for teacher forcing, which trains on
        contexts the student never sees when it samples, so its errors compound over a long rollout."""
        own = min(rows.stop, round(self.settings.own_context * self.settings.batch)) - rows.start
        if own <= 0:
            return clean
        sampler = dataclasses.replace(self.settings.sampler, seed=derived_seed(self.settings.seed, f"own/{rows.start}", self.step_count))
        return torch.cat([own_continuation(self.student, clean[:own], text[:own], sampler), clean[own:]])

    def held_out_loss(self) -> float:
        """The objective on the held-out clips with the run's fixed draw (see `held_out_loss`)."""
        return held_out_loss(self.student, self.teacher, self.clips, self.settings, self.procs.device, self.procs.world)

    def memory_plan(self) -> MemoryPlan:
        """What this process will hold once training runs, from the clips' size and the trained tensors."""
        s, procs, cfg = self.settings, self.procs, self.student.config
        frame_tokens = self.clips.latents[0, 0, 0].numel() // (cfg.patch_size[1] * cfg.patch_size[2])
        frames = self.clips.latents.shape[2] // cfg.patch_size[0]
        rows = s.batch // procs.world // s.accumulate
        # The rollout's cache takes the dtype of the student's first tensor, as the sampler does.
        own = (min(rows, round(s.own_context * s.batch)), s.sampler.window * frame_tokens, next(self.student.parameters()).dtype.itemsize)
        return memory_plan(cfg, self.teacher.config, self.trained, clip_tokens=2 * frames * frame_tokens, rows=rows,
                           dtype_bytes=default_dtype(procs.device).itemsize, processes=procs.world, sharded=s.shard,
                           accumulate=s.accumulate,
                           checkpointing=s.gradient_checkpointing, layer_outputs=s.layer_loss_weight > 0, rollout=own)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the trained weights, the optimizer and schedule, and the position in the data
        (whole tensors on rank 0, which writes it; the other processes only take part in gathering them)."""
        return {
            "step": self.step_count,
            "data_position": self.data_position,
            "params": full_parameters(self.student, self.trained, keep=self.procs.main),
            "optimizer": optimizer_state(self.optimizer, self.student, keep=self.procs.main),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_parameters(self.student, state["params"])
        load_optimizer_state(self.optimizer, self.student, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count, self.data_position = state["step"], state["data_position"]


def finetune(
    model: str,
    output: str | Path,
    settings: FinetuneSettings,
    *,
    teacher: str | None = None,
    data: str | Path | None = None,
    prompts: list[str] | None = None,
    encoder: str | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    resume: bool = False,
    force: bool = False,
    stop_after: int | None = None,
    show_progress: bool = True,
    on_plan: Callable[[MemoryPlan], None] | None = None,
) -> FinetuneResult:
    """Distil the MLA export `model` from its dense teacher and write the fine-tuned export into `output`.

    Under torchrun (WORLD_SIZE > 1) every process calls this; each takes its rows of the global batch and only
    rank 0 writes. `stop_after` ends the run after that many steps without exporting, as a kill would (the
    checkpoints written so far stay): for time-boxed jobs and for testing --resume. `on_plan` hears, on rank 0,
    what each process will hold in memory, before the first step.
    """
    from rich.progress import TextColumn

    from mlaconvert.progress import progress_bar

    output = Path(output)
    with processes(device) as procs:
        check_settings(settings, procs.world)
        progress = progress_bar(TextColumn("{task.fields[info]}"), disable=not (show_progress and procs.main))
        try:
            with progress:
                run = _start(model, output, settings, procs, progress, teacher=teacher, data=data, prompts=prompts,
                             encoder=encoder, cache_dir=cache_dir, resume=resume, force=force)
                if on_plan is not None and procs.main:
                    on_plan(run.trainer.memory_plan())
                if procs.device.type == "cuda":  # the steps' peak, not loading's or the clips' generation's
                    torch.cuda.reset_peak_memory_stats(procs.device)
                done = _train(run, progress, stop_after)
            if not done:
                rows = training_rows(run.rows)
                return FinetuneResult(output, run.trainer.step_count, False, rows[-1]["loss"] if rows else None, log=run.rows)
            return _finish(run)
        except torch.OutOfMemoryError:
            raise MlaconvertError(
                f"out of GPU memory on {procs.device} (batch {settings.batch}, clip {settings.frames}x{settings.height}x{settings.width}, "
                f"--train {settings.train}): try --train mla, --accumulate to split the batch, a smaller clip (--frames/--height/--width), "
                "and keep gradient checkpointing on"
            ) from None


@dataclass
class RunState:
    """One run as its phases share it. Every process computes the same rows and measures (with --shard the
    models' forwards need them all); rank 0 alone writes the run folder."""

    output: Path
    trainer: Trainer
    student: Checkpoint  # as loaded: the export keeps its dtypes and source
    teacher: Checkpoint
    teacher_sha: str
    fingerprint: dict[str, Any] = field(default_factory=dict)
    before: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    horizon: HorizonCheck | None = None
    best: dict[str, Any] | None = None  # the best long-horizon check so far: step, score, trained weights


def _start(model: str, output: Path, settings: FinetuneSettings, procs: Processes, progress: Any, *, teacher: str | None,
           data: str | Path | None, prompts: list[str] | None, encoder: str | None, cache_dir: str | Path | None,
           resume: bool, force: bool) -> RunState:
    """Start or resume: load and spread the models, make the clips (the teacher's are generated unless cached;
    rank 0 saves them and its copy is every process's), check a resumed run is this one, measure the student
    before training (or read what the checkpoint measured), open the log and load the checkpoint."""
    from mlaconvert.conversion.convert import weights_sha256

    check_output(output, force=force, resume=resume)
    student_ckpt, teacher_ckpt = load_pair(model, teacher)
    config, dev = student_ckpt.config, procs.device
    settings = settings.for_model(config)
    check_sampler_fit(settings)
    # The trained tensors get float32 master copies (load_model keeps given tensors on the CPU: train on copies);
    # the frozen ones stay in the compute dtype, which at 14B saves the 28 GB a float32 copy of them would take.
    trained = set(trainable_names(config, list(student_ckpt.state_dict), settings.train))
    student = load_model(config, {k: v.to(torch.float32, copy=True) if k in trained else v.to(default_dtype(dev))
                                  for k, v in student_ckpt.state_dict.items()}, device=dev)
    teacher_model = load_model(teacher_ckpt.config, teacher_ckpt.state_dict, device=dev, dtype=default_dtype(dev))
    teacher_sha = weights_sha256(teacher_ckpt.files) or ""
    trainer = Trainer(student, teacher_model, settings, procs)
    if not resume:
        procs.on_main(lambda: clear_output(output, products=(AGREEMENT_NAME,)))
    made = training_clips(settings, config, teacher_model, teacher_sha, Path(cache_dir or output / "data"), data=data,
                          prompts=prompts, encoder=encoder, device=dev, progress=progress, save=procs.main, agree=procs.same)
    made.latents, made.text = procs.broadcast(made.latents), procs.broadcast(made.text)
    trainer.clips = made
    fingerprint = {
        "model": weights_sha256(student_ckpt.files), "teacher": teacher_sha, "config": config.to_dict(),
        "data": {k: v for k, v in made.origin.items() if k != "folder"},
        "settings": {k: v for k, v in settings.record().items() if k not in settings.run_only()},
    }
    fingerprint = json.loads(json.dumps(fingerprint))  # tuples as lists, as the saved copy reads back
    saved = read_run(output) if resume else {"step": 0}
    if resume:
        check_same_run(output, saved["fingerprint"], fingerprint)
    autocast = autocast_for(dev)
    before = saved["before"] if resume else measure_student(student, teacher_model, made, settings, autocast)
    check = horizon_check(teacher_model, made, settings, autocast, before.get("horizon_reference"))
    if check is not None:
        before["horizon_reference"] = check.reference
    run = RunState(output, trainer, student_ckpt, teacher_ckpt, teacher_sha, fingerprint, before, horizon=check)
    if resume:
        state = load_checkpoint(output)
        trainer.load_state_dict(state)
        run.best = state.get("best")
        run.rows = trim_log(output / LOG_NAME, saved["step"], write=procs.main)
    else:
        run.rows = [{"step": 0, "eval_loss": trainer.held_out_loss()}]
        if check is not None:
            run.rows[0]["horizon"] = procs.same(check.score(student, settings))
            run.best = best_of(None, 0, run.rows[0]["horizon"], student)
        procs.on_main(lambda: append_json_line(output / LOG_NAME, run.rows[0]))
    return run


def _train(run: RunState, progress: Any, stop_after: int | None) -> bool:
    """Optimizer steps up to max_steps, each followed by its record (see `_record`); False when `stop_after`
    ends the run early."""
    trainer, s = run.trainer, run.trainer.settings
    task = progress.add_task("finetune", total=s.max_steps, completed=trainer.step_count, info="")
    while trainer.step_count < s.max_steps:
        if stop_after is not None and trainer.step_count >= stop_after:
            return False
        _record(run, trainer.step(), progress, task)
    return True


def _record(run: RunState, row: dict[str, Any], progress: Any, task: Any) -> None:
    """The step's log row (with the held-out loss every eval_every steps and at the end), and every
    checkpoint_every steps (and at the end) the long-horizon check, the checkpoint and the loss plot."""
    trainer, s, step = run.trainer, run.trainer.settings, row["step"]
    checkpoint = step % s.checkpoint_every == 0 or step == s.max_steps
    if step % s.eval_every == 0 or step == s.max_steps:
        row["eval_loss"] = trainer.held_out_loss()
    if checkpoint and run.horizon is not None:
        row["horizon"] = trainer.procs.same(run.horizon.score(trainer.student, s))
        run.best = best_of(run.best, step, row["horizon"], trainer.student)
    run.rows.append(row)
    progress.update(task, completed=step, info=f"loss {row['loss']:.4g}  {row['tokens_per_s']:,.0f} tok/s")
    state = {**trainer.state_dict(), **({"best": run.best} if run.best is not None else {})} if checkpoint else None

    def write() -> None:
        append_json_line(run.output / LOG_NAME, row)
        if state is not None:
            save_checkpoint(run.output, state, {"step": step, "fingerprint": run.fingerprint, "before": run.before})
            plot_loss(run.rows, run.output / LOSS_PLOT)

    trainer.procs.on_main(write)


def _finish(run: RunState) -> FinetuneResult:
    """Measure the trained student (the best long-horizon check's weights, if kept) and publish the export with
    a fresh rank report (rank 0)."""
    trainer = run.trainer
    if run.best is not None:
        restore(trainer.student, run.best)
    after = measure_student(trainer.student, trainer.teacher, trainer.clips, trainer.settings, trainer.autocast)
    trained = full_parameters(trainer.student, trainer.trained, keep=trainer.procs.main)
    done = trainer.procs.on_main(lambda: _export(run, after, trained))
    if done is None:  # another process: rank 0 reports
        return FinetuneResult(run.output, trainer.step_count, True, None)
    return FinetuneResult(run.output, trainer.step_count, True, done["finetune"]["final_loss"], report=done, log=run.rows)


def _export(run: RunState, after: dict[str, Any], trained: dict[str, torch.Tensor]) -> dict[str, Any]:
    """agreement.json and the export: the trained tensors in the student's own dtypes, the frozen ones as
    loaded (which the compute dtype may have rounded), and the rank report with the finetune section."""
    from mlaconvert.conversion.rank import build_report

    config, loaded = run.student.config, run.student.state_dict
    state = {k: trained[k].to(v.dtype) if k in trained else v for k, v in loaded.items()}
    report = build_report(config, state, source_info=run.student.info)
    for entry, utilisation in zip(report["layers"], after["utilisation"], strict=True):
        entry["mla"]["utilisation"] = utilisation
    report["summary"]["mean_utilisation"]["latents"] = float(np.mean([u["latents"]["utilisation"] for u in after["utilisation"]]))
    report["export"] = str(run.output)
    report["finetune"] = finetune_section(run, after)
    write_json(run.output / AGREEMENT_NAME, {"before": run.before["agreement"], "after": after["agreement"]})
    publish(run.output, config, state, report)
    return report
