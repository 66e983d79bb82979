"""Specification of the MLflow side of a run, read back from a real SQLite store through MlflowClient."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from mlflow import MlflowClient
from prefect.exceptions import TerminationSignal
from PIL import Image

from pipeline import tracking
from pipeline.config import RunConfig, load_config
from pipeline.data import DATASETS, PreparedData, RawDataset, prepare
from pipeline.tracking import (
    MLflowCallback,
    default_tracking_uri,
    ensure_store,
    experiment,
    flat_params,
    log_dataset,
    log_evaluation,
    split_digest,
    start_run,
)
from tests.conftest import LONG_TEST_SECONDS, serving
from tests.team_servers import MLFLOW_SERVER_ENV
from vae.engine import fit
from vae.models import build_model

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CLASS_NAMES = DATASETS["mnist"].class_names


# --- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture
def store(mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh store for this test; the working directory is an empty one, checked to stay empty."""
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    yield mlflow_store
    assert list(workdir.iterdir()) == []


def tiny_config(latent_dim: int = 2, **overrides) -> RunConfig:
    settings = {
        "model.hidden_dims": [16], "model.latent_dim": latent_dim, "data.validation_size": 20,
        "train.epochs": 2, "train.batch_size": 40, "train.device": "cpu", "eval.iwae_samples": 0,
    }
    return load_config("default", settings | overrides)


def tiny_data(config: RunConfig) -> tuple[RawDataset, PreparedData]:
    """100 training and 50 test images of random pixels, all ten labels, under MNIST's name and content digest."""
    generator = torch.Generator().manual_seed(0)
    raw = RawDataset(
        name="mnist",
        train_images=torch.randint(0, 256, (100, 28, 28), dtype=torch.uint8, generator=generator),
        train_labels=torch.arange(10).repeat(10),
        test_images=torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8, generator=generator),
        test_labels=torch.arange(10).repeat(5),
        digest=DATASETS["mnist"].digest,
        class_names=CLASS_NAMES,
    )
    data = config.data
    prepared = prepare(raw, validation_size=data.validation_size, split_seed=data.split_seed,
                       binarization=data.binarization, binarization_seed=data.binarization_seed)
    return raw, prepared


def train_and_log(config: RunConfig, metrics: dict[str, float] | None = None) -> str:
    """A whole tracked run as the flow does it; returns the run id."""
    raw, prepared = tiny_data(config)
    model = build_model(config.model, seed=0)
    with start_run(config, run_name="tiny") as run:
        log_dataset(prepared, config)
        fit(model, prepared.train, prepared.validation, config.objective, config.train,
            callbacks=[MLflowCallback(samples=config.pictures.samples)], progress=False)
        log_evaluation(model, prepared.test, prepared.class_names, metrics or {}, config.pictures)
    return run.info.run_id


TEST_METRICS = {"test_elbo_nats": -180.5, "test_reconstruction_nats": 160.25, "test_kl_nats": 20.25}


@pytest.fixture(scope="module")
def finished_run(store_copier, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunConfig, str]]:
    """One tracked two-epoch run of a model with a 2-D latent, shared by the tests that only read it."""
    config = tiny_config(latent_dim=2)
    with pytest.MonkeyPatch.context() as monkeypatch:
        store_copier(tmp_path_factory.mktemp("finished") / "mlruns", monkeypatch)
        run_id = train_and_log(config, TEST_METRICS)
        yield config, run_id
        mlflow.set_tracking_uri(None)


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    """Every file of the run, recursively."""
    files = []
    for info in client.list_artifacts(run_id, path):
        files.extend(artifact_paths(client, run_id, info.path) if info.is_dir else [info.path])
    return sorted(files)


# --- the store ------------------------------------------------------------------------------------------------------


def test_default_store_is_a_sqlite_database_in_mlruns(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "MLRUNS_DIR", tmp_path / "mlruns")
    assert default_tracking_uri() == f"sqlite:///{tmp_path}/mlruns/mlflow.db"


def test_mlflow_tracking_uri_overrides_the_default(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "MLRUNS_DIR", tmp_path / "mlruns")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert default_tracking_uri() == "http://tracking.example:5000"
    try:
        assert ensure_store() == "http://tracking.example:5000"  # a server's store is the server's business
        assert mlflow.get_tracking_uri() == "http://tracking.example:5000"
    finally:
        mlflow.set_tracking_uri(None)
    assert not (tmp_path / "mlruns").exists()


