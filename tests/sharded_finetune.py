"""Run by `torchrun --nproc-per-node 2` from test_finetune.py, in one process group: a finetune with a whole copy
of the models in each process (DDP); a sharded (FSDP2) finetune stopped after its first step, as a kill would stop
it, then resumed to the end; and FSDP2 on a unit whose frozen tensors are bf16 beside float32 trained ones, as on a
GPU. Each process writes what it saw to FINDINGS.<rank>.json for the test to check.

    sharded_finetune.py MODEL CLIP_CACHE FINDINGS RUNS_JSON    (RUNS_JSON: {"ddp"|"sharded": [OUTPUT, SETTINGS]})
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import mlaconvert.training.finetune as ft

model, cache, findings, runs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
seen: dict = {"parameters": []}
spread = ft.spread


def spy(student, teacher, procs, shard):
    module = spread(student, teacher, procs, shard)
    seen["parameters"].append(sorted({type(p).__name__ for m in (student, teacher) for p in m.parameters()}))
    return module


class Pair(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen, self.trained = torch.nn.Linear(8, 8).bfloat16().requires_grad_(False), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trained(self.frozen(x.bfloat16()).float())


ft.spread = spy
# One process group for both runs, as a job that calls finetune twice would hold it: finetune then leaves it be
# (initialising the default group a second time over the same store is not reliable).
dist.init_process_group("gloo")
output, settings = runs["ddp"]
ft.finetune(model, output, ft.FinetuneSettings(**settings), cache_dir=cache, device="cpu", show_progress=False)
output, settings = runs["sharded"]
settings = ft.FinetuneSettings(**settings)
stopped = ft.finetune(model, output, settings, cache_dir=cache, device="cpu", stop_after=1, show_progress=False)
done = ft.finetune(model, output, settings, cache_dir=cache, device="cpu", resume=True, show_progress=False)
seen["steps"] = [stopped.step, stopped.exported, done.step, done.exported]

# A GPU finetune's blocks hold frozen bf16 beside trained float32 tensors: FSDP2 gathers both, and only the
# trained, whose gradients it reduces, must share a dtype.
torch.manual_seed(0)
pair = Pair()
whole_frozen = pair.frozen.weight.detach().clone()
fully_shard(pair, mesh=init_device_mesh("cpu", (2,)))
pair(torch.randn(4, 8)).square().mean().backward()
seen["mixed"] = sorted(f"{type(p).__name__} {p.dtype} grad {p.grad.dtype if p.grad is not None else None}" for p in pair.parameters())
seen["frozen_gathered_whole"] = torch.equal(pair.frozen.weight.full_tensor(), whole_frozen)
Path(f"{findings}.{dist.get_rank()}.json").write_text(json.dumps(seen))
dist.barrier()  # no process tears the group down while another still talks in it
dist.destroy_process_group()
# Everything is written. The CPU build's gloo can abort in interpreter finalization after the group is gone
# ("terminate called without an active exception" with no Python frame on the main thread, about 1 run in 30 on
# a loaded 2-core machine): leave without finalization, so that an exit code says only what the run did.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
