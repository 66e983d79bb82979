"""Specification of a team's setup under load and faults: PostgreSQL behind `mlflow server` and `prefect server`, many
flows at once, concurrent promotions, and a tracking server that dies mid-run; all read back through the servers."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from bench import team_load
from pipeline import registry
from pipeline.config import load_config
from tests.conftest import PROJECT_ROOT, free_port, needs_data, required, running
from tests.team_servers import (
    MLFLOW_SERVER_ENV, MLFLOW_TEMPLATE, PREFECT_TEMPLATE, PostgreSQLMissing, create_migrated_templates, mlflow_server,
    mlflow_server_command, postgresql_bindir, postgresql_cluster, prefect_server, register_when_all_are_ready,
)
from vae.config import ModelConfig
from vae.models import build_model

REGISTRATIONS = 8  # concurrent writers of one registered model


# --- the servers ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgresql(tmp_path_factory):
    """One PostgreSQL cluster for the session, with MLflow's and Prefect's migrated template databases; tests take a
    database each. Without PostgreSQL installed the tests that need it skip saying how to install it, except in CI,
    which installs it (`make test`) and so must run them."""
    try:
        postgresql_bindir()
    except PostgreSQLMissing as missing:
        if required("VAE_REQUIRE_POSTGRESQL"):
            pytest.fail(f"CI (or VAE_REQUIRE_POSTGRESQL) requires the PostgreSQL tests: {missing}")
        pytest.skip(str(missing))
    with postgresql_cluster() as cluster:
        create_migrated_templates(cluster, tmp_path_factory.mktemp("templates"))
        yield cluster


def database_name(purpose: str) -> str:
    return f"{purpose}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def postgresql_tracking_server(postgresql, tmp_path) -> Iterator[str]:
    """`mlflow server` on a new PostgreSQL database (a copy of the migrated template), artifacts in ``tmp_path``; its
    URL."""
    with mlflow_server(postgresql.url(postgresql.create_database(database_name("mlflow"), MLFLOW_TEMPLATE)), tmp_path / "mlflow") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path, monkeypatch) -> Iterator[str]:
    """A tracking store two ways a team has one: a SQLite file, and `mlflow server` on PostgreSQL; made the tracking
    URI of this process. Its URI."""
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    else:
        uri = request.getfixturevalue("postgresql_tracking_server")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def logged_model(tmp_path: Path) -> tuple[str, str]:
    """A tiny model logged in a run of the current store: its model URI and run id."""
    client = MlflowClient()
    experiment = client.create_experiment(f"registry-{uuid.uuid4().hex[:6]}", artifact_location=None if mlflow.get_tracking_uri().startswith("http") else (tmp_path / "artifacts").as_uri())
    config = ModelConfig(hidden_dims=(8,), latent_dim=2)
    with mlflow.start_run(experiment_id=experiment) as run:
        uri = registry.log_model(build_model(config, seed=0), config, torch.zeros(2, 1, 28, 28))
    return uri, run.info.run_id


# --- concurrent registration and promotion ------------------------------------------------------------------------------


def test_concurrent_registrations_from_separate_processes_get_distinct_consecutive_versions(store, tmp_path):
    model_uri, _ = logged_model(tmp_path)
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(REGISTRATIONS)
    writers = [spawn.Process(target=register_when_all_are_ready, args=(store, model_uri, writer, barrier)) for writer in range(REGISTRATIONS)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=600)

    assert [process.exitcode for process in writers] == [0] * REGISTRATIONS
    versions = registry.versions_of(MlflowClient(), "concurrent")
    assert sorted(int(version.version) for version in versions) == list(range(1, REGISTRATIONS + 1))
    assert sorted(int(version.tags["writer"]) for version in versions) == list(range(REGISTRATIONS))


class PausingClient(MlflowClient):
    """A real client of the store that stops before its first alias write until released: it makes its writer the one
    that decided first and writes last, the interleaving in which the last writer's stale decision used to win."""

    def __init__(self) -> None:
        super().__init__()
        self.about_to_write, self.release = threading.Event(), threading.Event()

    def set_registered_model_alias(self, name, alias, version):
        if not self.about_to_write.is_set():
            self.about_to_write.set()
            assert self.release.wait(timeout=300), "never released"
        return super().set_registered_model_alias(name, alias, version)


