"""Shared test harness: Prefect and MLflow in temporary homes, never the user's or the project's own."""

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from vae.launch import listening

# Prefect reads its settings when first imported: point it at a temporary home before any test imports it.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)

# Tests on the real data sets read them from the offline mirror; the tests need no network (CI sets the mirror).
needs_mirror = pytest.mark.skipif(not os.environ.get("VAE_DATA_MIRROR"), reason="needs the data mirror (CI sets VAE_DATA_MIRROR)")


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One Prefect server (a real one, on a SQLite database in a temporary directory) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store created once (its migrations take seconds); tests work on copies of it."""
    import mlflow

    from pipeline import tracking

    database = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    try:
        tracking.ensure_store(f"sqlite:///{database}")
    finally:
        mlflow.set_tracking_uri(None)
    return database


def use_store_copy(template: Path, directory: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Copy the template store into ``directory`` and make it MLFLOW_TRACKING_URI and the default ``mlruns/``."""
    from pipeline import tracking

    directory.mkdir(parents=True)
    shutil.copy(template, directory / "mlflow.db")
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    monkeypatch.setattr(tracking, "MLRUNS_DIR", directory)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def store_copier(mlflow_template: Path):
    """:func:`use_store_copy` of the session's template, for fixtures of wider scope than one test."""
    return lambda directory, monkeypatch: use_store_copy(mlflow_template, directory, monkeypatch)


@pytest.fixture
def mlflow_store(mlflow_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh MLflow store for one test, in ``tmp_path/mlruns``, made both MLFLOW_TRACKING_URI and the default."""
    import mlflow

    yield use_store_copy(mlflow_template, tmp_path / "mlruns", monkeypatch)
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


# --- real servers, started as users start them ----------------------------------------------------------------------

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running(
    command: Sequence[str],
    *,
    ready_url: str | None,
    log: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 180.0,
) -> Iterator[subprocess.Popen]:
    """``command`` running in a session of its own (from the project root, output to ``log``) until the block ends.

    Waits until ``ready_url`` (unless None) answers an HTTP GET with a 2xx status; fails the test with the end of the
    log if the process exits first or ``timeout`` seconds pass. At the end the whole process group gets SIGTERM, then
    SIGKILL.
    """
    with open(log, "w") as output:
        process = subprocess.Popen(
            list(command), cwd=PROJECT_ROOT, env={**os.environ, **(env or {})},
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while ready_url is not None and not _answers(ready_url):
            if process.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {process.returncode}" if process.poll() is not None else f"not ready after {timeout} s"
                pytest.fail(f"{' '.join(command)}: {why}; end of its log:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield process
    finally:
        _stop_group(process)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the group, up to 20 s for its leader to exit, then SIGKILL to whatever of the group is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        if sig == signal.SIGTERM:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
    process.wait()


@pytest.fixture
def mlflow_server(tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """`mlflow server` on a free loopback port, its backend and artifacts in ``tmp_path``, made MLFLOW_TRACKING_URI.

    Yields its URL and its artifacts destination. The local default store (``mlflow_store``) is only there to show
    that nothing goes to it.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}",
        "--artifacts-destination", str(tmp_path / "server" / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    (tmp_path / "server").mkdir()
    with running(command, ready_url=f"{url}/health", log=tmp_path / "mlflow-server.log"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        yield url, tmp_path / "server" / "artifacts"


# --- what listens where ---------------------------------------------------------------------------------------------


def listening_sockets(pids: Iterable[int]) -> set[tuple[str, int]]:
    """The (address, port) on which the processes ``pids`` listen for TCP connections: "0.0.0.0" or "::" is every
    interface. A process that has exited has none."""
    inodes = set()
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone
            continue
        for descriptor in descriptors:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{descriptor}")
            except OSError:  # closed while we looked (the listing's own descriptor, for one)
                continue
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    return {(address, port) for address, port, inode in listening() if inode in inodes}


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback address (::ffff:127.0.0.1)."""
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def descendants(pid: int) -> list[int]:
    """``pid`` and every process it started, and they started, that is still running."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        found.append(current := queue.pop())
        queue.extend(children.get(current, []))
    return found


class Payload:
    """A pickle that creates ``marker`` when unpickled: what a tamperer puts in a model file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")
