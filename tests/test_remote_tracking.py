"""Specification of the pipeline against a real `mlflow server`, everything read back through the server."""

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

import flows
from pipeline import cli, data, tracking
from pipeline.config import load_config
from tests.conftest import free_port, needs_mirror, running

pytestmark = [needs_mirror, pytest.mark.usefixtures("prefect_server")]

SMALL = {
    "data.train_subset": 300, "data.validation_size": 200, "model.hidden_dims": [32], "model.latent_dim": 2,
    "train.batch_size": 100, "train.device": "cpu", "train.epochs": 2, "eval.iwae_samples": 2,
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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


def test_the_training_flow_tracks_to_an_mlflow_server_and_everything_reads_back_through_it(mlflow_server, tmp_path):
    url, artifacts_destination = mlflow_server
    local_store = Path(tracking.MLRUNS_DIR)
    local_before = (sorted(os.listdir(local_store)), sha256(local_store / "mlflow.db"))
    config = load_config("default", SMALL)

    outcome = flows.train_flow(config)

    assert outcome.tracking_uri == url
    client = MlflowClient(tracking_uri=url)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri == f"mlflow-artifacts:/{outcome.experiment_id}/{outcome.run_id}/artifacts"
    assert client.get_experiment(outcome.experiment_id).name == "vae-mnist"
    assert run.data.params == tracking.flat_params(config)
    for metric in ("train_elbo_nats", "val_elbo_nats", "epoch_seconds"):
        assert [m.step for m in client.get_metric_history(outcome.run_id, metric)] == [1, 2], metric
    assert {name: run.data.metrics[name] for name in outcome.metrics} == pytest.approx(outcome.metrics)
    contexts = {tag.value: json.loads(item.dataset.profile)["num_rows"] for item in run.inputs.dataset_inputs for tag in item.tags}
    assert contexts == {"training": 300, "validation": 200, "test": 10_000}
    assert run.data.tags["dataset_digest"] == data.DATASETS["mnist"].digest

    # The pictures come back through the server, which stored them in its artifacts destination.
    top_level = sorted(info.path for info in client.list_artifacts(outcome.run_id) if not info.is_dir)
    assert top_level == ["config.json", "latent_manifold.png", "latent_space.png", "loss_curves.png", "reconstructions.png"]
    downloads = tmp_path / "downloads"
    for picture in top_level[1:]:
        with Image.open(client.download_artifacts(outcome.run_id, picture, str(downloads))) as image:
            assert image.format == "PNG" and image.width > 100, picture
        stored = artifacts_destination / outcome.experiment_id / outcome.run_id / "artifacts" / picture
        assert sha256(downloads / picture) == sha256(stored), picture
    samples = sorted(i.path for i in client.list_artifacts(outcome.run_id, "images") if i.path.endswith(".png"))
    assert [path.split("+")[2] for path in samples] == ["1", "2"]
    with Image.open(client.download_artifacts(outcome.run_id, samples[-1], str(downloads))) as grid:
        assert grid.format == "PNG"
    with Image.open(client.download_artifacts(outcome.run_id, "samples/samples.gif", str(downloads))) as gif:
        assert gif.n_frames == 2
    assert tracking.run_config(outcome.run_id) == config
    assert tracking.download_checkpoint(outcome.run_id, tmp_path / "checkpoint").is_file()

    # The registry of the server holds the version, champion, and it loads and samples.
    assert (outcome.registered_model, outcome.version, outcome.alias) == ("vae-mnist", "1", "champion")
    version = client.get_model_version_by_alias("vae-mnist", "champion")
    assert (version.version, version.run_id, version.tags["run_id"]) == ("1", outcome.run_id, outcome.run_id)
    assert float(version.tags["test_nll_nats"]) == pytest.approx(outcome.metrics["test_nll_nats"])
    model = mlflow.pytorch.load_model("models:/vae-mnist@champion")
    assert model.sample(3, generator=torch.Generator().manual_seed(0)).shape == (3, 1, 28, 28)

    # Nothing went to the local default store.
    assert (sorted(os.listdir(local_store)), sha256(local_store / "mlflow.db")) == local_before
    assert [e.name for e in MlflowClient(f"sqlite:///{local_store / 'mlflow.db'}").search_experiments()] == ["Default"]


def test_the_command_line_resumes_evaluates_and_promotes_through_an_mlflow_server(mlflow_server, capsys):
    url, _ = mlflow_server
    first = flows.train_flow(load_config("default", SMALL | {"train.epochs": 1}))
    capsys.readouterr()

    assert cli.main(["train", "--resume", first.run_id, "--epochs", "2"]) == 0
    assert f"MLflow run      {first.run_id} (experiment vae-mnist, store {url})" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=url)
    resumed = client.get_run(first.run_id)
    assert (resumed.info.status, resumed.data.tags["resumed"]) == ("FINISHED", "1")
    assert [m.step for m in client.get_metric_history(first.run_id, "train_elbo_nats")] == [1, 2]
    assert client.get_model_version("vae-mnist", "2").run_id == first.run_id

    assert cli.main(["evaluate", "models:/vae-mnist/2", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (evaluated["model"], evaluated["run_id"], evaluated["iwae_samples"]) == ("models:/vae-mnist/2", first.run_id, 2)

    assert cli.main(["promote", "vae-mnist", "1", "--reason", "kept for comparison"]) == 0
    assert client.get_model_version_by_alias("vae-mnist", "champion").version == "1"
    assert client.get_model_version("vae-mnist", "1").tags["promoted_by_hand"] == "kept for comparison"