@pytest.mark.parametrize(
    ("first_nll", "second_nll", "aliases", "second_alias"),
    [(90.0, 88.0, {"champion": "2"}, "champion"), (88.0, 90.0, {"champion": "1", "challenger": "2"}, "challenger")],
    ids=["worse-first", "better-first"],
)
def test_the_champion_is_the_best_version_when_a_flow_that_decided_before_another_registered_writes_last(
    store, tmp_path, first_nll, second_nll, aliases, second_alias
):
    model_uri, run_id = logged_model(tmp_path)
    config = load_config("default", {"eval.iwae_samples": 0})
    first, second = {"test_nll_nats": first_nll}, {"test_nll_nats": second_nll}
    pausing = PausingClient()
    decisions = {}

    def first_flow():
        version = registry.register_version(model_uri, config, first, run_id)
        decisions["first"] = registry.assign_alias(config, first, version, client=pausing)

    deciding = threading.Thread(target=first_flow)
    deciding.start()
    # The first flow has registered v1 and decided on what it saw (no champion, or v1 alone); it waits to write.
    assert pausing.about_to_write.wait(timeout=300)
    second_version = registry.register_version(model_uri, config, second, run_id)
    decisions["second"] = registry.assign_alias(config, second, second_version, client=MlflowClient())
    pausing.release.set()  # now the first flow writes what it decided on fewer versions, last
    deciding.join(timeout=300)

    client = MlflowClient()
    assert {alias: str(number) for alias, number in client.get_registered_model("vae-mnist").aliases.items()} == aliases
    assert (decisions["first"].version, decisions["first"].alias) == ("1", "champion")
    assert (decisions["second"].version, decisions["second"].alias, decisions["second"].champion_version) == ("2", second_alias, "1")
    first_tags, second_tags = (client.get_model_version("vae-mnist", version).tags for version in ("1", "2"))
    assert (first_tags["promotion.decision"], second_tags["promotion.decision"]) == ("champion", second_alias)
    assert first_tags.get("demoted_by") == ("2" if second_alias == "champion" else None)


# --- 8 concurrent training flows --------------------------------------------------------------------------------------


@needs_data
def test_eight_concurrent_training_flows_on_postgresql_lose_nothing_and_leave_the_best_version_champion(postgresql, tmp_path):
    flows, epochs = 8, team_load.SMALL_FLOW["train.epochs"]
    # A new team's setup: both servers start on new databases, which they migrate first (other tests copy templates).
    tracking_db, prefect_db = postgresql.create_database(database_name("mlflow")), postgresql.create_database(database_name("prefect"))
    with mlflow_server(postgresql.url(tracking_db), tmp_path / "mlflow") as tracking_uri, \
            prefect_server(postgresql.url(prefect_db, "postgresql+asyncpg"), tmp_path / "prefect") as api_url:
        codes, seconds = team_load.run_flows(flows, tracking_uri, api_url, tmp_path, timeout=900)
        logs = "".join((tmp_path / f"flow-{index}.log").read_text()[-1500:] for index, code in enumerate(codes) if code)
        report = team_load.audit(tracking_uri, api_url, flows=flows, epochs=epochs, wall_seconds=seconds, exit_codes=codes)

    assert report.lost == [], f"{report.summary()}\n{logs}"
    per_run_metrics = len(team_load.EPOCH_METRICS) * epochs + len(team_load.TEST_METRICS)
    per_run_images = epochs + 5  # a sample grid per epoch; the GIF, reconstructions, latent space, manifold, loss curves
    assert (report.prefect_flow_runs_completed, report.runs, report.runs_finished, report.versions) == (8, 8, 8, 8)
    assert (report.metric_values, report.images) == (8 * per_run_metrics, 8 * per_run_images)
    assert report.champion == report.best_version


# --- the tracking server dies in the middle of a run ------------------------------------------------------------------

# Three epochs of 75 steps of a small network: the flow is stopped (SIGSTOP) right after an epoch's line, the server
# killed, and the flow let go, so that the server is gone while the next epoch trains whatever the epochs' length.
LONG_EPOCHS = team_load.SMALL_FLOW | {"data.train_subset": 1_500, "train.batch_size": 20, "train.epochs": 3}
FLOW_TIMEOUT_SECONDS = 900


