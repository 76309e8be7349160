"""Random-weight checkpoints of any Wan shape, laid out and sharded as the Hub's are, written one tensor at a time:
what `analyze`, `convert` and `bench` are measured on at sizes (14B: 28.6 GB in bf16) that no test machine can hold.

Layouts: "wan" — config.json and diffusion_pytorch_model-0000i-of-0000n.safetensors with native keys and an index,
as Wan-AI/Wan2.1-T2V-*; "diffusers" — the same files under transformer/ with WanTransformer3DModel keys and config,
as Wan-AI/Wan2.1-T2V-*-Diffusers. Each tensor is drawn from its own seeded generator, scaled like a trained
model's (variance 1/fan_in), so any tensor can be remade alone and the file does not depend on the order of work.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from mlaconvert.checkpoints.builtin import scaled_like_trained
from mlaconvert.checkpoints.formats import wan_config_to_diffusers
from mlaconvert.checkpoints.naming import native_shapes, native_to_diffusers_keys
from mlaconvert.checkpoints.streaming import shard_plan, write_safetensors
from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.config import WanConfig
from mlaconvert.outputs import atomic_dir, write_json

LAYOUTS = ("wan", "diffusers")
STEM = "diffusion_pytorch_model"


def random_tensor(key: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The tensor `key` of a random checkpoint: the same for the same (key, seed) whatever else is made."""
    generator = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little") >> 1)
    return scaled_like_trained(key, torch.randn(shape, generator=generator)).to(dtype)


def write_random_checkpoint(config: WanConfig, folder: Path, *, layout: str = "wan", shard_bytes: int = 5 * 10**9,
                            dtype: torch.dtype = torch.bfloat16, seed: int = 0, force: bool = False) -> Path:
    """Write the checkpoint into `folder` (whole, or not at all); returns the folder a SOURCE names."""
    if layout not in LAYOUTS:
        raise MlaconvertError(f"layout must be one of {', '.join(LAYOUTS)} (got '{layout}')")
    shapes = native_shapes(config)
    names = native_to_diffusers_keys(shapes) if layout == "diffusers" else {k: k for k in shapes}
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = shard_plan({k: math.prod(s) * itemsize for k, s in shapes.items()}, shard_bytes)
    with atomic_dir(Path(folder), force=force) as tmp:
        weights = tmp / "transformer" if layout == "diffusers" else tmp
        weights.mkdir(parents=True, exist_ok=True)
        weight_map = {}
        for i, keys in enumerate(shards, start=1):
            file = f"{STEM}-{i:05d}-of-{len(shards):05d}.safetensors"
            specs = [(names[k], dtype, shapes[k]) for k in keys]
            native = {names[k]: k for k in keys}
            write_safetensors(weights / file, specs, lambda name: random_tensor(native[name], shapes[native[name]], seed, dtype),
                              metadata={"format": "pt"})
            weight_map.update({names[k]: file for k in keys})
        total = sum(math.prod(s) * itemsize for s in shapes.values())
        write_json(weights / f"{STEM}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
        if layout == "diffusers":
            write_json(weights / "config.json", {"_class_name": "WanTransformer3DModel", **wan_config_to_diffusers(config)})
            write_json(tmp / "model_index.json", {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]})
        else:
            write_json(weights / "config.json", config.to_dict())
    return Path(folder)
