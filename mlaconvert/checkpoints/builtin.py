"""Models shipped inside the package, so every command can be tried without a download (`builtin:tiny-wan`).

`tiny-wan` is a randomly initialised Wan2.1-architecture DiT small enough for tests and demos (2 layers,
3 heads x 64). Its weights are drawn with numpy's PCG64 generator rather than torch's, because numpy
promises a stable stream across versions: the shipped file and `make_tiny_wan(0)` stay identical.
Regenerate the shipped files with `python -m mlaconvert.checkpoints.builtin`.
"""

from __future__ import annotations

from pathlib import Path

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
    sd: dict[str, torch.Tensor] = {}
    for key, shape in native_shapes(config).items():
        noise = rng.standard_normal(shape)
        if key.endswith("modulation"):
            value = noise / np.sqrt(config.dim)  # Wan's own init of the modulation tables
        elif ".norm" in key and key.endswith(".weight"):
            value = 1.0 + 0.1 * noise
        elif key.endswith(".bias"):
            value = 0.02 * noise
        else:
            value = noise / np.sqrt(np.prod(shape[1:]))  # variance 1/fan_in keeps each layer's output scale
        sd[key] = torch.from_numpy(value.astype(np.float32))
    return sd


def write_tiny_wan(folder: Path = BUILTIN_DIR / "tiny-wan") -> Path:
    """(Re)write the shipped tiny-wan checkpoint in native Wan layout."""
    return save_native(TINY_WAN, make_tiny_wan(0), folder, extra_config={"mlaconvert_note": BUILTINS["tiny-wan"]})


if __name__ == "__main__":
    print(write_tiny_wan())
