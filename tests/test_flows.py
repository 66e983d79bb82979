"""Specification of the training flow, read back through MLflow's and Prefect's clients, and of its command line."""

import asyncio
import gzip
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

import flows
from pipeline import cli, data, registry, tracking, tutorials
from pipeline.config import PRESETS, load_config
from tests.conftest import LONG_TEST_SECONDS, PROJECT_ROOT, TINY_CLASSIFIER, needs_data

pytestmark = pytest.mark.usefixtures("prefect_server", "mlflow_store")

SMALL = {
    "data.train_subset": 600, "data.validation_size": 300, "model.hidden_dims": [64], "model.latent_dim": 2,
    "train.batch_size": 100, "train.device": "cpu", "train.epochs": 2, "eval.iwae_samples": 4, **TINY_CLASSIFIER,
}
FID_METRICS = {"test_fid", "test_reconstruction_fid", "test_reconstruction_accuracy"}


def small(**changes):
    return load_config("default", SMALL | changes)


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    files = []
    for info in client.list_artifacts(run_id, path):
        files.extend(artifact_paths(client, run_id, info.path) if info.is_dir else [info.path])
    return sorted(files)


def aliases(name: str = "vae-mnist") -> dict[str, str]:
    return {alias: str(version) for alias, version in MlflowClient().get_registered_model(name).aliases.items()}


async def read_markdown_artifact(key: str) -> str:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        artifact = await client.read_latest_artifacts()
        return next(a.data for a in artifact if a.key == key)


@needs_data
def test_the_training_flow_tracks_params_metrics_images_and_registers_a_model_that_samples():
    config = small()
    outcome = flows.train_flow(config)
    client = MlflowClient()
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == tracking.flat_params(config)
    for metric in ("train_loss", "train_elbo_nats", "train_reconstruction_nats", "train_kl_nats", "val_elbo_nats", "val_reconstruction_nats", "val_kl_nats"):
        assert [m.step for m in client.get_metric_history(outcome.run_id, metric)] == [1, 2], metric
    assert set(outcome.metrics) == {"test_elbo_nats", "test_reconstruction_nats", "test_kl_nats", "test_nll_nats", "test_bits_per_dim", *FID_METRICS}
    assert {name: run.data.metrics[name] for name in outcome.metrics} == pytest.approx(outcome.metrics)
    assert run.data.tags["dataset_digest"] == data.DATASETS["mnist"].digest
    contexts = {tag.value: json.loads(item.dataset.profile)["num_rows"] for item in run.inputs.dataset_inputs for tag in item.tags}
    assert contexts == {"training": 600, "validation": 300, "test": 10_000}

    files = artifact_paths(client, outcome.run_id)
    assert [f for f in files if not f.startswith("images/")] == [
        "checkpoint/checkpoint.pt", "checkpoint/next/checkpoint.pt", "config.json", "latent_manifold.png", "latent_space.png", "loss_curves.png",
        "reconstructions.png", "samples/samples.gif",
    ]
    assert sorted(f.split("+")[2] for f in files if f.startswith("images/samples+") and f.endswith(".png")) == ["1", "2"]
    assert tracking.run_config(outcome.run_id) == config

    assert (outcome.registered_model, outcome.version, outcome.alias) == ("vae-mnist", "1", "champion")
    version = client.get_model_version("vae-mnist", "1")
    assert version.tags["run_id"] == outcome.run_id
    assert float(version.tags["test_nll_nats"]) == pytest.approx(outcome.metrics["test_nll_nats"])
    model = registry.load_model("models:/vae-mnist@champion")
    assert model.sample(3, generator=torch.Generator().manual_seed(0)).shape == (3, 1, 28, 28)
    assert model.decode(torch.zeros(2, 2)).shape == (2, 1, 28, 28)

    summary = asyncio.run(read_markdown_artifact(flows.SUMMARY_ARTIFACT_KEY))
    assert outcome.run_id in summary and "alias **champion**" in summary and "test_nll_nats" in summary
    assert "| test_fid |" in summary


