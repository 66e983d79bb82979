"""Specification of scheduled retraining: `flows.py serve` against a real `prefect server start`, read back through
Prefect's and MLflow's clients."""

import re
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey, DeploymentFilter, DeploymentFilterId,
)
from prefect.settings import PREFECT_API_URL, temporary_settings

import flows
from pipeline import cli
from pipeline.config import load_config
from tests.conftest import LONG_TEST_SECONDS, TINY_RUN, needs_data, refused_port, running, serving

TINY = [
    "--set", "data.train_subset=300", "--set", "data.validation_size=200", "--set", "model.hidden_dims=[32]",
    "--set", "eval.iwae_samples=2", "--set", "eval.fid=false", "--epochs", "1", "--device", "cpu",
]
CRON, TIMEZONE, NAME = "15 4 * * 2", "Europe/Paris", "nightly-test"
RUN_TIMEOUT_SECONDS = 900  # a flow run of the tiny config takes about 45 s on two busy cores, minutes on loaded ones


def executable(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def wait_for_flow_run(client, flow_run_id, log: Path):
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while not (flow_run := client.read_flow_run(flow_run_id)).state.is_final():
        assert time.monotonic() < deadline, f"flow run still {flow_run.state.name} after {RUN_TIMEOUT_SECONDS} s:\n{log.read_text()[-3000:]}"
        time.sleep(1)
    return flow_run


def mlflow_run_of(client, flow_run_id) -> str:
    """The MLflow run that a flow run reports in its summary artifact."""
    (summary,) = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[flows.SUMMARY_ARTIFACT_KEY])
        )
    )
    return re.search(r"Run `([0-9a-f]{32})`", summary.data).group(1)


@pytest.mark.timeout(LONG_TEST_SECONDS)
@needs_data
def test_serve_creates_a_cron_deployment_whose_every_run_is_a_new_mlflow_run_and_version_competing_for_champion(
    tmp_path, mlflow_store
):
    server = lambda port: [executable("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]  # noqa: E731
    server_env = {"PREFECT_HOME": str(tmp_path / "server-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    serve = [sys.executable, "flows.py", "serve", *TINY, "--cron", CRON, "--timezone", TIMEZONE, "--name", NAME]
    serve_log = tmp_path / "serve.log"
    with serving(server, ready_path="/api/health", log=tmp_path / "server.log", env=server_env) as prefect_server, \
            temporary_settings(updates={PREFECT_API_URL: f"{prefect_server.url}/api"}), get_client(sync_client=True) as prefect:
        api_url = f"{prefect_server.url}/api"
        serve_env = {
            "PREFECT_API_URL": api_url,
            "PREFECT_HOME": str(tmp_path / "serve-home"),
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # pick up a triggered run within a second, not the default 10
            "MLFLOW_TRACKING_URI": mlflow_store,
        }
        # `serve` is ready when its deployment exists on the server.
        with running(serve, ready_url=f"{api_url}/deployments/name/train-vae/{NAME}", log=serve_log, env=serve_env):
            deployment = prefect.read_deployment_by_name(f"train-vae/{NAME}")
            assert deployment.paused is False
            ((schedule, active),) = [(s.schedule, s.active) for s in deployment.schedules]
            assert (schedule.cron, schedule.timezone, active) == (CRON, TIMEZONE, True)
            assert deployment.parameters == {"config": load_config("default", TINY_RUN).model_dump(mode="json")}
            assert f"run it now    prefect deployment run 'train-vae/{NAME}'" in serve_log.read_text()

            outcomes = []
            for _ in range(2):
                flow_run = prefect.create_flow_run_from_deployment(deployment.id)
                finished = wait_for_flow_run(prefect, flow_run.id, serve_log)
                assert finished.state.is_completed(), f"{finished.state.message}\n{serve_log.read_text()[-3000:]}"
                outcomes.append(mlflow_run_of(prefect, flow_run.id))

            # The server itself schedules the next runs at the cron times, the first at the next one.
            auto_scheduled = sorted(
                run.expected_start_time
                for run in prefect.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
                if run.auto_scheduled
            )
            assert auto_scheduled, f"the server scheduled no runs; the end of its log:\n{(tmp_path / 'server.log').read_text()[-3000:]}"
            assert auto_scheduled[0] == flows.next_run_time(flows.retraining_schedule(CRON, TIMEZONE))
        # Stopping `serve` (Ctrl-C or SIGTERM) pauses the schedule: nothing would run the scheduled runs.
        assert prefect.read_deployment_by_name(f"train-vae/{NAME}").paused is True

    mlflow = MlflowClient(mlflow_store)
    first, second = outcomes
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("vae-mnist").experiment_id], order_by=["attributes.start_time"])
    assert [(run.info.run_id, run.info.status) for run in runs] == [(first, "FINISHED"), (second, "FINISHED")]
    versions = {version: mlflow.get_model_version("vae-mnist", version) for version in ("1", "2")}
    assert (versions["1"].run_id, versions["2"].run_id) == (first, second)
    assert (versions["1"].tags["run_id"], versions["2"].tags["run_id"]) == (first, second)
    # The same config and seed train bit-identical models: the second run ties, so it does not beat the champion.
    aliases = {alias: str(version) for alias, version in mlflow.get_registered_model("vae-mnist").aliases.items()}
    assert aliases == {"champion": "1", "challenger": "2"}
    assert "does not beat champion v1" in versions["2"].tags["promotion.reason"]


def test_serve_without_a_prefect_server_refuses_and_says_how_to_start_one(capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # the session's test server is not configured here
        assert cli.main(["serve", *TINY]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: scheduled retraining needs a Prefect server, and PREFECT_API_URL names none")
    assert "prefect server start" in error
    assert "export PREFECT_API_URL=http://127.0.0.1:4200/api" in error


def test_serve_with_an_unreachable_prefect_server_refuses_naming_it(capsys):
    with refused_port() as port, temporary_settings(updates={PREFECT_API_URL: (api_url := f"http://127.0.0.1:{port}/api")}):
        assert cli.main(["serve", *TINY]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: no Prefect server answers at PREFECT_API_URL={api_url}")
    assert "`prefect server start`" in error


@pytest.mark.parametrize(
    "options, message",
    [
        (["--cron", "every monday"], "error: --cron 'every monday' is not a cron expression: expected minute hour day-of-month month day-of-week"),
        (["--cron", "0 3 * *"], "error: --cron '0 3 * *' is not a cron expression"),
        (["--timezone", "Mars/Olympus"], "error: --timezone 'Mars/Olympus' is not an IANA time zone name"),
        (["--set", "train.learning_rate=-1"], "train.learning_rate: Input should be greater than 0 (got -1)"),
    ],
)
def test_serve_with_a_bad_schedule_or_config_fails_before_anything_naming_the_option(options, message, capsys):
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert cli.main(["serve", *TINY, *options]) == 2
    assert message in capsys.readouterr().err


def test_the_default_schedule_is_weekly_on_monday_at_three_utc():
    schedule = flows.retraining_schedule(flows.DEFAULT_RETRAINING_CRON, "UTC")
    when = flows.next_run_time(schedule)
    assert (schedule.cron, schedule.timezone) == ("0 3 * * 1", "UTC")
    assert (when.isoweekday(), when.hour, when.minute, when.utcoffset().total_seconds()) == (1, 3, 0, 0)
