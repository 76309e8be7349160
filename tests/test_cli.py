"""The command line itself: help for every subcommand, the version, and errors that stay one line."""

from __future__ import annotations

import pytest

from mlaconvert import __version__


@pytest.mark.parametrize("command", ["analyze", "convert", "finetune", "sample", "bench"])
def test_every_subcommand_has_help(cli, command):
    r = cli(command, "--help")
    assert r.returncode == 0 and "Usage" in r.stdout and "Traceback" not in r.stderr


def test_version(cli):
    r = cli("--version")
    assert r.returncode == 0 and __version__ in r.stdout


def test_errors_with_brackets_are_printed_verbatim(cli, tmp_path):
    r = cli("analyze", "no[/such]/path[x]", "-o", str(tmp_path / "o"))
    assert r.returncode == 1 and "no[/such]/path[x]" in r.stderr and len(r.stderr.strip().splitlines()) == 1
