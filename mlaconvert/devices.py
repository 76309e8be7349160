"""The one device policy of every command: CUDA when available, else the CPU — but never a full-size model on
the CPU unless the user asked for it with --device cpu; and the one dtype a model runs in on each."""

from __future__ import annotations

import gc

import torch

from mlaconvert.errors import MlaconvertError

FULL_SIZE_PARAMS = 100_000_000  # above this, a CPU run takes hours where a GPU takes seconds

GiB = 2**30  # bytes in the unit every memory figure is reported in


def choose_device(requested: str | None, params: int | None = None) -> torch.device:
    """`requested` (--device) if usable; None picks CUDA when available, else the CPU for models up to
    FULL_SIZE_PARAMS parameters (params None: size not known yet, no size check)."""
    if requested is not None:
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise MlaconvertError(f"--device {requested}: no CUDA device found; pass --device cpu (fine for tiny models like builtin:tiny-wan)")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if params is not None and params > FULL_SIZE_PARAMS:
        raise MlaconvertError(
            f"no CUDA device found and a {params / 1e9:.1f}B-parameter model on the CPU would take hours; pass --device cpu to run it anyway"
        )
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype a model runs in on `device`: bf16 on CUDA, as Wan's streaming models are trained and served;
    float32 on the CPU, where bf16 matmuls are slow and the tiny models are checked to float precision."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def held_memory(device: torch.device) -> int:
    """Bytes the process holds on `device` now (0 off CUDA): what a job starting now will not count as its own."""
    if device.type != "cuda":
        return 0
    gc.collect()  # garbage the job might collect halfway would otherwise count as held, lowering its peak
    return torch.cuda.memory_allocated(device)


def job_peak_gib(device: torch.device, held_before: int) -> float | None:
    """A job's own peak on `device` since the last reset of the peak, less what the process held when the job began
    (a caller's models, an earlier job's leftovers), which no memory plan of the job counts. None off CUDA."""
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - held_before) / GiB
