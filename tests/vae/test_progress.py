"""Specification of progress reports: a line now and then in a log, nothing for a quick step, a bar on a terminal."""

import pytest

from vae import progress as progress_module
from vae.progress import progress


def test_without_a_terminal_a_long_step_prints_a_line_each_interval(monkeypatch, capsys):
    clock = iter([0.0, 10.0, 31.0, 40.0, 62.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    with progress(10_000, "IWAE bound (k=5)", "images") as done:
        for _ in range(4):
            done.update(2_500)
    assert capsys.readouterr().out.splitlines() == [
        "IWAE bound (k=5): 5000/10000 images (50%), 31 s",
        "IWAE bound (k=5): 10000/10000 images (100%), 62 s",
    ]


def test_a_step_quicker_than_the_interval_prints_nothing(capsys):
    with progress(3, "pictures", "pictures") as done:
        done.update(3)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("enabled", [True, False])
def test_forced_on_it_draws_a_bar_and_forced_off_it_stays_silent(enabled, capsys):
    with progress(4, "IWAE bound", "images", enabled=enabled) as done:
        done.update(4)
    out, err = capsys.readouterr()
    assert out == ""
    assert ("IWAE bound" in err) is enabled
