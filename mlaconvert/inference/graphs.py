"""A streaming rollout's steady state as CUDA graphs.

Once the window is full, every forward of a chunk (each denoising step and the commit pass) has the same
shapes: the ring buffer keeps every cached tensor in place, and only the chunk's values, its timesteps, the
slots it writes and the RoPE angles of the positions change. A forward of the 1.3B model launches a few thousand small kernels,
whose launch cost rivals their work at batch 1; replayed as one graph they cost one launch. `ChunkForward`
captures the forward of each such shape once and replays it with the new inputs copied into the captured ones.
Before the window fills, and off CUDA, it runs the model as it is: dense and latent models alike, since the
graph holds whatever kernels the model's own forward ran.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from mlaconvert.modeling.cache import CacheStep
from mlaconvert.modeling.model import WanModel
from mlaconvert.modeling.rope import Angles

WARM_UP = 3  # forwards before a capture, as PyTorch's own examples run


@functools.cache
def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one stream every capture in this process warms up and captures on. PyTorch keeps a cuBLAS workspace
    for each (handle, stream) until the process ends (pytorch/pytorch#99196): a new stream per capture left about
    33 MiB behind each one on an H200, up to the 32 streams of PyTorch's pool, which a bench or an eval of many
    rollouts added up."""
    return torch.cuda.Stream(device)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # x, t, text, write_index, keys' cos, sin, queries' cos, sin: the graph reads these
    output: torch.Tensor  # the graph writes this

    def replay(self, values: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for captured, value in zip(self.inputs, values, strict=True):
            captured.copy_(value)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites the captured output


class ChunkForward:
    """`model(x, t, text, cache=step)` for the sampler, from a CUDA graph once the window is full (`graphs`)."""

    def __init__(self, model: WanModel, graphs: bool):
        self.model = model
        self.enabled = graphs and next(model.parameters()).device.type == "cuda"
        self.captured: dict[tuple[tuple[int, ...], ...], _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None  # the graphs never run at once: one pool

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, step: CacheStep) -> torch.Tensor:
        if not self.enabled or step.n_tokens < step.cache.window * step.cache.tokens_per_frame:
            return self.model(x, t, text, cache=step)
        keys, queries = step.key_angles, step.query_angles
        values = (x, t, text, step.write_index, keys.cos, keys.sin, queries.cos, queries.sin)
        key = tuple(tuple(v.shape) for v in values)
        if key not in self.captured:
            self.captured[key] = self._capture(values, step)
        return self.captured[key].replay(values)

    def _capture(self, values: tuple[torch.Tensor, ...], step: CacheStep) -> _Captured:
        """Capture one forward of these shapes. Forwards first run on the capture stream so that lazy set-up (its
        cuBLAS workspace, the allocator's first blocks, compiled blocks' recompiles) happens outside the capture;
        they write the chunk's own cache slots with the chunk's own entries, which the replay then writes again."""
        inputs = tuple(v.clone() for v in values)
        x, t, text, write_index, key_cos, key_sin, query_cos, query_sin = inputs
        static = dataclasses.replace(step, write_index=write_index, key_angles=Angles(key_cos, key_sin),
                                     query_angles=Angles(query_cos, query_sin))
        side = _capture_stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(WARM_UP):
                self.model(x, t, text, cache=static)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            output = self.model(x, t, text, cache=static)
        return _Captured(graph, inputs, output)
