"""The command line itself: help for every subcommand, the version, and errors that stay one line."""

from __future__ import annotations

import json
import re

import pytest
import typer

from mlaconvert import __version__
from mlaconvert.errors import MlaconvertError


@pytest.mark.parametrize("command", ["analyze", "convert", "finetune", "sample", "eval", "bench", "pretrain", "study"])
def test_every_subcommand_has_help(cli, command):
    r = cli(command, "--help")
    assert r.returncode == 0 and "Usage" in r.stdout and "Traceback" not in r.stderr


def test_version(cli):
    r = cli("--version")
    assert r.returncode == 0 and __version__ in r.stdout


def test_errors_with_brackets_are_printed_verbatim(cli, tmp_path):
    r = cli("analyze", "no[/such]/path[x]", "-o", str(tmp_path / "o"))
    assert r.returncode == 1 and "no[/such]/path[x]" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["sample", "builtin:tiny-wan", "--frames", "abc"], "Invalid value for '--frames'"),
        (["convert", "builtin:tiny-wan"], "Missing option '-o'"),
        (["sample", "builtin:tiny-wan", "--frame", "3"], "No such option: --frame"),
    ],
)
def test_usage_errors_name_the_option_and_show_the_usage(cli, args, message):
    r = cli(*args)
    assert r.returncode == 2 and message in r.stderr and "Usage:" in r.stderr and "Traceback" not in r.stderr
    if "--frame" in args:
        assert "--frames" in r.stderr.split("No such option")[1]  # the suggestion