def test_ensure_store_is_idempotent_and_sets_the_tracking_uri(store):
    assert ensure_store() == store
    assert ensure_store() == store
    assert ensure_store(store) == store
    assert mlflow.get_tracking_uri() == store
    assert [e.name for e in MlflowClient().search_experiments()] == ["Default"]


# Each worker is a fresh interpreter (forking a test process that runs threads is unsafe): it imports everything,
# then waits for the go file, so that both create the store at the same moment.
WORKER = """
import sys, time
from pathlib import Path
from mlflow import MlflowClient
from prefect.exceptions import TerminationSignal
from pipeline.tracking import ensure_store
uri, go, name = sys.argv[1:]
Path(go + "." + name).touch()
while not Path(go).exists():
    time.sleep(0.001)
ensure_store(uri)
MlflowClient(uri).create_experiment("made-by-" + name)
"""


def test_two_processes_creating_the_same_new_store_at_once_both_succeed(tmp_path):
    database = tmp_path / "fresh" / "mlflow.db"
    uri = f"sqlite:///{database}"
    go = tmp_path / "go"
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, uri, str(go), f"worker-{i}"], cwd=PROJECT_ROOT, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    while not all(Path(f"{go}.worker-{i}").exists() or workers[i].poll() is not None for i in range(2)):
        time.sleep(0.01)
    go.touch()
    errors = [worker.communicate(timeout=120)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], errors
    assert database.with_name("mlflow.db.lock").exists()
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    names = sorted(e.name for e in MlflowClient(uri).search_experiments())
    assert names == ["Default", "made-by-worker-0", "made-by-worker-1"]


def test_experiment_per_data_set_keeps_artifacts_beside_the_sqlite_store(store):
    ensure_store()
    mnist = experiment("mnist")
    assert experiment("mnist") == mnist
    assert experiment("fashion-mnist") != mnist
    found = MlflowClient().get_experiment(mnist)
    assert found.name == "vae-mnist"
    assert found.artifact_location == (tracking.MLRUNS_DIR / "artifacts" / "vae-mnist").as_uri()


# --- params and tags ------------------------------------------------------------------------------------------------


def test_flat_params_hold_the_whole_config_as_dotted_strings():
    params = flat_params(load_config("default"))
    assert params["preset"] == "default"
    assert params["train.learning_rate"] == "0.001"
    assert params["model.hidden_dims"] == "[400]"
    assert params["train.grad_clip_norm"] == "None"
    assert params["train.compile"] == "False"
    assert params["data.cache_dir"] == "None"
    sections = {"data", "model", "objective", "train", "eval", "classifier", "registry", "tutorial", "pictures"}
    fields = {f"{s}.{f}" for s in sections for f in type(getattr(load_config("default"), s)).model_fields}
    assert set(params) == fields | {"preset"}


def test_flat_params_cut_values_to_mlflows_limit():
    config = load_config("default", {"data.cache_dir": "/x" * 4000})
    assert len(flat_params(config)["data.cache_dir"]) == 6000


def test_run_records_params_tags_and_finishes(finished_run):
    config, run_id = finished_run
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tiny"
    assert run.info.experiment_id == MlflowClient().get_experiment_by_name("vae-mnist").experiment_id
    assert run.data.params == flat_params(config)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True).stdout
    tags = run.data.tags
    assert {key: tags[key] for key in ("preset", "dataset", "torch_version", "git_commit", "device")} == {
        "preset": "default", "dataset": "mnist", "torch_version": torch.__version__, "git_commit": commit.strip(),
        "device": "cpu",
    }
    assert tags["git_dirty"] in ("true", "false")


def test_tags_passed_in_override_and_add(store):
    with start_run(tiny_config(), tags={"device": "cuda:1", "purpose": "test"}) as run:
        pass
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert (tags["device"], tags["purpose"], tags["preset"]) == ("cuda:1", "test", "default")


def test_outside_a_git_checkout_the_commit_is_unknown(store, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "PROJECT_ROOT", tmp_path)
    with start_run(tiny_config()) as run:
        pass
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert (tags["git_commit"], tags["git_dirty"]) == ("unknown", "unknown")


