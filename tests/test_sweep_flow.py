"""Specification of the sweep flow on a local Dask cluster, read back through MLflow's and Prefect's clients."""

import asyncio
import datetime
import ipaddress
import json
import os
import shlex
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pandas as pd
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from distributed import Client
from mlflow import MlflowClient

import flows
from pipeline import cli, tracking
from pipeline.config import load_config
from tests.conftest import PROJECT_ROOT, TINY_CLASSIFIER, descendants, free_port, is_loopback, listening_sockets, needs_data, running

pytestmark = pytest.mark.usefixtures("prefect_server", "mlflow_store")

TINY = {
    "data.train_subset": 300, "data.validation_size": 200, "model.hidden_dims": [32], "model.latent_dim": 2,
    "train.optimizer": "rmsprop", "train.batch_size": 100, "train.epochs": 1, "train.device": "cpu", "eval.iwae_samples": 2,
    **TINY_CLASSIFIER,
}
TINY_ARGS = [arg for name, value in TINY.items() for arg in ("--set", f"{name}={json.dumps(value)}")]
DIVERGES = 1e12  # a learning rate whose loss is NaN at the second step
LEADERBOARD_COLUMNS = [
    "trial", "run_id", "status", "train.learning_rate", "val_elbo_nats", "test_elbo_nats", "test_nll_nats", "training_minutes", "error",
]


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


@needs_data
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
        assert {"test_elbo_nats", "test_nll_nats", "test_fid", "train_loss", "val_elbo_nats", "training_minutes"} <= set(run.data.metrics)
        assert run.data.tags["fid.classifier"] == "models:/classifier-mnist/1"
    # The sweep trained the classifier once, before its trials, which all found it.
    assert len(client.search_runs([tracking.named_experiment("classifier-mnist")])) == 1

    # Ranked by the validation ELBO of the one epoch each trial trained (its model's), highest first.
    ranked = sorted(nested[:2], key=lambda run: -run.data.metrics["val_elbo_nats"])
    board = read_leaderboard(client, parent.info.run_id, tmp_path)
    assert list(board.columns) == LEADERBOARD_COLUMNS
    assert board["run_id"].tolist() == [run.info.run_id for run in [*ranked, nested[2]]]
    assert board["trial"].tolist() == [int(run.data.tags["sweep.trial"]) for run in ranked] + [3]
    assert board["status"].tolist() == ["finished", "finished", "failed"]
    assert board["train.learning_rate"].tolist() == [float(run.data.params["train.learning_rate"]) for run in ranked] + [DIVERGES]
    assert board["val_elbo_nats"].tolist()[:2] == pytest.approx([run.data.metrics["val_elbo_nats"] for run in ranked])
    assert board["test_nll_nats"].tolist()[:2] == pytest.approx([run.data.metrics["test_nll_nats"] for run in ranked])
    assert board["test_elbo_nats"].tolist()[:2] == pytest.approx([run.data.metrics["test_elbo_nats"] for run in ranked])
    assert board.loc[2, ["val_elbo_nats", "test_elbo_nats", "test_nll_nats", "training_minutes"]].isna().all()
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


@needs_data
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
    # No model; only the data set's classifier, trained before the trials, which later runs will reuse.
    assert [model.name for model in client.search_registered_models()] == ["classifier-mnist"]


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


# --- Dask listens on loopback, or speaks TLS ------------------------------------------------------------------------

DASK = str(Path(sys.executable).with_name("dask"))


def test_the_local_dask_cluster_of_a_sweep_listens_on_loopback_only():
    before = listening_sockets([os.getpid()])
    with flows.dask_task_runner() as runner:
        client = runner.client
        processes = {os.getpid(), *client.run(os.getpid).values()}  # the scheduler and nannies here, the workers
        sockets = listening_sockets(processes) - before
        scheduler, dashboard = urllib.parse.urlsplit(client.scheduler.address), urllib.parse.urlsplit(client.dashboard_link)

    assert {scheduler.port, dashboard.port} <= {port for _, port in sockets}
    assert len(sockets) >= 2 + flows.LOCAL_WORKERS, sockets
    assert [address for address, _ in sockets if not is_loopback(address)] == []


def readme_command(program: str, port: int, dashboard: int) -> list[str]:
    """The README's first ``.venv/bin/dask <program>`` command (the one-machine cluster), on the given ports, with
    one worker process."""
    readme = (PROJECT_ROOT / "README.md").read_text().splitlines()
    line = next(line for line in readme if line.startswith(f".venv/bin/dask {program}"))
    words = [DASK if word == ".venv/bin/dask" else word for word in shlex.split(line, comments=True)]
    words = [word.replace("127.0.0.1:8786", f"127.0.0.1:{port}").replace("127.0.0.1:8787", f"127.0.0.1:{dashboard}") for word in words]
    if "--nworkers" in words:
        words[words.index("--nworkers") + 1] = "1"
    return words + (["--port", str(port)] if program == "scheduler" else [])


