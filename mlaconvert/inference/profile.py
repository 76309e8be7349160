"""Where one steady-state chunk forward spends its time: kernel time split into attention, matrix products and
everything else, beside the floor its FLOPs allow.

The floor takes the forward's attention and matrix-product FLOPs (torch's FLOP counter on the real forward) at the
rates this device reaches here and now on large problems of each kind, so it holds on whatever device runs it.
(The counter knows the CUDA attention kernels; on a CPU it counts no attention FLOPs, and CPU figures only
exercise the code.)
What lies between the kernel time and the floor is the elementwise work; what lies between the wall time and the
kernel time is launch and host overhead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from mlaconvert.inference.graphs import ChunkForward
from mlaconvert.modeling.cache import KVCache
from mlaconvert.modeling.model import WanModel

ATTENTION = ("scaled_dot_product", "sdpa", "flash", "fmha", "attention")
MATMUL = ("gemm", "gemv", "splitk", "nvjet", "cutlass", "xmma", "addmm", "baddbmm", "aten::mm", "aten.mm", "aten::bmm",
          "aten.bmm", "_scaled_mm", "matmul", "conv")
KINDS = ("attention", "matmul", "other")
TOP_KERNELS = 15


def kind_of(name: str) -> str:
    """attention, matmul or other, from a kernel's or an operator's name. Inductor names its fused elementwise
    kernels after the operators they follow (triton_poi_fused_addmm_gelu_3): those are the rest, and only its
    matrix templates (triton_tem_) are matrix products."""
    lower = name.lower()
    if lower.startswith("triton_"):
        return "matmul" if lower.startswith("triton_tem_") else "other"
    if any(key in lower for key in ATTENTION):
        return "attention"
    return "matmul" if any(key in lower for key in MATMUL) else "other"


@torch.no_grad()
def steady_forward(model: WanModel, *, chunk: int, window: int, latent_size: tuple[int, int], batch: int = 1,
                   seed: int = 0, graphs: bool = False) -> Callable[[], torch.Tensor]:
    """One denoising forward of a chunk against a full window, ready to run again and again (`graphs`: as the
    sampler runs it with --graphs)."""
    cfg = model.config
    param = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    h, w = latent_size
    cache = KVCache(model, batch=batch, frame_shape=(h // cfg.patch_size[1], w // cfg.patch_size[2]), window=window)
    text = (torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g) * 0.1).to(param.device, param.dtype)
    x = torch.randn(batch, cfg.in_dim, chunk, h, w, generator=g).to(param.device, param.dtype)
    zero = torch.zeros(batch, chunk, device=param.device)
    while cache.frames_committed < window:
        model(x, zero, text, cache=cache.step(chunk, commit=True))
    t = torch.full((batch, chunk), 500.0, device=param.device)
    forward = ChunkForward(model, graphs)
    return torch.no_grad()(lambda: forward(x, t, text, cache.step(chunk, commit=False)))


def _timed(run: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Seconds per call, after one call that warms up."""
    run()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    sync(device)
    tic = time.perf_counter()
    for _ in range(repeats):
        run()
    sync(device)
    return (time.perf_counter() - tic) / repeats


def device_rates(device: torch.device, dtype: torch.dtype, size: int) -> dict[str, float]:
    """FLOP/s of a size x size x size matrix product and of a 16-head attention over `size` tokens, measured."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    q = torch.randn(1, 16, size, 128, device=device, dtype=dtype)
    matmul = 2 * size**3 / _timed(lambda: a @ a, device, 10)
    attention = 4 * 16 * size * size * 128 / _timed(lambda: F.scaled_dot_product_attention(q, q, q), device, 10)
    return {"matmul": matmul, "attention": attention}


def forward_breakdown(forward: Callable[[], torch.Tensor], device: torch.device, rates: dict[str, float],
                      timed: Callable[[], torch.Tensor] | None = None) -> dict[str, Any]:
    """Kernel time by kind (on a CPU: operator time) and the FLOP floor of one call of `forward`, and the wall time
    of one call of `timed` (default: `forward`), the same forward as the sampler runs it."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    wall = _timed(timed or forward, device, 3)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        forward()
        if cuda:
            torch.cuda.synchronize(device)
    kernel = dict.fromkeys(KINDS, 0.0)
    named = []
    for row in prof.key_averages():
        spent = (row.self_device_time_total if cuda else row.self_cpu_time_total) / 1e3  # microseconds -> ms
        kernel[kind_of(row.key)] += spent
        named.append({"name": row.key, "kind": kind_of(row.key), "ms": spent, "calls": row.count})
    with FlopCounterMode(display=False) as counter:
        forward()
    flops = dict.fromkeys(KINDS, 0)
    for op, count in counter.get_flop_counts().get("Global", {}).items():
        flops[kind_of(str(op))] += count
    floor = sum(flops[kind] / rates[kind] for kind in ("attention", "matmul")) * 1e3
    return {
        "wall_ms": wall * 1e3,
        "kernel_ms": {**kernel, "total": sum(kernel.values())},
        # What the remaining time is, by name: where fusion work would go next.
        "top_kernels": sorted(named, key=lambda k: -k["ms"])[:TOP_KERNELS],
        "flops": flops,
        "rates_tflops": {kind: rate / 1e12 for kind, rate in rates.items()},
        "floor_ms": floor,
    }
