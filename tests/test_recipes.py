"""Recipes: every shipped recipe parses into the settings it names; CLI options override recipe values."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from mlaconvert.conversion.convert import ConvertSettings
from mlaconvert.errors import MlaconvertError
from mlaconvert.recipes import RECIPES_DIR, convert_settings, load_recipe, merge


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert load_recipe(path.stem) == recipe  # a bare name finds it too, dots in the name included
    if "pretrain" in recipe:  # trains from scratch: no source
        from mlaconvert.training.pretrain import settings_from_recipe

        settings_from_recipe(recipe["pretrain"]).check()
        return
    assert isinstance(recipe["source"], str)
    settings = merge(ConvertSettings, recipe.get("convert", {}), {}, "convert")
    assert settings.rope_dim % 2 == 0
    if "finetune" in recipe:
        from mlaconvert.training.finetune import FinetuneSettings

        merge(FinetuneSettings, recipe["finetune"], {}, "finetune")


def test_explicit_options_override_and_unknown_keys_are_refused():
    settings = merge(ConvertSettings, {"dc": 64, "init": "asvd"}, {"dc": 32, "init": None}, "convert")
    assert settings.dc == 32 and settings.init == "asvd"
    with pytest.raises(MlaconvertError, match="unknown setting"):
        merge(ConvertSettings, {"dcc": 64}, {}, "convert")
    with pytest.raises(MlaconvertError, match="no such recipe"):
        load_recipe("no-such-recipe")


def test_convert_settings_read_dc_text_from_the_recipe_and_the_overrides(tmp_path):
    """What `convert --recipe` does, for Python users: the recipe's section, dc text parsed, then overrides."""
    recipe = {"source": "builtin:tiny-wan", "convert": {"dc": "16, 32", "init": "asvd"}}
    settings = convert_settings(recipe, rope_dim=16, init=None)
    assert (settings.dc, settings.init, settings.rope_dim) == ([16, 32], "asvd", 16)
    (tmp_path / "dc.json").write_text("[8, 24]")
    assert convert_settings(recipe, dc=str(tmp_path / "dc.json")).dc == [8, 24]
    assert convert_settings(dc="auto").dc == "auto" and convert_settings().dc == 192
    with pytest.raises(MlaconvertError, match="--dc must be an integer"):
        convert_settings(dc="")

def test_old_keys_say_what_replaced_them():
    from mlaconvert.training.finetune import FinetuneSettings

    with pytest.raises(MlaconvertError, match=r"\[finetune\] steps was replaced by max_steps"):
        merge(FinetuneSettings, {"steps": 50}, {}, "finetune")


def test_the_tiny_recipe_runs_the_whole_chain(cli, tmp_path):
    """convert -> finetune -> report, all from recipes/tiny-wan.toml, on the CPU."""
    import json

    mla, tuned, report = tmp_path / "mla", tmp_path / "ft", tmp_path / "report"
    r = cli("convert", "--recipe", "tiny-wan", "-o", str(mla))
    assert r.returncode == 0, r.stderr
    r = cli("finetune", str(mla), "--recipe", "tiny-wan", "-o", str(tuned), "--max-steps", "4", "--clips", "6", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "4 steps" in r.stdout
    # The recipe's 128x128 pixels are 16x16 latents through the tiny model's VAE stride of 8.
    (clips,) = (tuned / "data").glob("*/clips.safetensors")
    assert load_file(clips)["latents"].shape[-2:] == (16, 16)
    agreement = json.loads((tuned / "agreement.json").read_text())
    assert agreement["after"]["flow_relative_error_mean"] < agreement["before"]["flow_relative_error_mean"]
    r = cli("analyze", str(tuned), "-o", str(report))
    assert r.returncode == 0, r.stderr
    layers = json.loads((report / "rank_report.json").read_text())["layers"]
    assert all(layer["mla"]["dc"] == 64 for layer in layers)


@pytest.mark.parametrize(
    "text,message",
    [
        ('source = "builtin:tiny-wan"\n[convrt]\ndc = 16\n', r"unknown section \[convrt\]; known: \[convert\], \[finetune\]"),
        ('sorce = "builtin:tiny-wan"\n', "unknown key 'sorce'"),
        ('[convert]\nrope_dim = "16"\n', r"\[convert\]: rope_dim = '16' should be an integer"),
        ("[convert]\ndc = 64.0\n", r"\[convert\]: dc = 64.0 should be an integer or a list of integers or a string"),
        ('[finetune]\nsampler_steps = "ten"\n', "sampler_steps = 'ten' should be an integer"),
        ("[finetune]\nsteps = 10\n", r"\[finetune\] steps was replaced by max_steps"),
        ("[finetune]\nsampler_timesteps = [1000, \"x\"]\n", "should be a list of numbers"),
        ("source = 3\n", "source = 3 should be a string"),
    ],
)
def test_a_bad_recipe_is_one_line_naming_the_file_and_key(cli, tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(MlaconvertError, match=message) as e:
        load_recipe(path)
    assert str(path) in str(e.value)
    r = cli("convert", "--recipe", str(path), "-o", str(tmp_path / "out"))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and str(path) in r.stderr


def test_a_config_json_with_a_wrong_type_is_one_line(cli, tmp_path):
    import json
    import shutil

    from mlaconvert.checkpoints.builtin import builtin_path

    folder = tmp_path / "model"
    shutil.copytree(builtin_path("tiny-wan"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dim": "192"}))
    r = cli("analyze", str(folder), "-o", str(tmp_path / "a"))
    assert r.returncode == 1 and "config.json: dim = '192' should be an integer" in r.stderr
    (folder / "config.json").write_text(json.dumps({**config, "sampler": {"steps": 4.5}}))
    r = cli("analyze", str(folder), "-o", str(tmp_path / "a"))
    assert r.returncode == 1 and "config.json: sampler: steps = 4.5 should be an integer" in r.stderr
