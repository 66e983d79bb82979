"""Specification of the command line as real processes, as a user runs them: a killed training run leaves no process
behind, an offline run logs nothing about telemetry, a tampered data file fails at once with one error block, and the
commands that need no Prefect never import it."""

import gzip
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

import flows
from pipeline import data, tracking
from pipeline.config import load_config
from tests.conftest import PROJECT_ROOT, TINY_CLASSIFIER, descendants, free_port, needs_data, running

pytestmark = [needs_data, pytest.mark.usefixtures("mlflow_store")]

TINY = [
    "--set", "data.train_subset=600", "--set", "data.validation_size=300", "--set", "model.hidden_dims=[64]",
    "--set", "eval.iwae_samples=4", "--set", "eval.fid=false", "--device", "cpu",
]
RUN_SECONDS = 600  # a whole tiny run takes about a minute on two busy cores, imports included
EXIT_SECONDS = 60  # for the processes of a killed run to exit: the private server gives up its graceful shutdown after 10 s
PREFECT_LINE = re.compile(r"\d\d:\d\d:\d\d\.\d{3} \| INFO    \| (Flow|Task) run '[^']+' - ")


def pipeline_env(tmp_path: Path, **changes: str) -> dict[str, str]:
    """The environment of a pipeline process: this one's (the test's MLflow store and data mirror), a Prefect home of
    its own, no Prefect server named, and no telemetry setting (the pipeline's defaults apply). Offline: every
    connection beyond 127.0.0.1 goes to a proxy where nothing listens, so that CI's internet access changes nothing."""
    unset = {"PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"}
    env = {key: value for key, value in os.environ.items() if key not in unset}
    nowhere = f"http://127.0.0.1:{free_port()}"
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"), http_proxy=nowhere, https_proxy=nowhere, no_proxy="127.0.0.1,localhost"
    )
    return {**env, **changes}


def run_cli(arguments: list[str], env: dict[str, str], *, python_options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *python_options, "flows.py", *arguments], cwd=PROJECT_ROOT, env=env,
        capture_output=True, text=True, timeout=RUN_SECONDS,
    )


def processes_with(marker: str) -> set[int]:
    """The live processes whose environment holds ``marker`` ("NAME=value"): every process a pipeline run starts
    inherits it, and keeps it when it is orphaned."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environment = (entry / "environ").read_bytes().split(b"\0")  # empty for a zombie
            except OSError:  # exited in between
                continue
            if marker.encode() in environment:
                found.add(int(entry.name))
    return found


def eventually(condition, seconds: float) -> bool:
    """Whether ``condition()`` becomes true within ``seconds``, checked every tenth of a second."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.parametrize("moment", ["while its Prefect server starts", "mid-training"])
def test_a_training_run_killed_with_sigkill_leaves_no_process_behind(moment, tmp_path):
    marker = f"VAE_PIPELINE_TEST_RUN={uuid.uuid4()}"
    name, value = marker.split("=")
    env = pipeline_env(tmp_path, **{name: value})
    log = tmp_path / "train.log"
    # Many epochs without early stopping: the run is still training when it is killed.
    command = [sys.executable, "flows.py", "train", *TINY, "--epochs", "1000", "--set", "train.early_stopping_patience=null"]
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        if moment == "mid-training":
            started = lambda: "epoch 1/1000" in log.read_text()  # noqa: E731
        else:
            started = lambda: processes_with(marker) - {process.pid}  # noqa: E731
        assert eventually(lambda: started() or process.poll() is not None, RUN_SECONDS), log.read_text()[-3000:]
        assert process.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
        children = processes_with(marker) - {process.pid}
        assert children, "the run started no process besides itself, so this test would prove nothing"

        process.send_signal(signal.SIGKILL)
        process.wait()

        assert eventually(lambda: not processes_with(marker), EXIT_SECONDS), (
            f"processes of the killed run still alive after {EXIT_SECONDS} s: {sorted(processes_with(marker))} "
            f"(it had started {sorted(children)})"
        )
    finally:
        process.kill()
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_the_ui_starts_mlflows_server_without_its_job_runner(mlflow_store, tmp_path):
    """MLflow's server-side jobs (GenAI scoring, trace archival) serve nothing the pipeline logs; their runner and its
    six worker processes (about 240 MB each) would start with every UI, launched as the server starts."""
    port = free_port()
    command = [sys.executable, "flows.py", "ui", "--port", str(port)]
    with running(command, ready_url=f"http://127.0.0.1:{port}/health", log=tmp_path / "ui.log", env=pipeline_env(tmp_path)) as ui:
        command_lines = [" ".join(psutil.Process(pid).cmdline()) for pid in descendants(ui.pid)]
    assert any("-m uvicorn" in line for line in command_lines), command_lines  # the server that answered
    assert [line for line in command_lines if "mlflow.server.jobs" in line or "huey" in line] == []