@pytest.fixture
def restartable(postgresql, tmp_path):
    """The command of an `mlflow server` on a new PostgreSQL database (a copy of the migrated template) and a fixed
    free port, to start, kill and start again on the same port and database; its URL."""
    port = free_port()
    database = postgresql.create_database(database_name("mlflow"), MLFLOW_TEMPLATE)
    command = mlflow_server_command(postgresql.url(database), tmp_path / "artifacts", port)
    return command, f"http://127.0.0.1:{port}"


def server_running(command, url, log: Path):
    return running(command, ready_url=f"{url}/health", log=log, env=MLFLOW_SERVER_ENV)


@pytest.fixture(scope="module")
def team_prefect_server(postgresql, tmp_path_factory) -> Iterator[str]:
    """`prefect server start` on a PostgreSQL database, for the flows of this module's tests; its API URL."""
    database = postgresql.url(postgresql.create_database(database_name("prefect"), PREFECT_TEMPLATE), "postgresql+asyncpg")
    with prefect_server(database, tmp_path_factory.mktemp("prefect")) as api_url:
        yield api_url


@pytest.fixture
def flow(team_prefect_server):
    """Starts :class:`Flow` processes (``flow(arguments, tracking_uri, log, **env)``) reporting to the team's Prefect
    server; any still running at the end of the test (it failed) are killed."""
    started = []

    def start(*args, **kwargs) -> Flow:
        started.append(Flow(*args, prefect_api_url=team_prefect_server, **kwargs))
        return started[-1]

    yield start
    for running_flow in started:
        if running_flow.process.poll() is None:
            running_flow.process.kill()
            running_flow.process.wait()


