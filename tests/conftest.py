"""Shared test harness: Prefect and MLflow in temporary homes, never the user's or the project's own."""

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest


# How long a server may take to start: MLflow's UI took 212 s on two cores under a load average of 38.
SERVER_START_SECONDS = 600.0
# For the few tests that run several flows or servers (@pytest.mark.timeout(LONG_TEST_SECONDS)); the rest have
# pyproject.toml's timeout. The longest took 650 s on two cores under a load average of 38, 2 minutes idle.
LONG_TEST_SECONDS = 2400

# Prefect reads its settings when first imported: point it at a temporary home before any test imports it.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# The temporary server a flow starts in its own process (torchrun's rank 0) gets Prefect's default of 20 s, which two
# loaded cores exceed: rank 0 then fails before training and the run is lost.
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = str(int(SERVER_START_SECONDS))
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)


def required(variable: str) -> bool:
    """Whether a test that lacks something it needs must fail rather than skip: in CI ($CI, which CI services set) or
    where ``variable`` says so (any value but "", "0", "false" or "no")."""
    return any(os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no") for name in ("CI", variable))


def pytest_report_header(config: pytest.Config) -> list[str]:
    mirror = os.environ.get("VAE_DATA_MIRROR")
    source = f"the mirror VAE_DATA_MIRROR={mirror}" if mirror else "the public hosts (no VAE_DATA_MIRROR)"
    strict = "an error (CI or VAE_REQUIRE_DATA)" if required("VAE_REQUIRE_DATA") else "a skip, with the reason"
    return [f"real data: from {source}, into the cache; if it cannot be fetched, the tests that train on it are {strict}"]


def unavailable_data() -> str | None:
    """Why the real data sets cannot be had here, or None once all of them are in the data cache, fetched the way a
    user's first run fetches them: from $VAE_DATA_MIRROR if set, else from the public hosts."""
    from pipeline import data

    for name in data.DATASETS:
        try:
            data.fetch(name)
        except data.DataError as error:
            sources = "VAE_DATA_MIRROR and the public hosts" if os.environ.get("VAE_DATA_MIRROR") else "the public hosts"
            lines = str(error).splitlines()
            first_failure = lines[1].strip() if len(lines) > 1 else lines[0]  # a DownloadError lists each source
            return f"needs the {name} data set, which could not be fetched from {sources} ({first_failure})"
    return None


@pytest.fixture(scope="session")
def real_data() -> None:
    """MNIST and Fashion-MNIST in the data cache (see :func:`unavailable_data`).

    When they cannot be fetched, every test that needs them skips with the reason (``-ra`` lists it); in CI, or with
    VAE_REQUIRE_DATA=1, that is an error instead.
    """
    why = unavailable_data()
    if why is not None:
        if required("VAE_REQUIRE_DATA"):
            pytest.fail(f"{why}; CI or VAE_REQUIRE_DATA requires it", pytrace=False)
        pytest.skip(f"{why}; set VAE_DATA_MIRROR to a copy of the data sets")


# The end-to-end tests train on the real data sets (see real_data).
needs_data = pytest.mark.usefixtures("real_data")


# --- float32 arithmetic --------------------------------------------------------------------------------------------

UNIT_ROUNDOFF = 2.0**-24  # of float32


def float32_error_bound(images: int) -> float:
    """The relative error bound of a float32 sum of m terms, gamma(m) = m u / (1 - m u) with u = 2^-24 (Higham, Accuracy
    and Stability of Numerical Algorithms, 2nd ed., 3.1), for the longest chain of additions behind a number summed
    over a batch of ``images``: the sum over the images and, inside each image's term, the sum over its 784 pixels."""
    m = images + 28 * 28
    return m * UNIT_ROUNDOFF / (1 - m * UNIT_ROUNDOFF)


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread, as each process of a torchrun group runs here (the thread count changes how sums split)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- progress reports ----------------------------------------------------------------------------------------------


@pytest.fixture
def progress_at_every_update(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a terminal, vae.progress prints its line at every update, each at "0 s": LOG_EVERY_SECONDS is 0 and its
    clock stands at 0 (vae.progress's alone: the rest of the process keeps time.monotonic)."""
    from types import SimpleNamespace

    from vae import progress

    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: 0.0))


# A training run of the default preset that takes seconds: the config of the flow runs that Prefect starts itself.
TINY_RUN = {
    "data.train_subset": 300, "data.validation_size": 200, "model.hidden_dims": [32], "eval.iwae_samples": 2,
    "eval.fid": False, "train.epochs": 1, "train.device": "cpu",
}


# A classifier recipe for FID that trains in a second or two (about 77% test accuracy on MNIST), and few prior samples:
# flow tests measure FID with it, so that each fresh store's first run does not train the real one (minutes).
TINY_CLASSIFIER = {
    "classifier.conv_channels": [4, 8], "classifier.feature_dim": 32, "classifier.epochs": 2, "classifier.batch_size": 25,
    "classifier.learning_rate": 0.01, "classifier.train_subset": 2000, "eval.fid_samples": 500,
}


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One Prefect server (a real one, on a SQLite database in a temporary directory) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=int(SERVER_START_SECONDS)):
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
    """A TCP port on 127.0.0.1 that nothing listens on right now (another process may take it before you do: see
    :func:`serving`)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def refused_port() -> Iterator[int]:
    """A port of 127.0.0.1 where connections are refused until the block ends: bound, so no one else can take it,
    but not listening."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


