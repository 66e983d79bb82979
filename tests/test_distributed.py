"""Specification of multi-process training: the processes of `train --processes N` (or torchrun's) train together,
rank 0 alone tracks and registers, and the group listens on loopback only."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pipeline import data, training
from pipeline.config import load_config
from tests.conftest import PROJECT_ROOT, descendants, float32_error_bound, is_loopback, listening_sockets, needs_data, one_thread
from vae.checkpoint import load_checkpoint

pytestmark = [needs_data, pytest.mark.usefixtures("mlflow_store")]

# Threshold binarization, as issue 4 asks (tests/vae/test_engine.py shows the same under dynamic binarization and a
# Monte Carlo KL). 512 images in batches of 128: 4 steps, each split into two shards of 64. No FID: rank 0 alone
# measures it, after training, as in one process (tests/test_flows.py).
TINY = {
    "data.train_subset": 512, "data.validation_size": 256, "data.binarization": "threshold",
    "train.epochs": 1, "train.device": "cpu", "eval.iwae_samples": 2, "eval.fid": False,
}


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """A Prefect home for the module's runs: the first one creates its database, the next start their server faster."""
    return tmp_path_factory.mktemp("prefect-home")


# How many of the model's 652,824 parameters may move by more than 1e-5 through magnified rounding: a thousandth.
ROUNDING_MAGNIFIED_WEIGHTS = 652


@dataclass
class Finished:
    """A finished multi-process training command: its exit code and output, and every (address, port) that any of its
    processes was seen listening on while it ran."""

    returncode: int
    stdout: str
    stderr: str
    listening: set[tuple[str, int]]


def train_in_processes(
    launcher: str, processes: int, overrides: dict, prefect_home: Path, *options: str, timeout: float = 1000
) -> Finished:
    """``torchrun --nproc-per-node N --standalone flows.py train ...`` or ``flows.py train --processes N ...`` as a
    user runs it, the sockets of its processes looked at twice a second."""
    settings = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    train = ["flows.py", "train", "--preset", "default", *settings, *options]
    if launcher == "torchrun":
        command = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(processes), "--standalone", *train]
    else:
        command = [sys.executable, *train, "--processes", str(processes)]
    env = os.environ | {"PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env["OMP_NUM_THREADS"] = "1"  # two processes on a shared machine: one thread each
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=err, text=True, start_new_session=True
        )
        seen: set[tuple[str, int]] = set()
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            seen |= listening_sockets(descendants(process.pid))
            time.sleep(0.5)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher and every process it started
        process.wait()
        out.seek(0)
        err.seek(0)
        return Finished(process.returncode, out.read(), err.read(), seen)


def all_runs(client: MlflowClient) -> list:
    return client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])


@pytest.mark.parametrize("launcher", ["processes", "torchrun"])
def test_two_processes_make_one_mlflow_run_whose_model_is_the_one_process_model(launcher, prefect_home, tmp_path):
    finished = train_in_processes(launcher, 2, TINY, prefect_home)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    # What listened while it ran (the group's store, Gloo's sockets, the private Prefect server) was seen.
    assert len(finished.listening) >= 3, finished.listening
    if launcher == "processes":  # loopback only, nothing to warn about
        assert [address for address, _ in finished.listening if not is_loopback(address)] == []
        assert "every network interface" not in finished.stderr
    else:  # torchrun's store listens on every interface whatever its options: said once, by rank 0
        exposed = {port for address, port in finished.listening if address in ("::", "0.0.0.0")}
        warned = re.findall(r"store listens on port (\d+) of every network interface", finished.stderr)
        assert len(warned) == 1 and int(warned[0]) in exposed, (warned, exposed)
    assert "default on mnist: 1 epochs" in finished.stdout  # rank 0's summary, printed once

    client = MlflowClient()
    (run,) = all_runs(client)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]
    (version,) = client.search_model_versions("name = 'vae-mnist-threshold'")
    assert version.run_id == run.info.run_id

    config = load_config("default", TINY)
    prepared = data.prepare_configured(config.data, data.fetch(config.data.dataset, config.data.cache_dir))
    with one_thread():  # as each process of the group
        alone, state = training.train(config, prepared, progress=False)
    checkpoint = load_checkpoint(client.download_artifacts(run.info.run_id, "checkpoint/checkpoint.pt", str(tmp_path)))
    # The processes add the same float32 numbers in another order (tests/vae/test_engine.py shows each step's gradient
    # is the whole batch's, to float32 rounding). Adam divides each gradient by its RMS, which magnifies that rounding in
    # the few weights whose gradient is near zero, so no tolerance holds for every weight: over 20 seeds of
    # bench/distributed_rounding.py --setting torchrun at most 1 parameter moved by more than 1e-5 (the largest by
    # 1.2e-5; issue 8 saw 12 of them, up to 2.4e-5, against a reference on two threads). A wrong shard or noise draw
    # moves nearly every weight by about the learning rate, 1e-3, at each step.
    drift = torch.cat([(checkpoint["model"][name] - value).abs().flatten() for name, value in alone.state_dict().items()])
    assert int((drift > 1e-5).sum()) <= ROUNDING_MAGNIFIED_WEIGHTS, f"{int((drift > 1e-5).sum())} weights moved"
    # Metrics of whole batches, as one process logs them: float32 sums over the images in another order.
    logged = {name: run.data.metrics[name] for name in state.history[0]}
    assert logged == pytest.approx(state.history[0], rel=2 * float32_error_bound(TINY["data.train_subset"]), abs=0)

def test_a_nan_loss_ends_the_one_mlflow_run_failed_with_the_error_and_registers_nothing(prefect_home):
    finished = train_in_processes("processes", 2, TINY | {"train.optimizer": "rmsprop", "train.learning_rate": 1e12}, prefect_home)
    assert finished.returncode == 1, finished.stdout[-3000:] + finished.stderr[-3000:]  # rank 0's exit code
    (run,) = all_runs(MlflowClient())
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("NonFiniteLossError: non-finite loss")
    assert MlflowClient().search_registered_models() == []


def test_resuming_with_several_processes_is_refused_before_any_work(prefect_home):
    finished = train_in_processes("torchrun", 2, TINY, prefect_home, "--resume", "0123456789abcdef")
    assert finished.returncode == 1  # torchrun's, when its processes fail
    # Each process refuses on its own; the first to exit makes torchrun stop the other, which may not have said so yet
    # on a loaded machine: one or two refusals, and nothing else done (no run, below).
    assert finished.stderr.count("error: --resume continues a run in one process: launch it without torchrun") in (1, 2)
    finished = train_in_processes("processes", 2, TINY, prefect_home, "--resume", "0123456789abcdef")
    assert finished.returncode == 2
    assert finished.stderr == "error: --resume continues a run in one process: leave out --processes\n"
    assert all_runs(MlflowClient()) == []
