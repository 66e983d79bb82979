"""Specification of the sweep flow on a local Dask cluster, read back through MLflow's and Prefect's clients."""

import asyncio
import json

import pandas as pd
import pytest
from mlflow import MlflowClient

import flows
from pipeline import cli, tracking
from pipeline.config import load_config
from tests.conftest import needs_mirror

pytestmark = pytest.mark.usefixtures("prefect_server", "mlflow_store")

TINY = {
    "data.train_subset": 300, "data.validation_size": 200, "model.hidden_dims": [32], "model.latent_dim": 2,
    "train.optimizer": "rmsprop", "train.batch_size": 100, "train.epochs": 1, "train.device": "cpu", "eval.iwae_samples": 2,
}
TINY_ARGS = [arg for name, value in TINY.items() for arg in ("--set", f"{name}={json.dumps(value)}")]
DIVERGES = 1e12  # a learning rate whose loss is NaN at the second step
LEADERBOARD_COLUMNS = ["trial", "run_id", "status", "train.learning_rate", "test_elbo_nats", "test_nll_nats", "training_minutes", "error"]


def runs_of_the_sweep(client: MlflowClient):
    """The parent run and its nested runs (in trial order) of the one sweep in the store."""
    runs = client.search_runs([tracking.experiment("mnist")])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    nested = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 1 + len(nested)
    return parent, sorted(nested, key=lambda run: int(run.data.tags["sweep.trial"]))


def read_leaderboard(client: MlflowClient, run_id: str, directory) -> pd.DataFrame:
    return pd.read_csv(client.download_artifacts(run_id, flows.LEADERBOARD_FILE, str(directory)))


async def read_table_artifact(key: str) -> list[dict]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return json.loads(next(a.data for a in await client.read_latest_artifacts() if a.key == key))


