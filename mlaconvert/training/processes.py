"""The processes of a `torchrun` job: which one this is, its device, and the few collectives a training recipe
needs. One process (no torchrun) is the same object with `world` 1, where every collective is a no-op.

Work only rank 0 does (writing the run folder) runs through `on_main`, whose barrier also says whether it
succeeded: a failure there ends every process at once, instead of leaving the others waiting at a barrier until
the group's timeout (hours, since rank 0 may write and report on a 14B export for that long).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from mlaconvert.devices import choose_device, held_memory, job_peak_gib
from mlaconvert.errors import MlaconvertError

T = TypeVar("T")
# Rank 0 alone writes the export and its rank report while the others wait: allow it hours, not minutes.
GROUP_TIMEOUT = timedelta(hours=3)


@dataclass
class Processes:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # this call initialised the process group, so it tears it down
    held_before: int = 0  # bytes the process already held on its GPU when the job began

    @property
    def main(self) -> bool:
        return self.rank == 0

    def peak_memory_gib(self) -> float | None:
        """The job's own peak on its GPU since the last reset of the peak (devices.job_peak_gib)."""
        return job_peak_gib(self.device, self.held_before)

    def on_main(self, work: Callable[[], T]) -> T | None:
        """`work()` on rank 0 (None elsewhere), then one barrier for all. If it raised, rank 0 raises that error
        and every other process a one-line error saying so, rather than waiting for a step that never comes."""
        if not self.main:
            self._agree(failed=False)
            return None
        try:
            result = work()
        except BaseException:  # an interrupt too: the others must not wait for a rank 0 that stopped
            # Peers a Ctrl-C stopped as well are gone: the error to report is this one, not the failed barrier.
            with contextlib.suppress(Exception):
                self._agree(failed=True)
            raise
        self._agree(failed=False)
        return result

    def _agree(self, *, failed: bool) -> None:
        if self.world == 1:
            return
        flag = torch.tensor([float(failed)], device=self.device)  # nccl reduces on the GPU
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not failed:
            raise MlaconvertError(f"process {self.rank} stopped because process 0 failed (its message says why)")

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` on every process (where it lives, through this process's device for nccl)."""
        if self.world == 1:
            return tensor
        moved = tensor.to(self.device, copy=True)
        dist.broadcast(moved, src=0)
        return moved.to(tensor.device)

    def same(self, value: T) -> T:
        """Rank 0's `value` on every process: for what decides which collectives follow (the best check), so
        that no process takes another branch over a last-digit difference of its own measurement."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def mean(self, values: list[float]) -> list[float]:
        """The mean over the processes of each value (the same list everywhere)."""
        stats = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(stats)
            stats /= self.world
        return stats.tolist()


@contextlib.contextmanager
def processes(device: str | None) -> Iterator[Processes]:
    """One process, or one of WORLD_SIZE started by torchrun (gloo on CPU, nccl on CUDA); a process group
    set up here is torn down on the way out, an error included."""
    procs = _start(device)
    try:
        yield procs
        if procs.owns_group:
            dist.barrier()  # gloo aborts a process that tears the group down while another still talks in it
    finally:
        if procs.owns_group:
            dist.destroy_process_group()


def _start(device: str | None) -> Processes:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = choose_device(device)
    cuda = chosen.type == "cuda"
    if world == 1:
        return Processes(0, 1, chosen, False, held_memory(chosen))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None, timeout=GROUP_TIMEOUT)
    return Processes(dist.get_rank(), dist.get_world_size(), dev, owns, held_memory(dev))