@needs_data
def test_the_first_run_trains_and_registers_the_classifier_and_later_runs_reuse_it_for_their_fid():
    first = flows.train_flow(small())
    second = flows.train_flow(small(**{"train.seed": 1}))
    client = MlflowClient()
    (classifier_run,) = client.search_runs([tracking.named_experiment("classifier-mnist")])
    assert classifier_run.info.status == "FINISHED"
    assert [str(v.version) for v in client.search_model_versions("name = 'classifier-mnist'")] == ["1"]
    for outcome in (first, second):
        run = client.get_run(outcome.run_id)
        assert run.data.tags["fid.classifier"] == "models:/classifier-mnist/1"
        assert {name: run.data.metrics[name] for name in FID_METRICS} == {name: outcome.metrics[name] for name in FID_METRICS}
        assert outcome.metrics["test_fid"] > 0 and 0 <= outcome.metrics["test_reconstruction_accuracy"] <= 1
    assert first.metrics["test_fid"] != second.metrics["test_fid"]  # another model, the same yardstick
    # A run with FID switched off neither trains nor uses a classifier.
    off = flows.train_flow(small(**{"eval.fid": False, "classifier.seed": 5}))
    assert not FID_METRICS & set(off.metrics) and "fid.classifier" not in client.get_run(off.run_id).data.tags
    assert len(client.search_runs([tracking.named_experiment("classifier-mnist")])) == 1


@needs_data
def test_a_better_model_becomes_champion_and_a_worse_one_challenger():
    first = flows.train_flow(small(**{"train.epochs": 2}))
    better = flows.train_flow(small(**{"train.epochs": 4}))
    worse = flows.train_flow(small(**{"train.epochs": 1}))
    assert first.metrics["test_nll_nats"] > better.metrics["test_nll_nats"]
    assert worse.metrics["test_nll_nats"] > better.metrics["test_nll_nats"]
    assert [(o.version, o.alias) for o in (first, better, worse)] == [("1", "champion"), ("2", "champion"), ("3", "challenger")]
    assert aliases() == {"champion": "2", "challenger": "3"}
    tags = MlflowClient().get_model_version("vae-mnist", "3").tags
    assert tags["promotion.decision"] == "challenger" and tags["promotion.champion_version"] == "2"
    assert "does not beat champion v2" in tags["promotion.reason"]


@needs_data
def test_the_promotion_margin_keeps_a_better_model_as_challenger_when_it_is_not_better_by_more():
    champion = flows.train_flow(small(**{"train.epochs": 2}))
    better = flows.train_flow(small(**{"train.epochs": 4, "registry.promotion_margin_nats": 1000.0}))
    gain = champion.metrics["test_nll_nats"] - better.metrics["test_nll_nats"]
    assert gain > 0  # the new model is the better one, by less than the margin
    assert (better.version, better.alias) == ("2", "challenger")
    assert better.promotion_reason == (
        f"test_nll_nats {better.metrics['test_nll_nats']:.2f} does not beat champion v1 "
        f"({champion.metrics['test_nll_nats']:.2f}) by more than margin 1000.00 (difference {gain:.2f}, lower is better)"
    )
    assert aliases() == {"champion": "1", "challenger": "2"}


@needs_data
def test_a_nan_loss_leaves_a_failed_run_with_the_error_and_no_registered_version():
    config = small(**{"train.optimizer": "rmsprop", "train.learning_rate": 1e12, "train.epochs": 3})
    state = flows.train_flow(config, return_state=True)
    assert state.is_failed()
    (run,) = MlflowClient().search_runs([tracking.experiment("mnist")])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("NonFiniteLossError: non-finite loss")
    assert MlflowClient().search_registered_models() == []


