"""How a finetune spreads its models over torchrun's processes: each holds a whole copy (DDP, the default), or
each holds a 1/N share of every block of teacher and student (FSDP2 `fully_shard`, `--shard`), gathered block
by block as the forward reaches it. Sharding is what lets a 14B teacher-student pair fit on 80 GB cards.

A sharded model's forward is a collective: every process runs it together. So with `--shard` the measures
(held-out loss, rollouts, utilisation) run on every process, and reading or writing whole weights goes through
`full_parameters` and `load_parameters`, which gather or scatter rows; checkpoints and exports hold whole
tensors by name either way, so a run may resume with or without sharding, on any number of processes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.model import WanModel
from mlaconvert.training.processes import Processes


def spread(student: WanModel, teacher: WanModel, procs: Processes, shard: bool) -> nn.Module:
    """The module the training forward calls: the student itself (one process), wrapped in DDP, or — with
    `shard` — the student after both models were sharded in place, each block a unit, then the rest."""
    if procs.world == 1:
        return student
    if not shard:
        ids = [procs.device.index] if procs.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(student, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(procs.device.type, (procs.world,))
    for model in (teacher, student):
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return student


@contextlib.contextmanager
def gradient_sync(module: nn.Module, on: bool) -> Iterator[None]:
    """Backward passes that reduce gradients across processes (`on`) or only accumulate them locally, as the
    micro-batches before the last one of a step do."""
    from torch.distributed.fsdp import FSDPModule

    if on or not isinstance(module, (nn.parallel.DistributedDataParallel, FSDPModule)):
        yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        with module.no_sync():
            yield


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process when sharded (a collective), else itself."""
    return tensor.full_tensor() if _is_sharded(tensor) else tensor


def own_part(tensor: torch.Tensor) -> torch.Tensor:
    """What this process holds of `tensor`: its rows when sharded, else all of it."""
    return tensor.to_local() if _is_sharded(tensor) else tensor


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole `value` held the way `param` is: on its device in its dtype, as its rows when sharded (every
    process has the whole value, so each takes its rows without communication)."""
    value = value.to(param.device, param.dtype)
    if _is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    return value


def _is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (FSDP2's rows of it). No DTensor exists before torch.distributed.tensor is
    imported, which costs every command a second at start (sympy): only a process that shards imports it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _parameters(model: nn.Module) -> dict[str, torch.nn.Parameter]:
    """The model's parameters by name, each as the optimizer holds it. FSDP2 leaves the root's own tensors (those
    outside the blocks) gathered after a forward without gradients until the next backward, registered as plain
    whole tensors: resharding first puts the sharded ones back."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return dict(model.named_parameters())


def full_parameters(model: nn.Module, names: Iterable[str] | None = None, *, keep: bool = True) -> dict[str, torch.Tensor]:
    """CPU copies of the whole parameters named (all by default); with a sharded model every process calls it,
    and those not `keep`ing them (all but the one that writes) take part in the gathering only."""
    wanted = None if names is None else set(names)
    out = {}
    for name, param in _parameters(model).items():
        if wanted is None or name in wanted:
            value = whole(param.detach())
            if keep:
                out[name] = value.to("cpu", copy=True)
    return out


@torch.no_grad()
def load_parameters(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Write whole tensors into the model's parameters of those names (each process into its rows)."""
    named = _parameters(model)
    for name, value in values.items():
        own_part(named[name]).copy_(own_part(like(value, named[name])))


def optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, *, keep: bool = True) -> dict[str, Any]:
    """The optimizer's state as whole CPU tensors keyed by parameter name, and its hyperparameter groups (with a
    sharded model every process calls it; see `full_parameters` for `keep`)."""
    names = {p: n for n, p in _parameters(model).items()}
    state = {}
    for p in (p for group in optimizer.param_groups for p in group["params"] if p in optimizer.state):
        entry = {k: whole(v) for k, v in optimizer.state[p].items()}
        if keep:
            state[names[p]] = {k: v.to("cpu", copy=True) for k, v in entry.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "names": [names[p] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict[str, Any]) -> None:
    """Restore what `optimizer_state` saved, each process taking its rows of the per-parameter tensors."""
    if any("names" not in g for g in saved["param_groups"]):
        raise MlaconvertError("the checkpoint's optimizer state is in the format of an older mlaconvert, which this one "
                              "cannot resume: start the run over with --force")
    named = _parameters(model)
    names = {p: n for n, p in named.items()}
    ids = {names[p]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state = {ids[n]: {k: like(v, named[n]) if v.shape == named[n].shape else v for k, v in entry.items()}
             for n, entry in saved["state"].items()}
    # torch pairs the saved groups' ids with the current parameters by position: list them in the current order.
    groups = [{**{k: v for k, v in g.items() if k != "names"}, "params": [ids[names[p]] for p in current["params"]]}
              for g, current in zip(saved["param_groups"], optimizer.param_groups, strict=True)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
