"""The command line itself: help for every subcommand, the version, and errors that stay one line."""

from __future__ import annotations

import json
import re

import pytest
import typer

from mlaconvert import __version__
from mlaconvert.errors import MlaconvertError


@pytest.mark.parametrize("command", ["analyze", "convert", "finetune", "sample", "eval", "bench", "pretrain"])
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
    monkeypatch.setattr("mlaconvert.rank.analyze_source", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # out of main() uncaught: Python prints the traceback
        cli("analyze", "builtin:tiny-wan")

    def refuse(*_a, **_k):
        raise MlaconvertError("the same place, a problem with the input")

    monkeypatch.setattr("mlaconvert.rank.analyze_source", refuse)
    r = cli("analyze", "builtin:tiny-wan")
    assert r.returncode == 1 and r.stderr.strip() == "error: the same place, a problem with the input"


def test_an_interrupted_convert_exits_130_and_says_how_to_redo_it(cli, tmp_path, monkeypatch):
    def interrupt(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr("mlaconvert.convert.convert_model", interrupt)
    out = tmp_path / "mla"
    r = cli("convert", "builtin:tiny-wan", "--dc", "32", "-o", str(out))
    assert r.returncode == 130 and len(r.stderr.strip().splitlines()) == 1
    assert "convert stopped" in r.stderr and "nothing was written" in r.stderr and not out.exists()
    out.mkdir()
    r = cli("convert", "builtin:tiny-wan", "--dc", "32", "-o", str(out), "--force")
    assert r.returncode == 130 and "as it was before" in r.stderr and r.stderr.strip().endswith("--force")


def test_an_interrupted_finetune_exits_130_and_says_resume(cli, tmp_path, monkeypatch):
    from mlaconvert.finetune import Trainer

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
    assert r.returncode == 130 and len(r.stderr.strip().splitlines()) == 1, r.stderr
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


WORKFLOW = ["analyze", "convert", "finetune", "sample", "eval", "bench", "pretrain"]


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
    monkeypatch.setattr("mlaconvert.bench.run_bench", lambda *_a, **_k: report)  # measured once above is enough
    r = cli(*args, "--force")
    assert r.returncode == 0 and "look at bench-tiny-cpu/bench-cpu.png" in r.stdout