def test_an_offline_training_run_logs_nothing_about_telemetry(tmp_path):
    finished = run_cli(["train", *TINY, "--epochs", "1"], pipeline_env(tmp_path))
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-3000:]
    assert "default on mnist: 1 epochs" in finished.stdout
    assert [line for line in output.splitlines() if "telemetry" in line.lower()] == []


def test_a_tampered_data_file_fails_the_run_at_once_with_one_error_block(tmp_path):
    """The mirror serves a labels file whose content was changed (a valid gzip of the wrong bytes): not retried, one
    error, said once."""
    mirror = tmp_path / "mirror" / "mnist"
    mirror.mkdir(parents=True)
    published = Path(os.environ["VAE_DATA_MIRROR"].split()[0]) / "mnist"
    for name in data.FILE_NAMES:
        (mirror / f"{name}.gz").symlink_to(published / f"{name}.gz")
    labels = "train-labels-idx1-ubyte"
    tampered = bytearray(gzip.decompress((published / f"{labels}.gz").read_bytes()))
    tampered[8] = (tampered[8] + 1) % 10  # the first label
    (mirror / f"{labels}.gz").unlink()
    (mirror / f"{labels}.gz").write_bytes(gzip.compress(bytes(tampered)))
    cache = tmp_path / "cache"
    env = pipeline_env(tmp_path, VAE_DATA_MIRROR=str(tmp_path / "mirror"), VAE_DATA_DIR=str(cache))

    finished = run_cli(["train", *TINY, "--epochs", "1"], env)

    assert finished.returncode == 1
    lines = finished.stderr.splitlines()
    (first,) = [number for number, line in enumerate(lines) if line.startswith("error: ")]
    prefect_lines, block = lines[:first], lines[first:]
    # Prefect's log lines only (the resume command printed at the start continues its line, indented).
    assert [line for line in prefect_lines if not PREFECT_LINE.match(line) and not line.startswith("  ")] == []
    expected_sha256 = data.DATASETS["mnist"].sha256[labels]
    actual_sha256 = hashlib.sha256(tampered).hexdigest()
    source = f"{mirror}/{labels}.gz"
    assert block[:3] == [
        f"error: the training flow failed: could not fetch {labels} into {cache / 'mnist'} from any of 4 sources:",
        f"  {source}: {labels} from {source}: decompressed sha256 is {actual_sha256}, expected {expected_sha256}",
        f"  {mirror}/{labels}: FileNotFoundError: [Errno 2] No such file or directory: '{mirror}/{labels}'",
    ]
    hosts = [f"  {host}{labels}.gz: " for host in data.DATASETS["mnist"].hosts]
    assert [line[: len(host)] for line, host in zip(block[3:5], hosts)] == hosts
    assert all(line.endswith("(3 attempts)") for line in block[3:5])  # the network, which may heal, is retried
    assert block[5:] == ["Set VAE_DATA_MIRROR to a directory or URL holding <dataset>/<file>.gz, or check the network."]
    assert finished.stderr.count("decompressed sha256 is") == 1  # said once, and the fetch was not retried

    (run,) = MlflowClient().search_runs([tracking.experiment("mnist")])
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith(f"DownloadError: could not fetch {labels}")


@pytest.mark.usefixtures("prefect_server")
def test_evaluate_generate_promote_and_leaderboard_never_import_prefect(tmp_path):
    small = {
        "data.train_subset": 300, "data.validation_size": 200, "model.hidden_dims": [32], "train.epochs": 1,
        "train.device": "cpu", "eval.iwae_samples": 2, **TINY_CLASSIFIER,  # evaluate scores FID too, with a quick classifier
    }
    flows.train_flow(load_config("default", small))
    env = pipeline_env(tmp_path)
    commands = [
        ["evaluate", "vae-mnist", "--device", "cpu"],
        ["generate", "vae-mnist", "-n", "4", "-o", str(tmp_path / "samples.png")],
        ["promote", "vae-mnist", "1", "--reason", "checked by hand"],
        ["leaderboard", "vae-mnist"],
    ]
    with ThreadPoolExecutor(len(commands)) as pool:  # at once: each spends most of its time importing, on one core
        finished_commands = list(pool.map(lambda command: run_cli(command, env, python_options=("-X", "importtime")), commands))
    for command, finished in zip(commands, finished_commands):
        assert finished.returncode == 0, finished.stderr[-3000:]
        imported = {line.split("|")[2].strip() for line in finished.stderr.splitlines() if line.startswith("import time:")}
        assert "torch" in imported  # the import log is complete: it holds what the command does use
        assert sorted(module for module in imported if module.split(".")[0] in ("prefect", "uvicorn")) == [], command[0]
