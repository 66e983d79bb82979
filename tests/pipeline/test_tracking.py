"""Specification of the MLflow side of a run, read back from a real SQLite store through MlflowClient."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
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
            callbacks=[MLflowCallback()], progress=False)
        log_evaluation(model, prepared.test, prepared.class_names, metrics or {})
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
    sections = {"data", "model", "objective", "train", "eval", "registry"}
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
    assert set(run.data.metrics) == per_epoch | set(TEST_METRICS)
    for name in per_epoch:
        assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2], name
    assert [m.value for m in client.get_metric_history(run_id, "kl_weight")] == [1.0, 1.0]
    # The training minutes so far: each epoch's training pass plus its validation.
    minutes = [m.value for m in client.get_metric_history(run_id, "training_minutes")]
    seconds = [m.value for m in client.get_metric_history(run_id, "epoch_seconds")]
    assert minutes[0] >= seconds[0] / 60 and minutes[1] - minutes[0] >= seconds[1] / 60 - 1e-9


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