def test_a_corrupt_data_file_leaves_a_failed_run_with_the_error_and_no_registered_version(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror" / "mnist"
    mirror.mkdir(parents=True)
    for name in data.FILE_NAMES:
        (mirror / f"{name}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(4)))
    spec = data.DATASETS["mnist"]
    monkeypatch.setitem(data.DATASETS, "mnist", data.DatasetSpec(spec.name, ("http://127.0.0.1:9/",), spec.sha256, spec.class_names, spec.sizes))
    monkeypatch.setenv("VAE_DATA_MIRROR", str(tmp_path / "mirror"))
    config = small(**{"data.cache_dir": str(tmp_path / "cache")})
    state = flows.train_flow(config, return_state=True)
    assert state.is_failed()
    # A file with the wrong hash cannot heal by trying again: fetched once, not retried.
    assert asyncio.run(task_runs_of(state.state_details.flow_run_id)) == [("fetch and verify data", "Failed", 1)]
    (run,) = MlflowClient().search_runs([tracking.experiment("mnist")])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("DownloadError: could not fetch train-images-idx3-ubyte")
    error_text = Path(MlflowClient().download_artifacts(run.info.run_id, "error.txt", str(tmp_path))).read_text()
    assert f"expected {spec.sha256['train-images-idx3-ubyte']}" in error_text
    assert list((tmp_path / "cache" / "mnist").iterdir()) == []
    assert MlflowClient().search_registered_models() == []


def test_a_bad_flow_parameter_fails_before_any_task_runs():
    state = flows.train_flow(config={"train": {"learning_rate": -1}}, return_state=True)
    assert state.is_failed()
    assert "learning_rate" in state.message
    assert MlflowClient().search_runs([tracking.experiment("mnist")]) == []


def test_a_bad_config_value_on_the_command_line_fails_naming_the_field(capsys):
    assert cli.main(["train", "--set", "train.learning_rate=-0.001"]) == 2
    assert "train.learning_rate: Input should be greater than 0 (got -0.001)" in capsys.readouterr().err


@pytest.mark.timeout(LONG_TEST_SECONDS)
@needs_data
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_one_epoch_through_the_command_line_and_logs_its_tutorials_figure(preset, capsys):
    config = load_config(preset)
    images = config.train.batch_size if config.train.drop_last else 256  # at least one full batch
    quick = ["--epochs", "1", "--device", "cpu", "--set", f"data.train_subset={images}", "--set", "eval.iwae_samples=2"]
    quick += [arg for name, value in TINY_CLASSIFIER.items() for arg in ("--set", f"{name}={json.dumps(value)}")]
    if PRESETS[preset]["data"].get("validation_size", 10_000):
        quick += ["--set", "data.validation_size=500"]
    assert cli.main(["train", "--preset", preset, *quick]) == 0
    printed = capsys.readouterr().out
    assert f"{preset} on {PRESETS[preset]['data']['dataset']}: 1 epochs" in printed
    assert "  FID (samples)   " in printed
    assert "registered      models:/vae-" in printed
    (run,) = MlflowClient().search_runs([tracking.experiment(PRESETS[preset]["data"]["dataset"])], filter_string=f"params.preset = '{preset}'")
    assert run.info.status == "FINISHED" and json.loads(run.data.params["model.hidden_dims"]) == list(config.model.hidden_dims)
    pictures = {info.path for info in MlflowClient().list_artifacts(run.info.run_id)}
    assert ("first_reconstructions.png" in pictures) == (config.pictures.first_reconstructions > 0)
    for name in tutorials.figure_names(config):  # in the tutorial's unit, at step 1, beside the nats
        assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, name)] == [1], name
        assert f"  {name} " in printed


