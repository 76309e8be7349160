"""The long-horizon check of `finetune`: at step 0 and at every checkpoint the student rolls out held-out clips far
past the training clip and is scored against their true continuation, beside the dense teacher on the same clips
and noise; the export keeps the weights of the best check.

Why: teacher forcing on short clips trades long-horizon stability for short-range agreement (the study measures
it), and neither the held-out loss nor the one-window teacher agreement can see that. The score is the study's
headline test: the largest gap, over the horizon buckets of `mlaconvert eval`, between the teacher's PSNR to the
truth and the student's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mlaconvert.inference.sampling import rollout
from mlaconvert.evaluation.evaluate import EvalSettings, Truth, evaluate, world_truth
from mlaconvert.modeling.model import WanModel
from mlaconvert.training.sharding import full_parameters, load_parameters
from mlaconvert.training.training_run import derived_seed

if TYPE_CHECKING:
    from mlaconvert.training.clips import Clips
    from mlaconvert.training.finetune import FinetuneSettings


@dataclass
class HorizonCheck:
    truth: Truth
    settings: EvalSettings
    autocast: Any
    reference: list[float]  # the teacher's PSNR to the truth per bucket

    def horizons(self, model: WanModel, settings: FinetuneSettings) -> list[dict[str, Any]]:
        """`model`'s PSNR to the truth per horizon bucket, after one chunk of true prefix."""
        with self.autocast:
            report = evaluate(model, self.truth, settings=self.settings, sampler=settings.sampler, prefix=settings.sampler.chunk).report
        return report["horizons"]

    def score(self, student: WanModel, settings: FinetuneSettings) -> dict[str, Any]:
        """The student's PSNR per bucket, its gap below the teacher, and the largest gap (lower is better)."""
        horizons = self.horizons(student, settings)
        gaps = [t - h["psnr_db"] for t, h in zip(self.reference, horizons, strict=True)]
        return {"psnr_db": [h["psnr_db"] for h in horizons], "gaps_db": gaps, "score": max(gaps)}


def horizon_truth(teacher: WanModel, settings: FinetuneSettings, clips: Clips) -> Truth:
    """`horizon_clips` clips `horizon_frames` long whose continuation is known: fresh ones of the model's world
    (a seed of their own, apart from training and eval clips); for any other model, the teacher's own rollouts for
    the held-out clips' text. Then the teacher continuing their first chunk with other noise is the reference
    a student must match: as close to a sample of the teacher as the teacher's own next sample is."""
    s, config = settings, teacher.config
    if config.world is not None:
        return world_truth(config, EvalSettings(clips=s.horizon_clips, seed=derived_seed(s.seed, "horizon", 0)), s.horizon_frames)
    held = clips.text[-s.held_out :]
    text = held[torch.arange(s.horizon_clips) % held.shape[0]]
    sampler = dataclasses.replace(s.sampler, seed=derived_seed(s.seed, "horizon", 0))
    video = rollout(teacher, text, frames=s.horizon_frames, latent_size=tuple(clips.latents.shape[-2:]), settings=sampler).latents
    return Truth(video.float().cpu(), text, {"kind": "teacher rollouts", "clips": s.horizon_clips})


def horizon_check(teacher: WanModel, clips: Clips, settings: FinetuneSettings, autocast: Any,
                  reference: list[float] | None = None) -> HorizonCheck | None:
    """The check of this run (None when `horizon_frames` is 0), the teacher scored once unless `reference` (from
    the checkpoint of a resumed run) is given."""
    s = settings
    if not s.horizon_frames:
        return None
    truth = horizon_truth(teacher, s, clips)
    seed = derived_seed(s.seed, "horizon-noise", 0)
    eval_settings = EvalSettings(clips=truth.video.shape[0], frames=s.horizon_frames - s.sampler.chunk,
                                 batch=min(truth.video.shape[0], s.generate_batch * 2), seed=seed)
    check = HorizonCheck(truth, eval_settings, autocast, reference or [])
    if reference is None:
        check.reference = [h["psnr_db"] for h in check.horizons(teacher, s)]
    return check


def best_of(best: dict[str, Any] | None, step: int, result: dict[str, Any], student: WanModel) -> dict[str, Any]:
    """The best check so far: this one (with a copy of the trained weights) if it scores lower, else `best`."""
    if best is not None and best["score"] <= result["score"]:
        return best
    params = full_parameters(student, [n for n, p in student.named_parameters() if p.requires_grad])
    return {"step": step, "score": result["score"], "params": params}


def restore(student: WanModel, best: dict[str, Any]) -> None:
    """Put the best check's trained weights back into the student."""
    load_parameters(student, best["params"])