class Flow:
    """`flows.py train ...` in a process of its own; its output is copied line by line to ``log`` as it comes, so the
    test reacts to a line at once."""

    def __init__(self, arguments, tracking_uri: str, log: Path, *, prefect_api_url: str, **env: str):
        self.log, self.lines, self.seen = log, [], threading.Condition()
        environment = team_load.flow_environment(tracking_uri, prefect_api_url, log.parent / f"{log.stem}-home")
        self.process = subprocess.Popen(
            [sys.executable, "flows.py", "train", *arguments], cwd=PROJECT_ROOT, env={**environment, **env},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.reader = threading.Thread(target=self._copy, daemon=True)
        self.reader.start()

    def _copy(self) -> None:
        with open(self.log, "w") as output:
            for line in self.process.stdout:
                output.write(line)
                output.flush()
                with self.seen:
                    self.lines.append(line)
                    self.seen.notify_all()
        with self.seen:
            self.lines.append(None)  # the end of its output
            self.seen.notify_all()

    @property
    def output(self) -> str:
        return "".join(line for line in self.lines if line is not None)

    def pause_after(self, text: str) -> None:
        """Wait for a line holding ``text``, then stop the process (SIGSTOP) right there: what it does next, it does
        only after :meth:`resume`, whatever happened to the servers in between."""
        with self.seen:
            arrived = self.seen.wait_for(lambda: None in self.lines or any(text in line for line in self.lines if line), FLOW_TIMEOUT_SECONDS)
            assert arrived and None not in self.lines, f"no {text!r} before the flow ended or {FLOW_TIMEOUT_SECONDS} s:\n{self.output[-3000:]}"
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def finished(self) -> int:
        """Its exit code, once it has exited and its output has been read."""
        try:
            code = self.process.wait(timeout=FLOW_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"the flow still ran after {FLOW_TIMEOUT_SECONDS} s:\n{self.output[-3000:]}")
        self.reader.join(timeout=60)
        return code


def settings(overrides) -> list[str]:
    return team_load.flow_command(overrides, seed=overrides.get("train.seed", 0))[3:]


def epoch_values(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every per-epoch metric of a run as (step, value) pairs in step order."""
    return {
        name: sorted((metric.step, metric.value) for metric in client.get_metric_history(run_id, name))
        for name in team_load.EPOCH_METRICS if name != "epoch_seconds"
    }


@needs_data
def test_a_run_whose_tracking_server_dies_twice_and_restarts_on_the_same_port_and_database_continues_and_finishes_complete(
    restartable, flow, tmp_path
):
    command, url = restartable
    training = None
    # Stopped (SIGTERM) while epoch 2 trains, killed (SIGKILL) while epoch 3 trains: the whole server each time, its
    # uvicorn process and anything it started; each time started again on its port and database.
    for death, (after_line, how) in enumerate([("epoch 1/3", signal.SIGTERM), ("epoch 2/3", signal.SIGKILL)], start=1):
        with server_running(command, url, tmp_path / f"server-{death}.log") as server:
            training = training or flow(settings(LONG_EPOCHS), url, tmp_path / "flow.log")
            training.pause_after(after_line)  # that epoch is logged; the next one is training
            os.killpg(server.pid, how)
            server.wait(timeout=120)
        training.resume()
        time.sleep(2)  # the flow's next request finds nothing listening, and its client starts retrying
    with server_running(command, url, tmp_path / "server-3.log"):
        assert training.finished() == 0, training.output[-3000:]
        client = MlflowClient(url)
        (run,) = client.search_runs([client.get_experiment_by_name("vae-mnist").experiment_id])
        assert run.info.status == "FINISHED"
        assert {name: [step for step, _ in values] for name, values in epoch_values(client, run.info.run_id).items()} == {
            name: [1, 2, 3] for name in team_load.EPOCH_METRICS if name != "epoch_seconds"
        }
        files = team_load.artifact_paths(client, run.info.run_id)
        assert team_load.sample_grid_epochs(files) == [1, 2, 3]
        assert set(team_load.RUN_FILES) <= set(files)
        (version,) = registry.versions_of(client, "vae-mnist")
        assert (version.run_id, version.tags["promotion.decision"]) == (run.info.run_id, "champion")


@needs_data
def test_a_run_whose_tracking_server_stays_down_fails_clearly_registers_nothing_and_resumes_to_the_uninterrupted_result(
    restartable, flow, tmp_path
):
    command, url = restartable
    quick_to_give_up = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    with server_running(command, url, tmp_path / "server-1.log") as server:
        training = flow(settings(LONG_EPOCHS), url, tmp_path / "flow.log", **quick_to_give_up)
        training.pause_after("epoch 1/3")  # epoch 1 is logged; epoch 2 is training
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=120)
    training.resume()
    assert training.finished() == 1
    printed = training.output
    run_id = re.search(r"MLflow run ([0-9a-f]{32}) could not be marked FAILED", printed).group(1)
    assert "error: the training flow failed: " in printed and "Connection refused" in printed
    assert f"resume it: flows.py train --resume {run_id}" in printed

    with server_running(command, url, tmp_path / "server-2.log"):
        client = MlflowClient(url)
        assert client.get_run(run_id).info.status == "RUNNING"  # the store could not be told otherwise
        assert client.search_registered_models() == []  # nothing half-written is registered
        logged_steps = [metric.step for metric in client.get_metric_history(run_id, "train_elbo_nats")]
        assert logged_steps == [1]  # the server died while epoch 2 trained

        # The resumed run and an uninterrupted one, at the same time (each on one thread): they train alike.
        resumed = flow(["--resume", run_id], url, tmp_path / "resume.log")
        uninterrupted = flow(settings(LONG_EPOCHS), url, tmp_path / "uninterrupted.log")
        assert resumed.finished() == 0, resumed.output[-3000:]
        assert uninterrupted.finished() == 0, uninterrupted.output[-3000:]

        (reference,) = [run for run in client.search_runs([client.get_run(run_id).info.experiment_id]) if run.info.run_id != run_id]
        run = client.get_run(run_id)
        assert (run.info.status, run.data.tags["resumed"]) == ("FINISHED", "1")
        assert epoch_values(client, run_id) == epoch_values(client, reference.info.run_id)
        test_metrics = {name: run.data.metrics[name] for name in team_load.TEST_METRICS}
        assert test_metrics == {name: reference.data.metrics[name] for name in team_load.TEST_METRICS}
        versions = registry.versions_of(client, "vae-mnist")  # numbered in the order the two registered
        assert sorted(str(v.version) for v in versions) == ["1", "2"]
        assert sorted(v.run_id for v in versions) == sorted([run_id, reference.info.run_id])
