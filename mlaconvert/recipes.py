"""Recipes: ready-made TOML files naming a source model and the settings of each stage.

    source = "gdhe17/Self-Forcing/checkpoints/self_forcing_dmd.pt"
    config = "wan2.1-1.3b"          # for checkpoints that carry no config
    [convert]
    dc = 192
    rope_dim = 32
    init = "svd"

Command-line options given explicitly override the recipe; the recipe overrides the built-in defaults. The
conversion from a recipe section (and overrides) to a stage's settings lives here, so Python users get what the
CLI does: `convert_settings(load_recipe("tiny-wan"), dc="16,32")`.
"""

from __future__ import annotations

import importlib
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlaconvert.errors import MlaconvertError
from mlaconvert.fields import check_types

if TYPE_CHECKING:
    from mlaconvert.conversion.convert import ConvertSettings

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
# The keys a recipe may have at its top, and its sections with the settings dataclass each one fills (module,
# class; imported when a recipe is checked). A new stage adds its line here.
TOP_LEVEL = {"source": "the model to start from (any SOURCE form)", "config": "preset or config.json for a checkpoint without one"}
SECTIONS = {
    "convert": ("mlaconvert.conversion.convert", "ConvertSettings"),
    "finetune": ("mlaconvert.training.finetune", "FinetuneSettings"),
    "pretrain": ("mlaconvert.training.pretrain", "PretrainSettings"),
    "eval": ("mlaconvert.evaluation.evaluate", "EvalSettings"),
    "study": ("mlaconvert.evaluation.study", "StudySettings"),
}
# Keys of older recipes whose meaning moved: each gets a one-line error naming its replacement.
RENAMED = {
    "finetune": {
        "steps": "max_steps (optimizer steps; the sampler's denoising steps are sampler_steps)",
        "timesteps": "timestep_mode (list or uniform)",
    },
}


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read and check a recipe file; a bare name is looked up in the repository's recipes/ folder."""
    p = Path(path)
    if not p.exists() and p.parent == Path(".") and (RECIPES_DIR / f"{p.name}.toml").exists():
        p = RECIPES_DIR / f"{p.name}.toml"
    if not p.is_file():
        raise MlaconvertError(f"no such recipe: '{path}'")
    try:
        recipe = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise MlaconvertError(f"recipe '{p}' is not valid TOML: {e}") from None
    check_recipe(recipe, str(p))
    return recipe


def check_recipe(recipe: dict[str, Any], where: str) -> None:
    """Unknown keys and sections, old key names and wrong types: one line each, naming the file and the key."""
    for key, value in recipe.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise MlaconvertError(f"{where}: {key} must be a section, [{key}]")
            check_section(settings_type(key), value, f"{where}: [{key}]", key)
        elif isinstance(value, dict):
            raise MlaconvertError(f"{where}: unknown section [{key}]; known: {', '.join(f'[{s}]' for s in SECTIONS)}")
        elif key not in TOP_LEVEL:
            raise MlaconvertError(f"{where}: unknown key '{key}'; known at the top: {', '.join(TOP_LEVEL)}")
        elif not isinstance(value, str):
            raise MlaconvertError(f"{where}: {key} = {value!r} should be a string ({TOP_LEVEL[key]})")


def settings_type(section: str) -> type:
    module, name = SECTIONS[section]
    return getattr(importlib.import_module(module), name)


def check_section(settings: type, section: dict[str, Any], where: str, name: str) -> None:
    """The keys of one section: each a field of `settings`, under its current name, of the right type."""
    for key in section:
        if key in RENAMED.get(name, {}):
            raise MlaconvertError(f"{where} {key} was replaced by {RENAMED[name][key]}")
    known = {f.name for f in fields(settings) if f.metadata.get("recipe", True)}
    unknown = set(section) - known
    if unknown:
        raise MlaconvertError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    check_types(settings, section, where)


def merge(settings_type: type, section: dict[str, Any], overrides: dict[str, Any], where: str) -> Any:
    """Build `settings_type` (a dataclass) from a recipe section, then explicit (non-None) overrides."""
    check_section(settings_type, section, f"[{where}]", where)
    values = {**section, **{k: v for k, v in overrides.items() if v is not None}}
    return settings_type(**values)


def parse_dc(text: str) -> int | list[int] | str:
    """dc in text (--dc, or a string in a recipe): an integer, `auto`, a comma-separated list, or a .json/.toml
    file holding a list (or {dc = [...]})."""
    text = text.strip()
    if text == "auto":
        return "auto"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?\d+(\s*,\s*-?\d+)+", text):
        return [int(x) for x in text.split(",")]
    path = Path(text)
    if not path.is_file():
        raise MlaconvertError(f"--dc must be an integer, 'auto', a comma list, or a .json/.toml file (got '{text}')")
    try:
        data: Any = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise MlaconvertError(f"could not parse --dc file '{path}': {e}") from None
    if isinstance(data, dict):
        data = data.get("dc")
    if not isinstance(data, list) or not all(isinstance(x, int) for x in data):
        raise MlaconvertError(f"--dc file '{path}' must hold a list of integers (or a table with dc = [...])")
    return data


def convert_settings(recipe: Mapping[str, Any] | None = None, **overrides: Any) -> ConvertSettings:
    """ConvertSettings from a recipe's [convert] section, then the explicit (non-None) overrides; a dc given as
    text, in either, is read by `parse_dc`."""
    from mlaconvert.conversion.convert import ConvertSettings

    section = dict((recipe or {}).get("convert", {}))
    for values in (section, overrides):
        if isinstance(values.get("dc"), str):
            values["dc"] = parse_dc(values["dc"])
    return merge(ConvertSettings, section, overrides, "convert")
