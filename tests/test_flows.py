"""Specification of the training flow, read back through MLflow's and Prefect's clients, and of its command line."""

import asyncio
import gzip
import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

import flows
from pipeline import cli, data, tracking
from pipeline.config import PRESETS, load_config
from tests.conftest import needs_mirror

pytestmark = pytest.mark.usefixtures("prefect_server", "mlflow_store")

SMALL = {
    "data.train_subset": 600, "data.validation_size": 300, "model.hidden_dims": [64], "model.latent_dim": 2,
    "train.batch_size": 100, "train.device": "cpu", "train.epochs": 2, "eval.iwae_samples": 4,
}


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


@needs_mirror
def test_the_training_flow_tracks_params_metrics_images_and_registers_a_model_that_samples():
    config = small()
    outcome = flows.train_flow(config)
    client = MlflowClient()
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == tracking.flat_params(config)
    for metric in ("train_loss", "train_elbo_nats", "train_reconstruction_nats", "train_kl_nats", "val_elbo_nats", "val_reconstruction_nats", "val_kl_nats"):
        assert [m.step for m in client.get_metric_history(outcome.run_id, metric)] == [1, 2], metric
    assert set(outcome.metrics) == {"test_elbo_nats", "test_reconstruction_nats", "test_kl_nats", "test_nll_nats", "test_bits_per_dim"}
    assert {name: run.data.metrics[name] for name in outcome.metrics} == pytest.approx(outcome.metrics)
    assert run.data.tags["dataset_digest"] == data.DATASETS["mnist"].digest
    contexts = {tag.value: json.loads(item.dataset.profile)["num_rows"] for item in run.inputs.dataset_inputs for tag in item.tags}
    assert contexts == {"training": 600, "validation": 300, "test": 10_000}

    files = artifact_paths(client, outcome.run_id)
    assert [f for f in files if not f.startswith("images/")] == [
        "checkpoint/checkpoint.pt", "config.json", "latent_manifold.png", "latent_space.png", "loss_curves.png",
        "reconstructions.png", "samples/samples.gif",
    ]
    assert sorted(f.split("+")[2] for f in files if f.startswith("images/samples+") and f.endswith(".png")) == ["1", "2"]
    assert tracking.run_config(outcome.run_id) == config

    assert (outcome.registered_model, outcome.version, outcome.alias) == ("vae-mnist", "1", "champion")
    version = client.get_model_version("vae-mnist", "1")
    assert version.tags["run_id"] == outcome.run_id
    assert float(version.tags["test_nll_nats"]) == pytest.approx(outcome.metrics["test_nll_nats"])
    model = mlflow.pytorch.load_model("models:/vae-mnist@champion")
    assert model.sample(3, generator=torch.Generator().manual_seed(0)).shape == (3, 1, 28, 28)
    assert model.decode(torch.zeros(2, 2)).shape == (2, 1, 28, 28)

    summary = asyncio.run(read_markdown_artifact(flows.SUMMARY_ARTIFACT_KEY))
    assert outcome.run_id in summary and "alias **champion**" in summary and "test_nll_nats" in summary


@needs_mirror
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


@needs_mirror
def test_the_promotion_margin_keeps_a_slightly_better_model_as_challenger():
    flows.train_flow(small(**{"train.epochs": 3}))
    slightly = flows.train_flow(small(**{"train.epochs": 3, "train.seed": 1, "registry.promotion_margin_nats": 1000.0}))
    assert slightly.alias == "challenger" and "margin 1000.00" in slightly.promotion_reason


@needs_mirror
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
    monkeypatch.setitem(data.DATASETS, "mnist", data.DatasetSpec(spec.name, ("http://127.0.0.1:9/",), spec.sha256, spec.class_names))
    monkeypatch.setenv("VAE_DATA_MIRROR", str(tmp_path / "mirror"))
    monkeypatch.setattr(flows, "fetch_data", flows.fetch_data.with_options(retries=0))
    config = small(**{"data.cache_dir": str(tmp_path / "cache")})
    with pytest.warns(UserWarning, match="decompressed sha256 is"):
        state = flows.train_flow(config, return_state=True)
    assert state.is_failed()
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


@needs_mirror
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_one_epoch_through_the_command_line(preset, capsys):
    quick = ["--epochs", "1", "--device", "cpu", "--set", "data.train_subset=256", "--set", "eval.iwae_samples=2"]
    if PRESETS[preset]["data"].get("validation_size", 10_000):
        quick += ["--set", "data.validation_size=500"]
    assert cli.main(["train", "--preset", preset, *quick]) == 0
    printed = capsys.readouterr().out
    assert f"{preset} on {PRESETS[preset]['data']['dataset']}: 1 epochs" in printed
    assert "registered      models:/vae-" in printed
    (run,) = MlflowClient().search_runs([tracking.experiment(PRESETS[preset]["data"]["dataset"])], filter_string=f"params.preset = '{preset}'")
    assert run.info.status == "FINISHED" and json.loads(run.data.params["model.hidden_dims"]) == list(load_config(preset).model.hidden_dims)


async def prepare_task_states(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="prepare data")),
        )
        return [run.state.name for run in runs]


@needs_mirror
def test_a_second_run_with_the_same_data_settings_reads_the_prepared_data_from_the_cache():
    config = small(**{"data.split_seed": 12345})  # data settings no other test uses
    first = flows.train_flow(config, return_state=True)
    second = flows.train_flow(small(**{"data.split_seed": 12345, "train.seed": 7}), return_state=True)
    assert asyncio.run(prepare_task_states(first.state_details.flow_run_id)) == ["Completed"]
    assert asyncio.run(prepare_task_states(second.state_details.flow_run_id)) == ["Cached"]
    other = flows.train_flow(small(**{"data.split_seed": 12346}), return_state=True)
    assert asyncio.run(prepare_task_states(other.state_details.flow_run_id)) == ["Completed"]


class PowerCut(Exception):
    """Stands for whatever stops a run half-way: a crash, a killed job, a lost machine."""


@needs_mirror
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


def test_resuming_a_run_that_does_not_exist_is_a_clear_error(capsys):
    assert cli.main(["train", "--resume", "0123456789abcdef"]) == 2
    assert "run 0123456789abcdef has no readable config.json" in capsys.readouterr().err


@needs_mirror
def test_evaluate_generate_and_promote_work_on_registered_models(tmp_path, capsys):
    first = flows.train_flow(small(**{"train.epochs": 3}))
    second = flows.train_flow(small(**{"train.epochs": 1}))
    assert (first.alias, second.alias) == ("champion", "challenger")
    capsys.readouterr()

    assert cli.main(["evaluate", "models:/vae-mnist@champion", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
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