async def read_trial_task_runs(flow_run_id) -> dict[str, str]:
    """The final state of each trial's task run, as the Prefect server (not the Dask worker) knows it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return {run.name: run.state.type.value for run in runs if run.name.startswith("trial-")}


@needs_mirror
def test_a_sweep_trains_its_trials_in_parallel_under_one_run_ranks_them_and_registers_the_best(tmp_path, monkeypatch):
    # The default store (mlruns/, here the test's): the Dask workers, which do not share this process's settings, must
    # be told where it is, or their runs would land in the project's own store.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    base = load_config("default", TINY)
    state = flows.sweep_flow(base, {"train.learning_rate": [0.001, 0.003, DIVERGES]}, return_state=True)
    outcome = state.result()
    # The workers reported their task runs to the test's Prefect server, not to servers of their own.
    trial_runs = asyncio.run(read_trial_task_runs(state.state_details.flow_run_id))
    assert trial_runs == {"trial-1": "COMPLETED", "trial-2": "COMPLETED", "trial-3": "FAILED"}

    client = MlflowClient()
    parent, nested = runs_of_the_sweep(client)
    assert parent.info.run_id == outcome.run_id and parent.info.status == "FINISHED"
    assert parent.data.params["sweep.train.learning_rate"] == "[0.001, 0.003, 1000000000000.0]"
    assert [run.info.run_name for run in nested] == ["trial-1", "trial-2", "trial-3"]
    assert [run.info.status for run in nested] == ["FINISHED", "FINISHED", "FAILED"]
    for run, rate in zip(nested, [0.001, 0.003, DIVERGES]):
        assert run.data.params == tracking.flat_params(load_config("default", TINY | {"train.learning_rate": rate}))
    assert nested[2].data.tags["error"].startswith("NonFiniteLossError: non-finite loss (nan) at epoch 1, step 2")
    for run in nested[:2]:
        files = {info.path for info in client.list_artifacts(run.info.run_id)}
        assert {"config.json", "latent_manifold.png", "latent_space.png", "loss_curves.png", "reconstructions.png"} <= files
        assert {"test_elbo_nats", "test_nll_nats", "train_loss", "val_elbo_nats", "training_minutes"} <= set(run.data.metrics)

    ranked = sorted(nested[:2], key=lambda run: run.data.metrics["test_nll_nats"])
    board = read_leaderboard(client, parent.info.run_id, tmp_path)
    assert list(board.columns) == LEADERBOARD_COLUMNS
    assert board["run_id"].tolist() == [run.info.run_id for run in [*ranked, nested[2]]]
    assert board["trial"].tolist() == [int(run.data.tags["sweep.trial"]) for run in ranked] + [3]
    assert board["status"].tolist() == ["finished", "finished", "failed"]
    assert board["train.learning_rate"].tolist() == [float(run.data.params["train.learning_rate"]) for run in ranked] + [DIVERGES]
    assert board["test_nll_nats"].tolist()[:2] == pytest.approx([run.data.metrics["test_nll_nats"] for run in ranked])
    assert board["test_elbo_nats"].tolist()[:2] == pytest.approx([run.data.metrics["test_elbo_nats"] for run in ranked])
    assert board.loc[2, ["test_elbo_nats", "test_nll_nats", "training_minutes"]].isna().all()
    # Each finished trial's training time is the one its run logged after its last epoch.
    assert board["training_minutes"].tolist()[:2] == pytest.approx([run.data.metrics["training_minutes"] for run in ranked])
    assert board["error"].isna().tolist()[:2] == [True, True]
    assert board.at[2, "error"] == nested[2].data.tags["error"]
    table = asyncio.run(read_table_artifact(flows.LEADERBOARD_ARTIFACT_KEY))
    assert [row["run_id"] for row in table] == board["run_id"].tolist()
    assert table[2]["status"] == "failed" and table[2]["test_nll_nats"] is None

    best = ranked[0].info.run_id
    assert (outcome.best_run_id, outcome.registered_model, outcome.version, outcome.alias) == (best, "vae-mnist", "1", "champion")
    assert parent.data.tags["sweep.best_run_id"] == best
    (version,) = client.search_model_versions("name = 'vae-mnist'")
    assert (str(version.version), version.run_id, version.tags["run_id"]) == ("1", best, best)
    assert {alias: str(number) for alias, number in client.get_registered_model("vae-mnist").aliases.items()} == {"champion": "1"}
    assert float(version.tags["test_nll_nats"]) == pytest.approx(ranked[0].data.metrics["test_nll_nats"])


@needs_mirror
def test_when_every_trial_fails_the_sweep_fails_saying_so_and_registers_nothing(tmp_path, capsys):
    code = cli.main(["sweep", *TINY_ARGS, "--grid", f"train.learning_rate={DIVERGES},1e13", "--workers", "1"])
    assert code == 1
    assert "error: the sweep failed: " in capsys.readouterr().err
    client = MlflowClient()
    parent, nested = runs_of_the_sweep(client)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["error"].startswith("SweepError: all 2 trials failed, so nothing is registered (trial 1: NonFiniteLossError")
    assert [run.info.status for run in nested] == ["FAILED", "FAILED"]
    board = read_leaderboard(client, parent.info.run_id, tmp_path)
    assert board["trial"].tolist() == [1, 2] and board["status"].tolist() == ["failed", "failed"]
    assert client.search_registered_models() == []


def test_a_bad_grid_value_on_the_command_line_fails_naming_the_field_before_any_run(capsys):
    assert cli.main(["sweep", "--grid", "model.latent_dim=2,-1", "--grid", "objective.beta=0.5"]) == 2
    assert capsys.readouterr().err == (
        "error: trial 2 of 2 (model.latent_dim=-1, objective.beta=0.5): invalid config:\n"
        "  model.latent_dim: Input should be greater than 0 (got -1)\n"
    )
    assert MlflowClient().search_runs([tracking.experiment("mnist")]) == []


def test_a_field_that_cannot_be_swept_is_refused_on_the_command_line(capsys):
    assert cli.main(["sweep", "--grid", "data.dataset=mnist,fashion-mnist"]) == 2
    assert "error: data.dataset cannot be swept: the trials' test scores compare only when" in capsys.readouterr().err


def test_a_bad_flow_parameter_fails_the_sweep_before_any_run():
    state = flows.sweep_flow(load_config("default", TINY), {"model.latent_dim": [0]}, return_state=True)
    assert state.is_failed()
    assert "model.latent_dim: Input should be greater than 0 (got 0)" in state.message
    assert MlflowClient().search_runs([tracking.experiment("mnist")]) == []
