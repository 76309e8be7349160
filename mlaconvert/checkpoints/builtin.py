"""Models shipped inside the package, so every command can be tried without a download (`builtin:tiny-wan`).

`tiny-wan` is a randomly initialised Wan2.1-architecture DiT small enough for tests and demos (2 layers,
3 heads x 64). Its weights are drawn with numpy's PCG64 generator rather than torch's, because numpy
promises a stable stream across versions: the shipped file and `make_tiny_wan(0)` stay identical.
Regenerate the shipped files with `python -m mlaconvert.checkpoints.builtin`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlaconvert.checkpoints.formats import native_shapes, save_native
from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.config import WanConfig

TINY_WAN = WanConfig(
    dim=192, ffn_dim=384, num_heads=3, num_layers=2, in_dim=4, out_dim=4, text_dim=64, text_len=32, freq_dim=64
)

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTINS = {
    "tiny-wan": "random weights (deterministic, seed 0), not a trained model",
    "bouncing-balls": "a small causal Wan trained from scratch on the bouncing-balls world (mlaconvert pretrain)",
}


def builtin_path(name: str) -> Path:
    """The shipped folder of builtin model `name`."""
    if name not in BUILTINS:
        raise MlaconvertError(f"unknown builtin model '{name}'; builtins: {', '.join(f'builtin:{n}' for n in BUILTINS)}")
    path = BUILTIN_DIR / name
    if not (path / "config.json").is_file():
        raise MlaconvertError(f"builtin model '{name}' is missing from the installation ({path}); reinstall mlaconvert")
    return path


def make_tiny_wan(seed: int = 0, config: WanConfig = TINY_WAN) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights for `config`, scaled like a trained model's so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    return {key: torch.from_numpy(scaled_like_trained(key, rng.standard_normal(shape)).astype(np.float32))
            for key, shape in native_shapes(config).items()}


def scaled_like_trained(key: str, noise: Any) -> Any:
    """Standard normal `noise` (a numpy array or a tensor) for the tensor `key`, scaled as a trained Wan's are."""
    shape = tuple(noise.shape)
    if key.endswith("modulation"):
        return noise / math.sqrt(shape[-1])  # Wan's own init of the modulation tables
    if ".norm" in key and key.endswith(".weight"):
        return 1.0 + 0.1 * noise
    if key.endswith(".bias"):
        return 0.02 * noise
    return noise / math.sqrt(math.prod(shape[1:]))  # variance 1/fan_in keeps each layer's output scale


def write_tiny_wan(folder: Path = BUILTIN_DIR / "tiny-wan") -> Path:
    """(Re)write the shipped tiny-wan checkpoint in native Wan layout."""
    return save_native(TINY_WAN, make_tiny_wan(0), folder, extra_config={"mlaconvert_note": BUILTINS["tiny-wan"]})


if __name__ == "__main__":
    print(write_tiny_wan())