async def task_runs_of(flow_run_id) -> list[tuple[str, str, int]]:
    """(name, final state, times run) of each task run of a flow run, in the order they started."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), sort=TaskRunSort.EXPECTED_START_TIME_ASC
        )
        return [(run.name.rsplit("-", 1)[0], run.state.name, run.run_count) for run in runs]


@needs_data
def test_a_training_run_writes_nothing_to_prefects_result_storage():
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    storage = Path(PREFECT_LOCAL_STORAGE_PATH.value())
    before = sorted(storage.rglob("*")) if storage.exists() else []
    state = flows.train_flow(small(**{"train.epochs": 1, "registry.enabled": False}), return_state=True)
    assert state.is_completed()
    assert (sorted(storage.rglob("*")) if storage.exists() else []) == before
    assert [name for name, _, _ in asyncio.run(task_runs_of(state.state_details.flow_run_id))] == [
        "fetch and verify data", "prepare data", "train", "evaluate on the test set",
        "find or train the data set's classifier", "sample quality (FID)", "log test metrics and pictures",
    ]


class PowerCut(Exception):
    """Stands for whatever stops a run half-way: a crash, a killed job, a lost machine."""


@pytest.mark.timeout(LONG_TEST_SECONDS)
@needs_data
def test_an_interrupted_run_resumes_in_the_same_mlflow_run_to_the_result_of_an_uninterrupted_one(monkeypatch, tmp_path):
    config = small(**{"train.epochs": 4})
    uninterrupted = flows.train_flow(config)

    log_epoch = tracking.MLflowCallback.on_epoch_end

    def cut_after_epoch_2(callback, state):
        log_epoch(callback, state)  # the epoch's metrics, samples and checkpoint reach MLflow, then the power goes
        if state.epoch == 2:
            raise PowerCut("power cut after epoch 2")

    with monkeypatch.context() as patch:
        patch.setattr(tracking.MLflowCallback, "on_epoch_end", cut_after_epoch_2)
        state = flows.train_flow(config, return_state=True)
    assert state.is_failed()
    client = MlflowClient()
    (interrupted,) = [r for r in client.search_runs([tracking.experiment("mnist")]) if r.info.status == "FAILED"]
    assert interrupted.data.tags["error"] == "PowerCut: power cut after epoch 2"

    resumed = flows.train_flow(tracking.run_config(interrupted.info.run_id), resume_run_id=interrupted.info.run_id)
    assert resumed.run_id == interrupted.info.run_id
    run = client.get_run(resumed.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "1" and "error" not in run.data.tags
    assert [m.step for m in client.get_metric_history(resumed.run_id, "train_elbo_nats")] == [1, 2, 3, 4]
    assert resumed.metrics == uninterrupted.metrics  # bit-identical training, so identical test metrics
    assert resumed.version == "2" and client.get_model_version("vae-mnist", "2").run_id == resumed.run_id
    gif = Path(client.download_artifacts(resumed.run_id, "samples/samples.gif", str(tmp_path)))
    with Image.open(gif) as frames:
        assert frames.n_frames == 4


@needs_data
def test_the_run_id_and_resume_command_are_printed_and_recorded_before_any_work(caplog):
    assert cli.main(["train", *(arg for key, value in SMALL.items() for arg in ("--set", f"{key}={json.dumps(value)}"))]) == 0
    (run,) = MlflowClient().search_runs([tracking.experiment("mnist")])
    command = f"{sys.executable} {PROJECT_ROOT / 'flows.py'} train --resume {run.info.run_id}"  # the store is the default
    announced = f"MLflow run {run.info.run_id} (experiment vae-mnist); if it is interrupted, resume it with:\n  {command}"
    # Printed inside the flow, the lines are the flow run's log records (tests/test_cli_processes.py sees the console).
    printed = [record.getMessage() for record in caplog.records if record.name.startswith("prefect.")]
    assert announced in printed
    first_epoch = next(number for number, message in enumerate(printed) if message.startswith("epoch 1/2: "))
    assert printed.index(announced) < first_epoch
    assert run.data.tags["resume_command"] == command
    assert (run.data.tags["process.host"], run.data.tags["process.pid"]) == (socket.gethostname(), str(os.getpid()))


def test_resuming_a_run_whose_process_is_alive_is_refused_before_any_work(capsys):
    tracking.ensure_store()
    client = MlflowClient()
    run_id = client.create_run(tracking.experiment("mnist"), tags=tracking.process_tags()).info.run_id  # RUNNING here
    client.log_dict(run_id, small().model_dump(mode="json"), tracking.CONFIG_ARTIFACT)
    assert cli.main(["train", "--resume", run_id]) == 2
    assert client.get_run(run_id).info.status == "RUNNING"
    assert capsys.readouterr().err == (
        f"error: run {run_id} is still running in process {os.getpid()} on this host ({socket.gethostname()}): "
        "stop that process first, or wait for it to finish\n"
    )


def test_resuming_a_run_that_does_not_exist_is_a_clear_error(capsys):
    assert cli.main(["train", "--resume", "0123456789abcdef"]) == 2
    assert "run 0123456789abcdef has no readable config.json" in capsys.readouterr().err


@pytest.mark.timeout(LONG_TEST_SECONDS)
@needs_data
def test_evaluate_generate_and_promote_work_on_registered_models(tmp_path, capsys, progress_at_every_update):
    first = flows.train_flow(small(**{"train.epochs": 3}))
    second = flows.train_flow(small(**{"train.epochs": 1}))
    assert (first.alias, second.alias) == ("champion", "challenger")
    capsys.readouterr()

    assert cli.main(["evaluate", "models:/vae-mnist@champion", "--json"]) == 0
    printed = capsys.readouterr()
    evaluated = json.loads(printed.out)  # stdout is the JSON object alone, for scripts ...
    assert "IWAE bound (k=" in printed.err  # ... while progress lines (one per update here) go to stderr
    assert evaluated["run_id"] == first.run_id
    assert {name: evaluated[name] for name in first.metrics} == first.metrics  # same weights, data and seed
    assert cli.main(["evaluate", second.run_id, "--iwae-samples", "8"]) == 0
    printed = capsys.readouterr().out
    assert f"runs:/{second.run_id}/model" in printed and "k=8" in printed

    picture = tmp_path / "samples.png"
    assert cli.main(["generate", "vae-mnist", "-n", "10", "-o", str(picture)]) == 0
    with Image.open(picture) as image:
        assert image.size == (((28 + 2) * 4 + 2) * 2, ((28 + 2) * 3 + 2) * 2)  # 10 images: 3 rows of 4

    assert cli.main(["promote", "vae-mnist", "2", "--reason", "sharper samples"]) == 0
    assert aliases() == {"champion": "2"}
    assert MlflowClient().get_model_version("vae-mnist", "2").tags["promoted_by_hand"] == "sharper samples"
    assert cli.main(["promote", "vae-mnist", "9", "--reason", "typo"]) == 1
    assert "registered model 'vae-mnist' has no version 9 (its versions: 1, 2)" in capsys.readouterr().err
    assert cli.main(["evaluate", "models:/vae-fashion-mnist@champion"]) == 1
    assert "no model 'models:/vae-fashion-mnist@champion'" in capsys.readouterr().err
