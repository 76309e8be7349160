"""Recipes: every shipped recipe parses into the settings it names; CLI options override recipe values."""

from __future__ import annotations

import pytest

from mlaconvert.convert import ConvertSettings
from mlaconvert.errors import MlaconvertError
from mlaconvert.recipes import RECIPES_DIR, load_recipe, merge


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert isinstance(recipe["source"], str)
    assert load_recipe(path.stem) == recipe  # a bare name finds it too, dots in the name included
    settings = merge(ConvertSettings, recipe.get("convert", {}), {}, "convert")
    assert settings.rope_dim % 2 == 0
    if "finetune" in recipe:
        from mlaconvert.finetune import FinetuneSettings

        merge(FinetuneSettings, recipe["finetune"], {}, "finetune")


def test_explicit_options_override_and_unknown_keys_are_refused():
    settings = merge(ConvertSettings, {"dc": 64, "init": "asvd"}, {"dc": 32, "init": None}, "convert")
    assert settings.dc == 32 and settings.init == "asvd"
    with pytest.raises(MlaconvertError, match="unknown setting"):
        merge(ConvertSettings, {"dcc": 64}, {}, "convert")
    with pytest.raises(MlaconvertError, match="no such recipe"):
        load_recipe("no-such-recipe")
