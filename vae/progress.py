"""Progress of a long step: a bar on a terminal, a line every so often in a log, nothing when it is quick."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from tqdm.auto import tqdm

LOG_EVERY_SECONDS = 30.0  # without a terminal: one line per this many seconds of work


class Progress(Protocol):
    def update(self, done: int) -> None:
        """``done`` more units of the step are finished."""


@contextmanager
def progress(
    total: int, description: str, unit: str, *, enabled: bool | None = None, unit_scale: bool = False
) -> Iterator[Progress]:
    """Report a step of ``total`` ``unit`` s while the block runs: a tqdm bar on stderr when that is a terminal,
    otherwise a line on stdout every :data:`LOG_EVERY_SECONDS` ("IWAE bound: 3000/10000 images (30%), 31 s").

    ``enabled=False`` reports nothing; ``True`` forces the bar; ``None`` (the default) decides by the terminal.
    ``unit_scale`` writes counts with SI prefixes, as tqdm's option of that name does: for bytes (``unit="B"``),
    "12.6MB/47.0MB" rather than "12582912/47040016 B".
    """
    if enabled is None and not sys.stderr.isatty():
        report: _PeriodicLine | tqdm = _PeriodicLine(total, description, unit, unit_scale)
    else:
        report = tqdm(
            total=total, desc=description, unit=unit if unit_scale else f" {unit}", unit_scale=unit_scale,
            leave=False, disable=enabled is False,
        )
    try:
        yield report
    finally:
        if isinstance(report, tqdm):
            report.close()


class _PeriodicLine:
    """A line on stdout every LOG_EVERY_SECONDS of work: what a log (or Prefect's UI) shows of a long step."""

    def __init__(self, total: int, description: str, unit: str, unit_scale: bool = False):
        self.total, self.description, self.unit, self.unit_scale = total, description, unit, unit_scale
        self.done, self.started = 0, time.monotonic()
        self.next_line = self.started + LOG_EVERY_SECONDS

    def update(self, done: int) -> None:
        self.done += done
        now = time.monotonic()
        if now >= self.next_line:
            share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            if self.unit_scale:
                counts = f"{tqdm.format_sizeof(self.done)}{self.unit}/{tqdm.format_sizeof(self.total)}{self.unit}"
            else:
                counts = f"{self.done}/{self.total} {self.unit}"
            print(f"{self.description}: {counts}{share}, {now - self.started:.0f} s", flush=True)
            self.next_line = now + LOG_EVERY_SECONDS
