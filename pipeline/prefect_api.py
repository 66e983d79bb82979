"""The Prefect API the pipeline's flows report to: the server PREFECT_API_URL names, else a private one that lives and
dies with the process that needs it; and no telemetry unless the user asks for it.

Prefect's own fallback (its "ephemeral mode") starts a uvicorn child per process when the first flow runs and stops it
at exit, which SIGKILL skips: the child is orphaned. The private server here is a child too (so that its start, about
as much work as importing torch, runs on another core while this process imports and loads data), but it serves a
socket this process bound, and it reads a pipe that only this process writes: however this process ends, even by
SIGKILL, the kernel closes the pipe and the server exits.

Nothing here imports Prefect at module level: the child must start before the heavy imports it overlaps.
"""

from __future__ import annotations

import atexit
import gc
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

# What phones home, turned off unless set: the Prefect server's heartbeat (which, offline, logs "ERROR ... Failed to
# send telemetry"), Prefect's client events (sent only when the server's analytics are on) and MLflow's usage events.
TELEMETRY_DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}

STARTUP_TIMEOUT_SECONDS = 300.0  # creating a new Prefect database takes ~5 s of CPU, much longer on a loaded machine
STOP_TIMEOUT_SECONDS = 10.0  # the server's graceful shutdown, before it is killed
GRACEFUL_SHUTDOWN_SECONDS = 3.0  # the server's wait for open connections (an events websocket) before closing them


def disable_telemetry() -> None:
    """Turn off Prefect's and MLflow's telemetry (:data:`TELEMETRY_DEFAULTS`) where the environment does not say.

    Call it before Prefect is imported: Prefect reads its settings once, at import (a private server, started later,
    reads them from the environment).
    """
    for name, value in TELEMETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)


def is_flow_run_process() -> bool:
    """Whether this process is one Prefect started to run one flow run: each run of a served deployment (`flows.py
    serve`, or a Prefect worker) is a `python -m prefect.engine` process, which imports the flow's file from the
    deployment's entrypoint."""
    main = sys.modules.get("__main__")
    return getattr(getattr(main, "__spec__", None), "name", None) == "prefect.engine"


class PrivateServer:
    """A Prefect API server for this process alone, in a child process that exits when this process does.

    :meth:`start` binds a free port of 127.0.0.1 and hands the listening socket to the child (no other process can
    take the port in between); :meth:`make_current` makes ``http://127.0.0.1:<port>/api`` this process's
    PREFECT_API_URL, which its own children (Dask workers) inherit. Its database is Prefect's usual one (``$PREFECT_HOME/prefect.db``), so flow
    runs stay there for a later ``prefect server start`` to show. The server runs Prefect's ephemeral set of services
    and no UI, as Prefect's ephemeral mode does.
    """

    def __init__(self, process: subprocess.Popen, url: str, parent_alive: int):
        self.process, self.url, self._parent_alive = process, url, parent_alive

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @classmethod
    def start(cls) -> PrivateServer:
        """Start the server (it becomes ready in the background: see :meth:`wait_until_ready`); stopped at exit."""
        listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        child_end, parent_alive = os.pipe()  # the child reads, we never write: it sees end of file when we are gone
        environment = dict(os.environ)
        if "prefect.settings" in sys.modules:  # settings made in code (temporary_settings) reach the child too
            from prefect.settings import get_current_settings

            environment.update(get_current_settings().to_environment_variables(exclude_unset=True))
        environment.pop("PREFECT_API_URL", None)
        environment["PREFECT_UI_ENABLED"] = "false"
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(listener.fileno())],
                stdin=child_end,
                pass_fds=(listener.fileno(),),
                env=environment,
                start_new_session=True,  # Ctrl-C in a terminal is this process's to handle; the server ends after it
            )
        except BaseException:
            os.close(parent_alive)
            raise
        finally:
            os.close(child_end)
            listener.close()  # the child's copy listens; if it dies, connections are refused rather than left waiting
        server = cls(process, url, parent_alive)
        # After Prefect's own exit hooks (which run first) have sent the last logs and events to it.
        atexit.register(server.stop)
        return server

    def make_current(self) -> None:
        """Make this server the PREFECT_API_URL of this process and of the processes it starts (Dask workers)."""
        from prefect.context import refresh_global_settings_context

        os.environ["PREFECT_API_URL"] = self.api_url
        os.environ.setdefault("PREFECT_UI_URL", "")  # it serves no UI: Prefect would print "View at" links to nothing
        refresh_global_settings_context()

    def wait_until_ready(self, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
        """Return once the server answers its health check; a RuntimeError if it exits or ``timeout`` seconds pass."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 is never behind a proxy
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the private Prefect server exited with code {self.process.returncode} before it was ready "
                    "(its errors are above); set PREFECT_API_URL to use a running Prefect server instead"
                )
            try:
                with opener.open(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the private Prefect server did not answer within {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Let the server shut down gracefully (its database up to date), killing it after ``timeout`` seconds."""
        if self._parent_alive is not None:
            os.close(self._parent_alive)  # end of file: the child's signal to shut down
            self._parent_alive = None
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_private_server() -> PrivateServer | None:
    """A :class:`PrivateServer`, started and made this process's PREFECT_API_URL, unless Prefect's settings name a
    server (PREFECT_API_URL in the environment, a profile or prefect.toml)."""

    def named() -> bool:
        from prefect.settings import PREFECT_API_URL

        return bool(PREFECT_API_URL.value())

    if os.environ.get("PREFECT_API_URL") or ("prefect.settings" in sys.modules and named()):
        return None
    server = PrivateServer.start()  # before importing Prefect (a second of CPU), which the server's start overlaps
    if named():  # a profile or prefect.toml names a server after all
        server.stop()
        return None
    server.make_current()
    return server


# --- the child --------------------------------------------------------------------------------------------------------


def _serve(listener_fd: int) -> None:
    """Serve Prefect's API on the inherited listening socket until stdin ends (our parent is gone) or SIGTERM."""
    server = None
    gone = threading.Event()

    def watch_parent() -> None:
        sys.stdin.buffer.read()  # returns at end of file only: the parent never writes
        gone.set()
        if server is None:  # still importing or starting: nothing to shut down gracefully
            os._exit(0)
        server.should_exit = True
        time.sleep(STOP_TIMEOUT_SECONDS)  # a shutdown that hangs must not leave the process behind
        os._exit(1)

    # Before the slow imports, so that a parent killed during them takes this process with it.
    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    # Modules and the app live until exit: the collector need not walk them while they are made, nor in the
    # interpreter's teardown, which otherwise holds up the parent's exit by about a second (see pipeline.cli.run).
    gc.disable()
    import uvicorn
    from prefect.server.api.server import create_app

    app = create_app(ephemeral=True, final=True)
    config = uvicorn.Config(app, log_level="error", lifespan="on", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    server = uvicorn.Server(config)
    gc.freeze()
    gc.enable()
    if gone.is_set():
        return
    server.run(sockets=[socket.socket(fileno=listener_fd)])
    gc.freeze()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