def test_the_readme_dask_cluster_for_one_machine_listens_on_loopback_only(tmp_path):
    port, dashboard = free_port(), free_port()
    scheduler_command, worker_command = readme_command("scheduler", port, dashboard), readme_command("worker", port, dashboard)

    with running(scheduler_command, ready_url=f"http://127.0.0.1:{dashboard}/health", log=tmp_path / "scheduler.log") as scheduler:
        with running(worker_command, ready_url=None, log=tmp_path / "worker.log") as worker:
            with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
                client.wait_for_workers(1, timeout=120)
                assert client.submit(sum, [1, 2]).result() == 3
                sockets = listening_sockets(descendants(scheduler.pid) + descendants(worker.pid))

    assert {port, dashboard} <= {found for _, found in sockets}
    assert len(sockets) >= 5, sockets  # the scheduler, the nanny and the worker, and their dashboards
    assert [address for address, _ in sockets if not is_loopback(address)] == []


def certificates(directory: Path) -> dict[str, Path]:
    """A certificate authority of its own (ca.pem) and a certificate and key for 127.0.0.1 it signed (node.pem,
    node-key.pem), valid for a day."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def signed(subject: str, key, issuer: str, issuer_key, *, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, node_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    paths = {name: directory / name for name in ("ca.pem", "node.pem", "node-key.pem")}
    paths["ca.pem"].write_bytes(signed("test CA", ca_key, "test CA", ca_key, ca=True).public_bytes(serialization.Encoding.PEM))
    paths["node.pem"].write_bytes(signed("127.0.0.1", node_key, "test CA", ca_key, ca=False).public_bytes(serialization.Encoding.PEM))
    paths["node-key.pem"].write_bytes(
        node_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def test_a_tls_dask_cluster_as_the_readme_starts_it_runs_work_only_for_clients_with_a_certificate_of_its_ca(tmp_path):
    certs = certificates(tmp_path)
    tls = ["--tls-ca-file", str(certs["ca.pem"]), "--tls-cert", str(certs["node.pem"]), "--tls-key", str(certs["node-key.pem"])]
    port, dashboard = free_port(), free_port()
    scheduler_command = [DASK, "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", str(port),
                         "--dashboard-address", f"127.0.0.1:{dashboard}", *tls]
    worker_command = [DASK, "worker", f"tls://127.0.0.1:{port}", "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0",
                      "--nworkers", "1", "--nthreads", "1", *tls]
    client_env = {  # the README's, for the sweep's client
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "true", "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(certs["ca.pem"]),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(certs["node.pem"]),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(certs["node-key.pem"]),
    }
    through_the_sweeps_runner = (
        "import sys, flows\n"
        "with flows.dask_task_runner(sys.argv[1]) as runner:\n"
        "    runner.client.wait_for_workers(1, timeout=120)\n"
        "    print(runner.client.submit(sum, [1, 2]).result())\n"
    )

    with running(scheduler_command, ready_url=f"http://127.0.0.1:{dashboard}/health", log=tmp_path / "scheduler.log"):
        with running(worker_command, ready_url=None, log=tmp_path / "worker.log"):
            certified = subprocess.run(
                [sys.executable, "-c", through_the_sweeps_runner, f"tls://127.0.0.1:{port}"], cwd=PROJECT_ROOT,
                env={**os.environ, **client_env}, capture_output=True, text=True, timeout=300,
            )
            with pytest.raises(OSError):  # the scheduler hangs up on a client that does not speak TLS
                Client(f"tcp://127.0.0.1:{port}", timeout=10)

    assert (certified.returncode, certified.stdout.splitlines()[-1:]) == (0, ["3"]), certified.stderr[-3000:]


@pytest.mark.parametrize(
    ("address", "warned"),
    [
        ("tcp://10.1.2.3:8786", True), ("scheduler.example.org:8786", True), ("tcp://192.0.2.7:8786", True),
        ("tls://10.1.2.3:8786", False), ("tcp://127.0.0.1:8786", False), ("localhost:8786", False),
        ("tcp://[::1]:8786", False),
    ],
)
def test_a_plain_tcp_dask_address_beyond_this_machine_gets_a_warning(address, warned):
    warning = cli.dask_address_warning(address)

    assert (warning is not None) == warned
    if warned:
        assert warning.startswith(f"the Dask scheduler at {address} is reached without TLS: Dask runs the pickled")