def test_a_bug_shows_its_traceback_and_a_user_error_stays_one_line(cli, monkeypatch):
    monkeypatch.setattr("mlaconvert.conversion.rank.analyze_source", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # out of main() uncaught: Python prints the traceback
        cli("analyze", "builtin:tiny-wan")

    def refuse(*_a, **_k):
        raise MlaconvertError("the same place, a problem with the input")

    monkeypatch.setattr("mlaconvert.conversion.rank.analyze_source", refuse)
    r = cli("analyze", "builtin:tiny-wan")
    assert r.returncode == 1 and r.stderr.strip() == "error: the same place, a problem with the input"


def test_an_interrupted_convert_exits_130_and_says_how_to_redo_it(cli, tmp_path, monkeypatch):
    def interrupt(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr("mlaconvert.conversion.convert.convert_model", interrupt)
    out = tmp_path / "mla"
    r = cli("convert", "builtin:tiny-wan", "--dc", "32", "-o", str(out))
    assert r.returncode == 130 and len(r.stderr.strip().splitlines()) == 1
    assert "convert stopped" in r.stderr and "nothing was written" in r.stderr and not out.exists()
    out.mkdir()
    r = cli("convert", "builtin:tiny-wan", "--dc", "32", "-o", str(out), "--force")
    assert r.returncode == 130 and "as it was before" in r.stderr and r.stderr.strip().endswith("--force")


def test_an_interrupted_finetune_exits_130_and_says_resume(cli, tmp_path, monkeypatch):
    from mlaconvert.training.finetune import Trainer

    r = cli("convert", "builtin:tiny-wan", "--dc", "32", "--no-measure", "-o", str(tmp_path / "mla"))
    assert r.returncode == 0, r.stderr
    step = Trainer.step

    def step_then_interrupt(self):
        if self.step_count == 2:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Trainer, "step", step_then_interrupt)
    out = tmp_path / "ft"
    r = cli("finetune", str(tmp_path / "mla"), "-o", str(out), "--max-steps", "4", "--checkpoint-every", "2", "--clips", "3",
            "--frames", "3", "--height", "32", "--width", "32", "--device", "cpu")
    # One line for the interruption (after the progress lines of the work that finished), no traceback.
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("interrupted: ")
    assert "latest checkpoint" in r.stderr and r.stderr.strip().endswith("--resume")
    monkeypatch.setattr(Trainer, "step", step)
    resumed = r.stderr.split("continue with: ")[1].split()
    r = cli("finetune", str(tmp_path / "mla"), "-o", str(out), "--device", "cpu")
    assert r.returncode == 1 and "pass --resume to continue it" in r.stderr
    r = cli(*resumed[1:])
    assert r.returncode == 0, r.stderr


def test_an_empty_dc_is_refused_not_taken_as_the_default(cli, tmp_path):
    r = cli("convert", "builtin:tiny-wan", "--dc", "", "-o", str(tmp_path / "o"))
    assert r.returncode == 1 and "--dc must be an integer" in r.stderr and not (tmp_path / "o").exists()


def test_outputs_are_checked_and_claimed_before_the_work(cli, tmp_path, monkeypatch):
    import os

    (tmp_path / "file").write_text("x")
    r = cli("convert", "builtin:tiny-wan", "-o", str(tmp_path / "file" / "out"))
    assert r.returncode == 1 and f"'{tmp_path / 'file'}' is a file" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    # A second convert into the same folder while the first runs (a live process holds the claim) refuses at once.
    out = tmp_path / "mla"
    (tmp_path / ".mla.lock").write_text(str(os.getppid()))
    r = cli("convert", "builtin:tiny-wan", "-o", str(out))
    assert r.returncode == 1 and f"process {os.getppid()}) is writing '{out}'" in r.stderr
    (tmp_path / ".mla.lock").write_text("999999999")  # a claim whose process died is taken over

    monkeypatch.setattr("os.access", lambda *_a: False)  # a read-only folder (root ignores chmod)
    r = cli("convert", "builtin:tiny-wan", "-o", str(out))
    assert r.returncode == 1 and f"no permission to write in '{tmp_path}'" in r.stderr
    monkeypatch.undo()
    r = cli("convert", "builtin:tiny-wan", "--dc", "32", "--no-measure", "-o", str(out))
    assert r.returncode == 0, r.stderr


def test_help_keeps_the_section_names_and_gives_bench_units(cli):
    r = cli("convert", "--help")
    assert "[convert]" in r.stdout
    r = cli("bench", "--help")
    assert "pixels" in r.stdout and "Latent width" in r.stdout


WORKFLOW = ["analyze", "convert", "finetune", "sample", "eval", "study", "bench", "pretrain"]


def test_commands_come_in_workflow_order_each_with_an_example(cli):
    r = cli("--help")
    listed = re.findall(r"^│ (\w+) ", r.stdout, flags=re.M)
    assert listed == WORKFLOW
    for command in WORKFLOW:
        r = cli(command, "--help")
        assert f"Example: mlaconvert {command} " in r.stdout, command


def test_help_keeps_every_bracketed_word(cli):
    """rich reads `[word]` as markup and drops it unless escaped as `\\[word]`."""
    from mlaconvert.cli import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        words = {w for text in texts for w in re.findall(r"\[[^\]\s]+\]", text.replace("\\[", "["))}
        shown = cli(name, "--help").stdout
        assert all(w in shown for w in words), (name, [w for w in words if w not in shown])


def test_bench_writes_a_folder_named_for_the_run_and_never_over_one(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["bench", "--preset", "tiny", "--device", "cpu", "--height", "32", "--width", "32", "--window", "3",
            "--batch", "1", "--timed-chunks", "1", "--long-seconds", "0"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "bench-tiny-cpu").iterdir()) == ["bench-cpu.json", "bench-cpu.png"]
    assert not (tmp_path / "docs").exists()
    r = cli(*args)
    assert r.returncode == 1 and "'bench-tiny-cpu' already exists; pass --force" in r.stderr
    report = json.loads((tmp_path / "bench-tiny-cpu" / "bench-cpu.json").read_text())
    monkeypatch.setattr("mlaconvert.inference.bench.run_bench", lambda *_a, **_k: report)  # measured once above is enough
    r = cli(*args, "--force")
    assert r.returncode == 0 and "look at bench-tiny-cpu/bench-cpu.png" in r.stdout


def _commands():
    """(name, the function typer calls, its click command) for every subcommand."""
    from mlaconvert.cli import app

    group = typer.main.get_command(app)
    for info in app.registered_commands:
        name = info.name or info.callback.__name__
        yield name, info.callback, group.commands[name]


def _listed(value):
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("command", WORKFLOW)
def test_every_settings_option_shows_its_fields_default_and_help(command):
    """A setting's default and help are written once, in its dataclass field; no command keeps its own copy."""
    import dataclasses

    callback, click_command = next((c, cmd) for name, c, cmd in _commands() if name == command)
    sources = getattr(callback, "option_fields", {})
    classes = {cls for cls, _ in sources.values()}
    flags = {"--" + f.name.replace("_", "-") for cls in classes for f in dataclasses.fields(cls)}
    for param in click_command.params:
        if param.name not in sources:
            assert not flags & set(param.opts), (command, param.opts, "is a setting: offer it with options(...)")
            continue
        cls, name = sources[param.name]
        field = next(f for f in dataclasses.fields(cls) if f.name == name)
        assert param.help == field.metadata["help"], (command, param.opts)
        assert str(_listed(param.default)) == str(_listed(field.default)), (command, param.opts)


def test_eval_offers_the_sampler_options_of_sample():
    from mlaconvert.inference.sampling import SamplerOptions

    def sampler_flags(command: str) -> set[str]:
        callback, click_command = next((c, cmd) for name, c, cmd in _commands() if name == command)
        return {o for p in click_command.params if callback.option_fields.get(p.name, (None,))[0] is SamplerOptions for o in p.opts}

    assert sampler_flags("sample") == {"--steps", "--timesteps", "--shift", "--chunk", "--window", "--sink", "--positions", "--seed",
                                       "--graphs", "--compile"}
    assert sampler_flags("sample") - sampler_flags("eval") == {"--seed"}  # eval's own --seed (EvalSettings) seeds the sampler too


def test_eval_sampler_options_reach_the_sampler(cli, tmp_path, monkeypatch):
    from mlaconvert.checkpoints.builtin import TINY_WAN
    from mlaconvert.evaluation.evaluate import EvalSettings
    from mlaconvert.inference.sampling import SamplerSettings

    calls = []
    monkeypatch.setattr("mlaconvert.evaluation.evaluate.run_eval", lambda *a, **k: calls.append(k) or {"model": a[0], "horizons": []})
    r = cli("eval", "builtin:tiny-wan", "--chunk", "2", "--window", "6", "--sink", "1", "--positions", "reindex",
            "--timesteps", "1000,500", "--shift", "2", "--seed", "5", "--clips", "3", "-o", str(tmp_path / "e"))
    assert r.returncode == 0, r.stderr
    assert calls[-1]["sampler"] == SamplerSettings(chunk=2, window=6, sink=1, timesteps=(1000.0, 500.0), shift=2.0,
                                                   positions="reindex", seed=5)
    assert calls[-1]["settings"] == EvalSettings(clips=3, seed=5)
    r = cli("eval", "builtin:tiny-wan", "-o", str(tmp_path / "e"))
    assert r.returncode == 0, r.stderr
    assert calls[-1]["sampler"] == SamplerSettings.for_model(TINY_WAN) and calls[-1]["settings"] == EvalSettings()


def test_options_left_out_keep_the_recipes_values(cli, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from mlaconvert.training.finetune import FinetuneSettings

    runs = []
    monkeypatch.setattr("mlaconvert.training.finetune.finetune", lambda *a, **k: runs.append(a[2]) or SimpleNamespace(report=None))
    r = cli("finetune", "bb-mla", "--recipe", "bouncing-balls-dc32", "--lr", "0.001", "--timesteps", "1000,500",
            "--no-checkpointing", "-o", str(tmp_path / "ft"))
    assert r.returncode == 0, r.stderr
    got = runs[-1]
    assert (got.lr, got.sampler_timesteps, got.gradient_checkpointing) == (0.001, (1000.0, 500.0), False)  # given
    assert (got.max_steps, got.batch, got.sampler_steps) == (6, 2, 4)  # the recipe's
    assert got.seed == FinetuneSettings.seed and got.train == FinetuneSettings.train  # neither: the dataclass's
