"""How far would a bf16 residual stream move Wan's numerics? The built-in trained world model, bf16 weights, its
float32 residual stream (as Wan runs it) against the same model with the stream rounded to bf16 after every block
and before the head. Judged as `eval` judges: rollouts against the true continuation, and teacher agreement (the
float32-stream model as the teacher). One GPU, about 70 s.

    PYTHONPATH=. python docs/benchmarks/bf16_residual.py
"""

from __future__ import annotations

import copy
import json

import torch

from mlaconvert.evaluation.evaluate import EvalSettings, evaluate, world_truth
from mlaconvert.inference.sampling import SamplerSettings
from mlaconvert.modeling.model import WanModel


def bf16_stream(model: WanModel) -> WanModel:
    """A copy of `model` whose residual stream is rounded to bf16 wherever it leaves a block."""
    rounded = copy.deepcopy(model)
    for block in rounded.blocks:
        block.register_forward_hook(lambda module, args, out: out.to(torch.bfloat16).float())
    rounded.head.register_forward_pre_hook(lambda module, args: (args[0].to(torch.bfloat16).float(), *args[1:]))
    return rounded


@torch.no_grad()
def main() -> None:
    model = WanModel.from_pretrained("builtin:bouncing-balls", dtype=torch.bfloat16).to("cuda").eval()
    settings = EvalSettings(clips=32, frames=240, batch=16)
    sampler = SamplerSettings.for_model(model.config)
    truth = world_truth(model.config, settings, sampler.chunk + settings.frames)
    report = evaluate(bf16_stream(model), truth, settings=settings, sampler=sampler, prefix=sampler.chunk, teacher=model).report
    for bucket in report["horizons"]:
        print(f"frames {bucket['frames']}: PSNR vs the truth, bf16 stream {bucket['psnr_db']:.2f} dB, float32 stream {bucket['teacher_psnr_db']:.2f} dB")
    agreement = report["agreement"]
    print(json.dumps({key: agreement[key] for key in ("flow_relative_error_mean", "rollout_psnr_db_mean")}))


if __name__ == "__main__":
    main()
