"""What a finetune run measures and reports: the student's teacher agreement and rank utilisation (of its
weights and of the latents it caches for held-out clips), before and after training, and the "finetune"
section of the export's rank report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mlaconvert.conversion.calibration import recording_forwards
from mlaconvert.evaluation.agreement import teacher_agreement
from mlaconvert.modeling.model import WanModel
from mlaconvert.training.clips import Clips
from mlaconvert.training.objective import count_step_flops
from mlaconvert.training.sharding import full_parameters
from mlaconvert.training.training_run import training_rows

if TYPE_CHECKING:
    from mlaconvert.training.finetune import FinetuneSettings, RunState


@torch.no_grad()
def held_out_latents(model: WanModel, clips: torch.Tensor, text: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """Per layer, the latents c the cache would hold for the held-out clips: kv_down of the clean (t = 0) tokens."""
    device = next(model.parameters()).device
    found: list[torch.Tensor] = []
    with recording_forwards([b.self_attn.kv_down for b in model.blocks], lambda _i, _args, y: found.append(y)):
        clean = clips.to(device)
        t = torch.zeros(clean.shape[0], clean.shape[2], device=device)
        model(clean, t, text.to(device), chunk_frames=chunk, clean=clean)
    # The teacher-forcing forward runs the clean copy first: the first half of each layer's tokens.
    return [c[:, : c.shape[1] // 2].reshape(-1, c.shape[-1]).float().cpu() for c in found]


def measure_student(student: WanModel, teacher: WanModel, clips: Clips, settings: FinetuneSettings, autocast: Any) -> dict[str, Any]:
    """Teacher agreement and rank utilisation (weights and held-out latents) of the student as it is now."""
    from mlaconvert.conversion.spectra import mla_utilisation

    latents, text = clips.latents[-settings.held_out :], clips.text[-settings.held_out :]
    with autocast:
        agreement = teacher_agreement(student, teacher, latents, text, settings=settings.sampler_for(latents.shape[2], settings.seed),
                                      seed=settings.seed)
        cached = held_out_latents(student, latents, text, settings.sampler.chunk)
    utilisation = []
    for i, c in enumerate(cached):
        prefix = f"blocks.{i}.self_attn."
        names = [n for n, _ in student.named_parameters() if n.startswith(prefix)]
        weights = {n[len(prefix):]: p.float() for n, p in full_parameters(student, names).items()}
        utilisation.append(mla_utilisation(weights, latents=c))
    return {"agreement": agreement, "utilisation": utilisation}


def finetune_section(run: RunState, after: dict[str, Any]) -> dict[str, Any]:
    """The "finetune" section of the export's rank report."""
    trainer = run.trainer
    settings, clips = trainer.settings, trainer.clips
    rows = training_rows(run.rows)
    tail = rows[-10:]  # the mean over the last steps leaves out the first steps' warm-up
    clip_size = tuple(clips.latents.shape[2:])
    return {
        "teacher": {"source": run.teacher.info.get("spec"), "sha256": run.teacher_sha},
        "settings": settings.record(),
        "data": {**clips.origin, "clips": clips.latents.shape[0], "held_out": settings.held_out, "clip_size": list(clip_size)},
        "steps": trainer.step_count,
        "trained_tensors": len(trainer.trained),
        "trained_parameters": sum(p.numel() for p in trainer.params),
        "processes": trainer.procs.world,
        "device": str(trainer.procs.device),
        "final_loss": rows[-1]["loss"] if rows else None,
        "eval_loss": [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in run.rows if "eval_loss" in r],
        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in tail])) if tail else None,
        "memory_plan": trainer.memory_plan().to_dict(),
        "peak_memory_gib": max((r["peak_memory_gib"] for r in rows if "peak_memory_gib" in r), default=None),
        "model_flops_per_step": settings.batch * count_step_flops(trainer.student.config, settings, clip_size[0], clip_size[1:]),
        "before": run.before,
        "after": after,
        "horizon": None if run.best is None else {
            "teacher_psnr_db": run.before["horizon_reference"],
            "checks": [{"step": r["step"], **r["horizon"]} for r in run.rows if "horizon" in r],
            "kept_step": run.best["step"],  # the export holds this check's weights
        },
    }