def test_an_error_inside_the_run_fails_it_records_the_error_and_propagates(store, tmp_path):
    with pytest.raises(ValueError, match="learning rate too high"):
        with start_run(tiny_config()) as run:
            raise ValueError("learning rate too high " + "!" * 1000)
    client = MlflowClient()
    failed = client.get_run(run.info.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"] == ("ValueError: learning rate too high " + "!" * 1000)[:500]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.json", "error.txt"]
    text = Path(client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))).read_text()
    assert text.startswith("Traceback (most recent call last):")
    assert "ValueError: learning rate too high" in text
    assert mlflow.active_run() is None


@pytest.mark.parametrize(
    ("error", "status", "tag"),
    [
        (TerminationSignal(signal.SIGTERM), "KILLED", "TerminationSignal: SIGTERM"),
        (KeyboardInterrupt(), "KILLED", "KeyboardInterrupt"),
        (RuntimeError(), "FAILED", "RuntimeError"),
    ],
    ids=["sigterm", "ctrl-c", "no-message"],
)
def test_a_run_stopped_by_a_signal_ends_killed_and_its_error_tag_names_what_stopped_it(store, error, status, tag):
    with pytest.raises(type(error)):
        with start_run(tiny_config()) as run:
            raise error
    stopped = MlflowClient().get_run(run.info.run_id)
    assert (stopped.info.status, stopped.data.tags["error"]) == (status, tag)


# --- dataset, metrics and images ------------------------------------------------------------------------------------


def test_dataset_inputs_name_digest_and_split_sizes(finished_run):
    config, run_id = finished_run
    run = MlflowClient().get_run(run_id)
    inputs = {
        {tag.key: tag.value for tag in item.tags}["mlflow.data.context"]: item.dataset
        for item in run.inputs.dataset_inputs
    }
    assert sorted(inputs) == ["test", "training", "validation"]
    content = DATASETS["mnist"].digest
    for context, count in {"training": 80, "validation": 20, "test": 50}.items():
        dataset = inputs[context]
        assert dataset.name == "mnist"
        assert dataset.digest == split_digest(content, context, config)
        assert dataset.digest.startswith(content[:8] + "-")
        assert dataset.profile == f'{{"num_rows": {count}}}'
        assert dataset.source == '{"url": "https://ossci-datasets.s3.amazonaws.com/mnist/"}'
    assert len({dataset.digest for dataset in inputs.values()}) == 3
    assert run.data.tags["dataset_digest"] == content


def test_split_digest_changes_with_the_settings_that_shape_the_split():
    content = DATASETS["mnist"].digest
    base, other_split = tiny_config(), tiny_config(**{"data.split_seed": 1})
    assert split_digest(content, "training", base) != split_digest(content, "training", other_split)
    assert split_digest(content, "test", base) == split_digest(content, "test", other_split)
    static = tiny_config(**{"data.binarization": "static"})
    assert split_digest(content, "test", base) != split_digest(content, "test", static)


def test_without_a_validation_set_only_training_and_test_are_logged(store):
    config = tiny_config(**{"data.validation_size": 0, "train.early_stopping_patience": None})
    raw, prepared = tiny_data(config)
    with start_run(config) as run:
        log_dataset(prepared, config)
    inputs = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert sorted(tag.value for item in inputs for tag in item.tags) == ["test", "training"]


def test_every_epoch_logs_its_metrics_at_step_epoch(finished_run):
    _, run_id = finished_run
    client = MlflowClient()
    run = client.get_run(run_id)
    per_epoch = {
        "train_loss", "train_elbo_nats", "train_reconstruction_nats", "train_kl_nats", "kl_weight",
        "val_elbo_nats", "val_reconstruction_nats", "val_kl_nats", "epoch_seconds", "training_minutes",
    }
    assert set(run.data.metrics) == per_epoch | set(TEST_METRICS) | {"epochs_trained"}
    for name in per_epoch:
        assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2], name
    assert [m.value for m in client.get_metric_history(run_id, "kl_weight")] == [1.0, 1.0]
    # The training minutes so far: each epoch's training pass plus its validation.
    minutes = [m.value for m in client.get_metric_history(run_id, "training_minutes")]
    seconds = [m.value for m in client.get_metric_history(run_id, "epoch_seconds")]
    assert minutes[0] >= seconds[0] / 60 and minutes[1] - minutes[0] >= seconds[1] / 60 - 1e-9