# How a server says its port was taken: uvicorn (under MLflow and Prefect), Python, and `prefect server start`.
PORT_TAKEN = ("address already in use", "is already in use")


class PortTaken(Exception):
    """The server could not bind its port: another process took it between :func:`free_port` and the bind."""


class Server(NamedTuple):
    process: subprocess.Popen
    port: int
    url: str  # http://127.0.0.1:<port>


@contextmanager
def serving(
    command: Callable[[int], Sequence[str]],
    *,
    ready_path: str,
    log: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = SERVER_START_SECONDS,
    attempts: int = 5,
) -> Iterator[Server]:
    """The server ``command(port)`` running on a free port of 127.0.0.1 until the block ends, as :func:`running` runs it.

    It is ready when ``http://127.0.0.1:<port><ready_path>`` answers and the port is its own. A port is free when it is
    chosen, but another process may take it before the server binds it: a server that exits saying so is started
    again on another port, up to ``attempts`` times.
    """
    for attempt in range(1, attempts + 1):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        try:
            process = _start(command(port), ready_url=url + ready_path, log=log, env=env, timeout=timeout, port=port)
        except PortTaken:
            if attempt == attempts:
                pytest.fail(f"{' '.join(command(port))}: {attempts} free ports were each taken before it bound them")
            continue
        try:
            yield Server(process, port, url)
        finally:
            _stop_group(process)
        return


@contextmanager
def running(
    command: Sequence[str],
    *,
    ready_url: str | None,
    log: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = SERVER_START_SECONDS,
) -> Iterator[subprocess.Popen]:
    """``command`` running in a session of its own (from the project root, output to ``log``) until the block ends.

    Waits until ``ready_url`` (unless None) answers an HTTP GET with a 2xx status; fails the test with the end of the
    log if the process exits first or ``timeout`` seconds pass. At the end the whole process group gets SIGTERM, then
    SIGKILL. For a server that listens on a port of its own, use :func:`serving`.
    """
    process = _start(command, ready_url=ready_url, log=log, env=env, timeout=timeout)
    try:
        yield process
    finally:
        _stop_group(process)


def _start(
    command: Sequence[str], *, ready_url: str | None, log: Path, env: Mapping[str, str] | None, timeout: float,
    port: int | None = None,
) -> subprocess.Popen:
    """``command`` started as :func:`running` starts it, once it is ready (and, given ``port``, listens on it itself:
    another process's server on that port may answer first). Raises PortTaken if it exits because ``port`` was taken."""
    with open(log, "w") as output:
        process = subprocess.Popen(
            list(command), cwd=PROJECT_ROOT, env={**os.environ, **(env or {})},
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while ready_url is not None and not (_answers(ready_url) and (port is None or _listens_on(process, port))):
            if process.poll() is not None:
                if port is not None and any(words in log.read_text().lower() for words in PORT_TAKEN):
                    raise PortTaken(port)
                pytest.fail(f"{' '.join(command)}: exited with {process.returncode}; end of its log:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{' '.join(command)}: not ready after {timeout} s; end of its log:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
    except BaseException:
        _stop_group(process)
        raise
    return process


def _listens_on(process: subprocess.Popen, port: int) -> bool:
    """Whether ``process`` or one of its descendants listens on ``port``."""
    try:
        group = psutil.Process(process.pid)
        members = [group, *group.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for member in members:
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in member.net_connections("tcp")):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return False


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
def mlflow_server(
    tmp_path: Path, mlflow_template: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, Path]]:
    """`mlflow server` on a free loopback port, its backend (a copy of the session's template store: a new one would
    be migrated first, seconds of its start-up) and artifacts in ``tmp_path``, made MLFLOW_TRACKING_URI.

    Yields its URL and its artifacts destination. The local default store (``mlflow_store``) is only there to show
    that nothing goes to it.
    """
    from tests.team_servers import MLFLOW_SERVER_ENV, mlflow_server_command

    directory = tmp_path / "server"
    directory.mkdir()
    shutil.copy(mlflow_template, directory / "mlflow.db")
    command = lambda port: mlflow_server_command(f"sqlite:///{directory / 'mlflow.db'}", directory / "artifacts", port)  # noqa: E731
    with serving(command, ready_path="/health", log=tmp_path / "mlflow-server.log", env=MLFLOW_SERVER_ENV) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        yield server.url, directory / "artifacts"


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
    from vae.launch import listening  # here: it imports torch, which processes spawned from tests/ need not

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
