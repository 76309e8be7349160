"""Progress when the output is not a terminal: plain lines with the count, the rate and the time left."""

from __future__ import annotations

from mlaconvert.progress import PlainProgress, progress_bar


def test_piped_progress_prints_plain_lines(capsys):
    with progress_bar(every=0.0) as progress:  # pytest captures stdout: not a terminal
        assert isinstance(progress, PlainProgress)
        task = progress.add_task("finetune", total=4, info="")
        for step in range(1, 5):
            progress.update(task, completed=step, info=f"loss {1 / step:.2f}")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("finetune 4/4, ") and "s left" in lines[-1] and lines[-1].endswith("loss 0.25")


def test_piped_progress_is_quiet_between_intervals_but_shows_the_end(capsys):
    with progress_bar(every=3600.0) as progress:
        task = progress.add_task("chunks", total=10)
        for _ in range(10):
            progress.advance(task)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chunks 10/10, ")
