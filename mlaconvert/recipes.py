"""Recipes: ready-made TOML files naming a source model and the settings of each stage.

    source = "gdhe17/Self-Forcing/checkpoints/self_forcing_dmd.pt"
    config = "wan2.1-1.3b"          # for checkpoints that carry no config
    [convert]
    dc = 192
    rope_dim = 32
    init = "svd"

Command-line options given explicitly override the recipe; the recipe overrides the built-in defaults.
"""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from mlaconvert.errors import MlaconvertError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
# Keys of older recipes whose meaning moved: each gets a one-line error naming its replacement.
RENAMED = {
    "finetune": {
        "steps": "max_steps (optimizer steps; the sampler's denoising steps are sampler_steps)",
        "timesteps": "timestep_mode (list or uniform)",
    },
}


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe file; a bare name is looked up in the repository's recipes/ folder."""
    p = Path(path)
    if not p.exists() and p.parent == Path(".") and (RECIPES_DIR / f"{p.name}.toml").exists():
        p = RECIPES_DIR / f"{p.name}.toml"
    if not p.is_file():
        raise MlaconvertError(f"no such recipe: '{path}'")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise MlaconvertError(f"recipe '{p}' is not valid TOML: {e}") from None


def merge(settings_type: type, section: dict[str, Any], overrides: dict[str, Any], where: str) -> Any:
    """Build `settings_type` (a dataclass) from a recipe section, then explicit (non-None) overrides."""
    for key in section:
        if key in RENAMED.get(where, {}):
            raise MlaconvertError(f"[{where}] {key} was replaced by {RENAMED[where][key]}")
    known = {f.name for f in fields(settings_type)}
    unknown = set(section) - known
    if unknown:
        raise MlaconvertError(f"unknown setting(s) {', '.join(sorted(unknown))} in [{where}]; known: {', '.join(sorted(known))}")
    values = {**section, **{k: v for k, v in overrides.items() if v is not None}}
    return settings_type(**values)