def test_the_end_of_training_logs_the_epochs_trained(finished_run):
    _, run_id = finished_run
    assert MlflowClient().get_run(run_id).data.metrics["epochs_trained"] == 2


def test_test_metrics_are_logged_as_given(finished_run):
    _, run_id = finished_run
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert {name: metrics[name] for name in TEST_METRICS} == TEST_METRICS


def test_images_of_a_run_with_a_2d_latent(finished_run):
    _, run_id = finished_run
    client = MlflowClient()
    files = artifact_paths(client, run_id)
    series = [path for path in files if path.startswith("images/")]
    assert [path for path in files if not path.startswith("images/")] == [
        "config.json", "latent_manifold.png", "latent_space.png", "loss_curves.png", "reconstructions.png", "samples/samples.gif",
    ]
    # MLflow names the files of an image series images/<key>+step+<step>+timestamp+<ms>+<uuid>[+compressed].<ext>
    steps = sorted(path.split("+")[2] for path in series if path.endswith(".png"))
    assert steps == ["1", "2"]
    assert all(path.startswith("images/samples+step+") for path in series)
    assert len(series) == 4  # a full-size PNG and a compressed WebP per step
    assert client.get_run(run_id).data.tags["mlflow.loggedImages"] == "True"


def test_samples_gif_has_one_frame_per_epoch(finished_run, tmp_path):
    _, run_id = finished_run
    path = MlflowClient().download_artifacts(run_id, "samples/samples.gif", str(tmp_path))
    with Image.open(path) as gif:
        assert gif.n_frames == 2


def test_a_larger_latent_gets_no_manifold_and_leaves_the_working_directory_clean(store):
    run_id = train_and_log(tiny_config(latent_dim=5))
    files = [path for path in artifact_paths(MlflowClient(), run_id) if not path.startswith("images/")]
    assert files == ["config.json", "latent_space.png", "loss_curves.png", "reconstructions.png", "samples/samples.gif"]


def test_the_pictures_settings_size_the_sample_grid_and_the_manifold_and_add_the_first_reconstructions(store, tmp_path):
    sizes = {"pictures.samples": 9, "pictures.manifold_size": 4, "pictures.first_reconstructions": 8}
    config = tiny_config(latent_dim=2, **sizes)
    run_id = train_and_log(config)
    client = MlflowClient()
    files = artifact_paths(client, run_id)
    assert "first_reconstructions.png" in files

    def size(path: str) -> tuple[int, int]:
        with Image.open(client.download_artifacts(run_id, path, str(tmp_path))) as image:
            return image.size

    grid = next(path for path in files if path.startswith("images/samples+step+2+") and path.endswith(".png"))
    assert size(grid) == (((28 + 2) * 3 + 2) * 2,) * 2  # 9 samples: 3x3 cells of 28 pixels, 2 of padding, twice enlarged
    # 8 originals above 8 reconstructions: 16 pictures in 4 columns, 2 rows each
    assert size("first_reconstructions.png") == (((28 + 2) * 4 + 2) * 2,) * 2
    assert size("latent_manifold.png") == tracking.pictures.latent_manifold(build_model(config.model, seed=0), n=4).size
    assert size("latent_manifold.png") != tracking.pictures.latent_manifold(build_model(config.model, seed=0)).size


