"""Specification of the Prefect API the pipeline's flows report to: the private server lives and dies with its process,
keeps its flow runs in Prefect's database, and is not started when PREFECT_API_URL names a server; telemetry is off
unless the environment says otherwise."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import prefect_api
from tests.conftest import PROJECT_ROOT

EXIT_SECONDS = 60  # for a killed process's server to exit: it gives up its graceful shutdown after 10 s

# Starts a private server, prints the server's pid, then: "starting" sleeps at once; "serving" waits until the server
# answers, runs a flow with one task and sleeps; "exit" does the same and exits.
SERVER_SCRIPT = """
import sys, time
from pipeline import prefect_api
server = prefect_api.start_private_server()
print(server.process.pid, flush=True)
if sys.argv[1] != "starting":
    server.wait_until_ready()
    from prefect import flow, task

    @task(name="add one")
    def add_one(x):
        return x + 1

    @flow(name="tiny")
    def tiny():
        return add_one(1)

    assert tiny() == 2
    print("ran", flush=True)
if sys.argv[1] != "exit":
    time.sleep(600)
"""

# Reads back, through a private server of its own, the flow runs and task runs in the Prefect home it is given.
READ_BACK_SCRIPT = """
import json
from pipeline import prefect_api
prefect_api.start_private_server().wait_until_ready()
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    flow_runs = {run.name: run.state.type.value for run in client.read_flow_runs()}
    task_runs = {run.name: run.state.type.value for run in client.read_task_runs()}
print(json.dumps({"flow_runs": list(flow_runs.values()), "task_runs": task_runs}))
"""


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (exited, waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_until_gone(pid: int, seconds: float = EXIT_SECONDS) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def script_env(tmp_path: Path) -> dict[str, str]:
    """This process's environment with a Prefect home of the test's own and no Prefect server named."""
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    return env


def start_script(script: str, mode: str, tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """The script running with ``mode``, and the pid of the private server it started."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, mode], cwd=PROJECT_ROOT, env=script_env(tmp_path),
        stdout=subprocess.PIPE, text=True,
    )
    return process, int(process.stdout.readline())


def test_disable_telemetry_turns_off_prefect_and_mlflow_telemetry_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")  # the user's choice

    prefect_api.disable_telemetry()

    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"


def test_no_private_server_starts_when_prefect_api_url_names_a_server(prefect_server):
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    assert prefect_api.start_private_server() is None
    assert PREFECT_API_URL.value() == configured


@pytest.mark.parametrize("mode", ["starting", "serving"])
def test_a_process_killed_with_sigkill_takes_its_private_server_with_it(mode, tmp_path):
    process, server_pid = start_script(SERVER_SCRIPT, mode, tmp_path)
    try:
        if mode == "serving":
            assert process.stdout.readline() == "ran\n"
        assert alive(server_pid)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert wait_until_gone(server_pid), f"the private server (pid {server_pid}) outlived its killed process"
    finally:
        process.kill()
        if alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)


def test_the_private_server_has_stopped_when_its_process_has_exited_and_its_database_keeps_the_runs(tmp_path):
    process, server_pid = start_script(SERVER_SCRIPT, "exit", tmp_path)
    assert process.stdout.read() == "ran\n"
    assert process.wait(timeout=120) == 0
    assert not alive(server_pid)  # stopped, and waited for, before its process exited

    read_back = subprocess.run(
        [sys.executable, "-c", READ_BACK_SCRIPT], cwd=PROJECT_ROOT, env=script_env(tmp_path),
        capture_output=True, text=True, timeout=300,
    )
    assert read_back.returncode == 0, read_back.stderr[-3000:]
    runs = json.loads(read_back.stdout)
    assert runs["flow_runs"] == ["COMPLETED"]
    assert list(runs["task_runs"].values()) == ["COMPLETED"] and list(runs["task_runs"])[0].startswith("add one-")
