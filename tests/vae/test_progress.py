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


def test_with_unit_scale_the_line_counts_bytes_with_si_prefixes(progress_at_every_update, capsys):
    with progress(47_040_016, "train-images-idx3-ubyte", "B", unit_scale=True) as done:
        done.update(12_582_912)
        done.update(34_457_104)
    assert capsys.readouterr().out.splitlines() == [
        "train-images-idx3-ubyte: 12.6MB/47.0MB (27%), 0 s",
        "train-images-idx3-ubyte: 47.0MB/47.0MB (100%), 0 s",
    ]


def test_with_unit_scale_the_bar_counts_bytes_with_si_prefixes(capsys):
    with progress(47_040_016, "train-images-idx3-ubyte", "B", enabled=True, unit_scale=True):
        pass  # the bar is drawn once when it opens
    err = capsys.readouterr().err  # the bar's width follows $COLUMNS: only what is around it is fixed
    assert err.startswith("\rtrain-images-idx3-ubyte:   0%|")
    assert "| 0.00/47.0M [00:00<?, ?B/s]" in err