def test_ui_addresses_open_the_runs_view_of_an_experiment_or_a_run():
    local = "sqlite:////tmp/mlruns/mlflow.db"
    assert tracking.ui_url("3", tracking_uri=local) == "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert tracking.ui_url("3", "abc", tracking_uri=local, ui="http://127.0.0.1:5001") == (
        "http://127.0.0.1:5001/#/experiments/3/runs/abc?workflowType=machine_learning"
    )
    # A tracking server serves the UI itself, at its own address.
    assert tracking.ui_url("3", "abc", tracking_uri="http://mlflow.internal:5000/") == (
        "http://mlflow.internal:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    )


def test_the_experiments_of_runs_are_listed_the_pipelines_first(store):
    client = MlflowClient()
    ids = {name: client.create_experiment(name) for name in ("zebra", "vae-mnist", "vae-fashion-mnist")}
    assert tracking.experiments() == {name: ids[name] for name in ("vae-fashion-mnist", "vae-mnist", "zebra")}


# --- concurrent runs -------------------------------------------------------------------------------------------------

# Several runs (the trials of a sweep) log the same dataset splits into one store at once. The store looks for each
# dataset row, inserts the missing ones and links the run, in one transaction; the bad interleaving is every run
# looking before any inserts. It is forced here: the test holds the SQLite database's write lock while the runs call
# log_dataset, so their reads go through and their inserts wait, and releases it HOLD_SECONDS later.
WORKERS, ROUNDS, HOLD_SECONDS = 3, 3, 2.0
BARRIER_SECONDS = 600  # the first wait covers the workers' imports: minutes on two loaded cores


def log_the_same_dataset_in_each_experiment(uri: str, experiment_ids: list[str], ready, go, results) -> None:
    """A worker process: in each experiment, a run that logs tiny_data's three splits as soon as ``go`` opens."""
    collisions = []
    handler = logging.Handler(logging.INFO)
    handler.emit = collisions.append
    logging.getLogger("pipeline.tracking").addHandler(handler)
    logging.getLogger("pipeline.tracking").setLevel(logging.INFO)
    mlflow.set_tracking_uri(uri)
    config = tiny_config()
    _, prepared = tiny_data(config)
    errors = []
    for experiment_id in experiment_ids:
        with mlflow.start_run(experiment_id=experiment_id):
            ready.wait(BARRIER_SECONDS)  # every run has started; the test takes the write lock
            go.wait(BARRIER_SECONDS)
            try:
                log_dataset(prepared, config)
            except Exception as error:
                errors.append(f"{type(error).__name__}: {error}"[:300])
    results.put((errors, len(collisions)))


def log_at_once_while_the_write_lock_is_held(uri: str, database: Path, rounds: int) -> int:
    """WORKERS processes each log the same splits into each of ``rounds`` new experiments at the same moment.

    Asserts that no run failed and returns how many times a run found its insert beaten by another run's.
    """
    client = MlflowClient(uri)
    experiment_ids = [client.create_experiment(f"round-{number}") for number in range(rounds)]
    context = multiprocessing.get_context("spawn")  # fresh interpreters: forking a process that runs threads is unsafe
    ready, go, results = context.Barrier(WORKERS + 1), context.Barrier(WORKERS + 1), context.Queue()
    workers = [
        context.Process(target=log_the_same_dataset_in_each_experiment, args=(uri, experiment_ids, ready, go, results))
        for _ in range(WORKERS)
    ]
    for worker in workers:
        worker.start()
    try:
        lock = sqlite3.connect(database, isolation_level=None)
        for _ in range(rounds):
            ready.wait(BARRIER_SECONDS)
            lock.execute("BEGIN IMMEDIATE")  # readers go on, writers wait (MLflow's busy timeout is 20 s)
            go.wait(BARRIER_SECONDS)
            time.sleep(HOLD_SECONDS)
            lock.execute("ROLLBACK")
        lock.close()
        outcomes = [results.get(timeout=BARRIER_SECONDS) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=60)
            worker.kill()
    assert [errors for errors, _ in outcomes] == [[]] * WORKERS

    config = tiny_config()
    _, prepared = tiny_data(config)
    expected = {
        context: split_digest(prepared.digest, context, config) for context in ("training", "validation", "test")
    }
    for experiment_id in experiment_ids:
        runs = client.search_runs([experiment_id])
        assert [run.info.status for run in runs] == ["FINISHED"] * WORKERS
        for run in runs:
            logged = {item.tags[0].value: item.dataset.digest for item in run.inputs.dataset_inputs}
            assert logged == expected
    return sum(collisions for _, collisions in outcomes)


def test_runs_logging_the_same_dataset_at_the_same_moment_all_log_it(store):
    database = Path(store.removeprefix("sqlite:///"))
    collisions = log_at_once_while_the_write_lock_is_held(store, database, ROUNDS)
    assert collisions > 0  # the race did happen, and every run survived it


@pytest.mark.timeout(LONG_TEST_SECONDS)
def test_runs_logging_the_same_dataset_through_an_mlflow_server_at_the_same_moment_all_log_it(store, tmp_path):
    database = Path(store.removeprefix("sqlite:///"))
    command = lambda port: [  # noqa: E731
        str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", store,
        "--default-artifact-root", (tmp_path / "server-artifacts").as_uri(),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    with serving(command, ready_path="/health", log=tmp_path / "mlflow-server.log", env=MLFLOW_SERVER_ENV) as server:
        collisions = log_at_once_while_the_write_lock_is_held(server.url, database, ROUNDS)
    assert collisions > 0


# --- runs whose process died ----------------------------------------------------------------------------------------


def running_run(experiment_id: str, **tags: str) -> str:
    """A run left RUNNING with these tags, as a process that died without closing it leaves it."""
    return MlflowClient().create_run(experiment_id, tags=tags).info.run_id


def a_killed_process() -> dict[str, str]:
    """The process tags of a real process that was started, then killed with SIGKILL (and reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    started = psutil.Process(child.pid).create_time()
    child.kill()
    child.wait()
    return {tracking.HOST_TAG: socket.gethostname(), tracking.PID_TAG: str(child.pid), tracking.PROCESS_STARTED_TAG: f"{started:.3f}"}


def test_a_run_records_the_host_id_and_start_time_of_its_process(store):
    with start_run(tiny_config()) as run:
        pass
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    started = f"{psutil.Process().create_time():.3f}"
    assert {key: tags[key] for key in ("process.host", "process.pid", "process.started")} == {
        "process.host": socket.gethostname(), "process.pid": str(os.getpid()), "process.started": started,
    }


def test_starting_a_run_marks_killed_the_runs_whose_process_is_gone_and_leaves_the_others(store):
    ensure_store()
    mnist = experiment("mnist")
    me = tracking.process_tags()
    dead = a_killed_process()
    command = tracking.resume_command("abc")
    killed = running_run(mnist, **dead, resume_command=command)
    killed_unresumable = running_run(mnist, **dead)
    pid_reused = running_run(mnist, **{**me, "process.started": f"{float(me['process.started']) - 100:.3f}"})
    alive = running_run(mnist, **me)
    elsewhere = running_run(mnist, **{**dead, "process.host": "another-host"})
    unknown = running_run(mnist)
    other_experiment = running_run(experiment("fashion-mnist"), **dead)

    with start_run(tiny_config()):
        pass
    client = MlflowClient()
    status = {run_id: client.get_run(run_id).info.status for run_id in (killed, killed_unresumable, pid_reused, alive, elsewhere, unknown, other_experiment)}
    assert status == {
        killed: "KILLED", killed_unresumable: "KILLED", pid_reused: "KILLED",
        alive: "RUNNING", elsewhere: "RUNNING", unknown: "RUNNING", other_experiment: "RUNNING",
    }
    host = socket.gethostname()
    assert client.get_run(killed).data.tags["killed"] == (
        f"process {dead['process.pid']} on {host} ended without closing this run; resume it with: {command}"
    )
    assert client.get_run(killed_unresumable).data.tags["killed"] == (
        f"process {dead['process.pid']} on {host} ended without closing this run; it cannot be resumed: run it again"
    )
    assert client.get_run(killed).info.end_time >= client.get_run(killed).info.start_time
    assert "killed" not in client.get_run(alive).data.tags


def test_resuming_a_run_whose_process_is_alive_is_refused_and_leaves_it_running(store):
    ensure_store()
    run_id = running_run(experiment("mnist"), **tracking.process_tags())
    with pytest.raises(tracking.RunInProgressError, match=(
        rf"run {run_id} is still running in process {os.getpid()} on this host \({socket.gethostname()}\): "
        "stop that process first, or wait for it to finish"
    )):
        with start_run(tiny_config(), resume_run_id=run_id):
            pass
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"


def test_resuming_a_run_whose_process_is_gone_reopens_it_under_this_process(store):
    ensure_store()
    run_id = running_run(experiment("mnist"), **a_killed_process())
    with start_run(tiny_config(), resume_run_id=run_id):
        reopened = MlflowClient().get_run(run_id)
    assert reopened.info.status == "RUNNING"
    assert {key: reopened.data.tags[key] for key in tracking.process_tags()} == tracking.process_tags()
    assert "killed" not in reopened.data.tags and reopened.data.tags["resumed"] == "1"
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_the_resume_command_names_a_store_other_than_the_default_without_its_password(store):
    flows_py = PROJECT_ROOT / "flows.py"
    assert tracking.resume_command("abc", store) == f"{sys.executable} {flows_py} train --resume abc"
    assert tracking.resume_command("abc", "http://ann:s3cret@tracking.example:5000") == (
        f"MLFLOW_TRACKING_URI='http://***@tracking.example:5000' {sys.executable} {flows_py} train --resume abc"
    )
    assert tracking.resume_command("abc", "postgresql://ann:s3cret@db.example/mlflow") == (
        f"MLFLOW_TRACKING_URI='postgresql://***@db.example/mlflow' {sys.executable} {flows_py} train --resume abc"
    )


# --- checkpoints in MLflow, and what a kill in the middle of logging an epoch leaves ----------------------------------


class PowerCut(Exception):
    """Stands for a kill or a power cut at one point of logging an epoch."""


def train_with_checkpoints(config: RunConfig, scratch: Path, *, resume_run_id: str | None = None, keep: Path | None = None) -> str:
    """A tracked run of ``config`` with a checkpoint every epoch, as the flow does it (resumed if asked); with ``keep``
    a copy of each epoch's local checkpoint goes to ``keep/epoch-<n>.pt``. Returns the run id."""
    _, prepared = tiny_data(config)
    checkpoint = scratch / "checkpoint.pt"

    class Keep(MLflowCallback.__base__):
        def on_epoch_end(self, state):
            if keep is not None:
                keep.mkdir(exist_ok=True)
                (keep / f"epoch-{state.epoch}.pt").write_bytes(checkpoint.read_bytes())

    with start_run(config, resume_run_id=resume_run_id) as run:
        if resume_run_id is not None:
            checkpoint = tracking.download_checkpoint(resume_run_id, scratch)
        fit(build_model(config.model, seed=0), prepared.train, prepared.validation, config.objective, config.train,
            callbacks=[MLflowCallback(checkpoint_path=checkpoint), Keep()], checkpoint_path=checkpoint,
            resume_from=checkpoint if resume_run_id is not None else None, progress=False)
    return run.info.run_id


def artifact_file(run_id: str, path: str) -> Path:
    """Where a run's artifact lives in the local store (to damage it as a cut upload would)."""
    return Path(MlflowClient().get_run(run_id).info.artifact_uri.removeprefix("file://")) / path


def tear(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_every_epoch_uploads_its_checkpoint_twice_first_to_next(store, tmp_path):
    run_id = train_with_checkpoints(tiny_config(), tmp_path)
    files = artifact_paths(MlflowClient(), run_id)
    assert [f for f in files if f.startswith("checkpoint/")] == ["checkpoint/checkpoint.pt", "checkpoint/next/checkpoint.pt"]
    assert artifact_file(run_id, "checkpoint/checkpoint.pt").read_bytes() == artifact_file(run_id, "checkpoint/next/checkpoint.pt").read_bytes()


def test_a_checkpoint_torn_during_its_upload_is_passed_over_for_the_whole_copy(store, tmp_path, capsys):
    run_id = train_with_checkpoints(tiny_config(), tmp_path / "train", keep=tmp_path / "kept")
    # A kill during the second upload of epoch 2: the first copy is whole.
    tear(artifact_file(run_id, "checkpoint/checkpoint.pt"))
    local = tracking.download_checkpoint(run_id, tmp_path / "one")
    assert local.read_bytes() == (tmp_path / "kept" / "epoch-2.pt").read_bytes()
    damaged = capsys.readouterr().out
    assert damaged.startswith(
        f"resuming run {run_id} from the checkpoint of epoch 2, checkpoint/next/checkpoint.pt "
        "(checkpoint/checkpoint.pt is damaged, its upload cut short ("
    )
    # A kill during the first upload of epoch 2: the usual copy still holds epoch 1.
    artifact_file(run_id, "checkpoint/checkpoint.pt").write_bytes((tmp_path / "kept" / "epoch-1.pt").read_bytes())
    tear(artifact_file(run_id, "checkpoint/next/checkpoint.pt"))
    local = tracking.download_checkpoint(run_id, tmp_path / "two")
    assert local.read_bytes() == (tmp_path / "kept" / "epoch-1.pt").read_bytes()
    assert capsys.readouterr().out.startswith(
        f"resuming run {run_id} from the checkpoint of epoch 1, checkpoint/checkpoint.pt "
        "(checkpoint/next/checkpoint.pt is damaged, its upload cut short ("
    )
    # Both whole, the first copy one epoch ahead (a kill between the two uploads): the later epoch wins.
    artifact_file(run_id, "checkpoint/next/checkpoint.pt").write_bytes((tmp_path / "kept" / "epoch-2.pt").read_bytes())
    local = tracking.download_checkpoint(run_id, tmp_path / "three")
    assert local.read_bytes() == (tmp_path / "kept" / "epoch-2.pt").read_bytes()
    assert capsys.readouterr().out == (
        f"resuming run {run_id} from the checkpoint of epoch 2, checkpoint/next/checkpoint.pt "
        "(checkpoint/checkpoint.pt is of epoch 1)\n"
    )


def test_a_run_without_a_whole_checkpoint_says_so_and_is_trained_from_the_start(store, tmp_path, capsys):
    run_id = train_with_checkpoints(tiny_config(), tmp_path)
    tear(artifact_file(run_id, "checkpoint/checkpoint.pt"))
    artifact_file(run_id, "checkpoint/next/checkpoint.pt").write_bytes(b"")
    assert tracking.download_checkpoint(run_id, tmp_path / "download") is None
    assert re.fullmatch(
        rf"run {run_id} has no whole checkpoint \(checkpoint/checkpoint.pt is damaged, its upload cut short \(.*\); "
        r"checkpoint/next/checkpoint.pt is damaged, its upload cut short \(.*\)\): it trains again from the start\n",
        capsys.readouterr().out,
    )
    with start_run(tiny_config()) as run:  # killed in its first epoch: nothing uploaded yet
        pass
    assert tracking.download_checkpoint(run.info.run_id, tmp_path / "none") is None
    assert capsys.readouterr().out.startswith(
        f"run {run.info.run_id} has no whole checkpoint (checkpoint/checkpoint.pt is not there ("
    )


def test_a_resumed_run_logs_its_dataset_inputs_only_if_it_has_none(store):
    config = tiny_config()
    _, prepared = tiny_data(config)
    with start_run(config) as run:
        log_dataset(prepared, config)
    with start_run(config, resume_run_id=run.info.run_id):
        log_dataset(prepared, config)
    assert len(MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs) == 3
    with start_run(config) as killed_before_logging_them:
        pass
    with start_run(config, resume_run_id=killed_before_logging_them.info.run_id):
        log_dataset(prepared, config)
    assert len(MlflowClient().get_run(killed_before_logging_them.info.run_id).inputs.dataset_inputs) == 3


@pytest.mark.parametrize("cut", ["before the metrics", "before the grid"])
def test_a_resumed_run_logs_what_a_kill_after_the_checkpoint_upload_cut_off_and_nothing_twice(store, tmp_path, cut, monkeypatch):
    config = tiny_config(**{"train.epochs": 3})
    uninterrupted = train_with_checkpoints(config, tmp_path / "uninterrupted")
    log_epoch, log_grid = MLflowCallback._log_epoch, MLflowCallback._log_grid

    def cut_epoch_2(original, step_name):
        def logged(callback, state, *args):
            if state.epoch == 2 and cut == step_name:
                raise PowerCut(cut)
            return original(callback, state, *args)
        return logged

    with monkeypatch.context() as patch:
        patch.setattr(MLflowCallback, "_log_epoch", cut_epoch_2(log_epoch, "before the metrics"))
        patch.setattr(MLflowCallback, "_log_grid", cut_epoch_2(log_grid, "before the grid"))
        with pytest.raises(PowerCut):
            train_with_checkpoints(config, tmp_path / "killed")
    (killed,) = [run.info.run_id for run in MlflowClient().search_runs([experiment("mnist")]) if run.info.status == "FAILED"]
    resumed = train_with_checkpoints(config, tmp_path / "resumed", resume_run_id=killed)

    client = MlflowClient()
    for name in ("train_loss", "train_elbo_nats", "train_kl_nats", "kl_weight", "val_elbo_nats", "epoch_seconds"):
        history = [(m.step, m.value) for m in client.get_metric_history(resumed, name)]
        assert [step for step, _ in history] == [1, 2, 3], name
        if name != "epoch_seconds":
            assert history == [(m.step, m.value) for m in client.get_metric_history(uninterrupted, name)], name
    grids = sorted(int(path.split("+")[2]) for path in artifact_paths(client, resumed) if path.startswith("images/samples+") and path.endswith(".png"))
    assert grids == [1, 2, 3]
    with Image.open(client.download_artifacts(resumed, "samples/samples.gif", str(tmp_path))) as gif:
        assert gif.n_frames == 3
