"""Specification of `make browser` and `make test` where the browser is missing, run by make itself with stand-ins for
`id`, `apt-get` and the venv's python on the PATH (they record how they were called)."""

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

MISSING = {"CHROMIUM": "/nonexistent/chromium", "CHROMEDRIVER": "/nonexistent/chromedriver"}
PACKAGES = "chromium chromium-driver fonts-liberation"


def stand_in(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


@pytest.fixture
def machine(tmp_path: Path):
    """Runs ``make TARGET`` in the project as user ``uid`` with an apt-get whose update exits ``update_status``.

    Returns the finished make, the apt-get calls and the venv python's calls (one line each).
    """
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    bin_dir.mkdir()
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()  # newer than pyproject.toml and the Makefile: `make install` has nothing to do
    apt_calls, python_calls = tmp_path / "apt-get.calls", tmp_path / "python.calls"
    stand_in(venv / "bin", "python", f'echo "$*" >> {python_calls}')

    def make(target: str, *, uid: int, update_status: int = 0, variables: dict[str, str] = MISSING):
        stand_in(bin_dir, "id", f'[ "$1" = "-u" ] && echo {uid}')
        stand_in(bin_dir, "apt-get", "\n".join([
            f'echo "$*" >> {apt_calls}',
            f'case "$*" in *update*) [ {update_status} -eq 0 ] || {{',
            f'  echo "E: Failed to fetch http://deb.debian.org/debian/dists/trixie/InRelease" >&2; exit {update_status}; }};;',
            "esac",
        ]))
        settings = [f"{name}={value}" for name, value in {**variables, "VENV": str(venv)}.items()]
        finished = subprocess.run(
            ["make", "--no-print-directory", "-C", str(PROJECT_ROOT), target, *settings],
            env=clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}"), capture_output=True, text=True, timeout=120,
        )
        calls = lambda path: path.read_text().splitlines() if path.exists() else []  # noqa: E731
        return finished, calls(apt_calls), calls(python_calls)

    return make


def test_make_browser_stops_showing_apt_gets_output_when_the_package_lists_cannot_be_updated(machine):
    finished, apt_calls, _ = machine("browser", uid=0, update_status=100)
    assert finished.returncode != 0
    assert [call.split()[-1] for call in apt_calls] == ["update"]  # nothing installed from stale lists
    assert "E: Failed to fetch http://deb.debian.org/debian/dists/trixie/InRelease" in finished.stderr
    assert f"error: apt-get update failed (its output is above): not installing {PACKAGES}" in finished.stderr


def test_make_browser_as_root_updates_the_package_lists_then_installs_the_browser(machine):
    finished, apt_calls, _ = machine("browser", uid=0)
    assert finished.returncode == 0, finished.stderr
    assert [call.split(" ", 3)[-1] for call in apt_calls] == ["update", f"install -y --no-install-recommends {PACKAGES}"]


def test_make_browser_as_another_user_says_how_to_install_it_and_fails(machine):
    finished, apt_calls, _ = machine("browser", uid=1000)
    assert finished.returncode != 0 and apt_calls == []
    assert "error: the browser test needs Debian's chromium and chromium-driver" in finished.stderr
    assert f"sudo apt-get install {PACKAGES}" in finished.stderr


def test_make_test_without_the_browser_says_so_and_runs_the_tests(machine):
    finished, apt_calls, python_calls = machine("test", uid=1000, variables=MISSING | {"PYTEST_ARGS": "-x"})
    assert finished.returncode == 0, finished.stderr
    assert apt_calls == [] and python_calls == ["-m pytest -x"]
    assert "warning: no browser, so the browser test will skip" in finished.stderr


def test_make_test_with_the_browser_installs_nothing(machine, tmp_path):
    for name in ("chromium", "chromedriver"):
        stand_in(tmp_path, name, "true")
    present = {"CHROMIUM": str(tmp_path / "chromium"), "CHROMEDRIVER": str(tmp_path / "chromedriver")}
    finished, apt_calls, python_calls = machine("test", uid=0, variables=present)
    assert finished.returncode == 0, finished.stderr
    assert apt_calls == [] and python_calls == ["-m pytest"]
    assert "warning" not in finished.stderr


def clean_env(**changes: str) -> dict[str, str]:
    """This process's environment without what an enclosing make passes down (its command-line variables, such as
    PYTEST_ARGS, reach a nested make through MAKEFLAGS), with ``changes``."""
    inherited = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "PYTEST_ARGS")
    return {**{name: value for name, value in os.environ.items() if name not in inherited}, **changes}
