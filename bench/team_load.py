"""Load test of a team's setup: concurrent `flows.py train` processes against one `mlflow server` and one `prefect
server` on PostgreSQL, then every run, metric, image, version and alias read back through the servers and counted.

    VAE_DATA_MIRROR=../shared/data .venv/bin/python bench/team_load.py --flows 8 --epochs 5 --train-subset 2000

starts a PostgreSQL cluster and both servers in a temporary directory (see tests/team_servers.py), runs the flows,
prints the report (flows, runs, metrics written, wall time, anything lost) and writes it as JSON with --json.
tests/test_team_store.py runs the same functions on a small load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

# What each flow of the load trains: a small network on a few hundred images, so that 8 of them share 2 cores.
SMALL_FLOW = {
    "data.train_subset": 300, "data.validation_size": 200, "model.hidden_dims": [32], "model.latent_dim": 2,
    "train.batch_size": 100, "train.device": "cpu", "train.epochs": 2, "eval.iwae_samples": 2,
    "eval.fid": False,  # each flow would otherwise wait for the one that trains the data set's classifier
}
# Every epoch of every run logs these (step = epoch): the engine's training and validation terms and the epoch's time.
EPOCH_METRICS = (
    "train_loss", "train_elbo_nats", "train_reconstruction_nats", "train_kl_nats", "kl_weight",
    "val_elbo_nats", "val_reconstruction_nats", "val_kl_nats", "epoch_seconds",
)
TEST_METRICS = ("test_elbo_nats", "test_reconstruction_nats", "test_kl_nats", "test_nll_nats", "test_bits_per_dim")
# Every finished run holds these files besides its per-epoch sample grids (images/samples+step+<epoch>+...png).
RUN_FILES = (
    "checkpoint/checkpoint.pt", "config.json", "latent_manifold.png", "latent_space.png", "loss_curves.png",
    "reconstructions.png", "samples/samples.gif",
)


@dataclass
class LoadReport:
    """What a load run wrote and what of it reads back through the servers; ``lost`` lists every shortfall."""

    flows: int
    epochs: int
    wall_seconds: float
    flow_exit_codes: list[int]
    prefect_flow_runs_completed: int
    runs: int
    runs_finished: int
    metric_values: int  # per-epoch values (every metric, every step) plus the test metrics, read back
    images: int  # per-epoch sample grids plus the pictures of each run, read back
    versions: int
    champion: str | None
    best_version: str | None
    lost: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.flows} flows x {self.epochs} epochs in {self.wall_seconds:.1f} s: "
            f"{self.prefect_flow_runs_completed} Prefect flow runs completed, {self.runs_finished}/{self.runs} MLflow runs "
            f"FINISHED, {self.metric_values} metric values and {self.images} images read back, {self.versions} versions "
            f"registered, champion v{self.champion} (best v{self.best_version}); lost: {len(self.lost)}"
            + "".join(f"\n  - {problem}" for problem in self.lost)
        )


def flow_command(overrides: Mapping[str, object], seed: int) -> list[str]:
    """`flows.py train` with ``overrides`` and the training seed ``seed`` (each flow of a load trains its own model)."""
    settings = {**overrides, "train.seed": seed}
    return [sys.executable, "flows.py", "train", *(arg for key, value in settings.items() for arg in ("--set", f"{key}={json.dumps(value)}"))]


def flow_environment(tracking_uri: str, prefect_api_url: str, home: Path) -> dict[str, str]:
    """A flow process's environment on a team member's machine: both servers, its own Prefect home, one thread."""
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PREFECT_API_URL": prefect_api_url,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "OMP_NUM_THREADS": "1",  # the flows share the machine's cores
    }


def run_flows(
    flows: int, tracking_uri: str, prefect_api_url: str, directory: Path, overrides: Mapping[str, object] = SMALL_FLOW,
    timeout: float = 1800.0,
) -> tuple[list[int], float]:
    """Start ``flows`` `flows.py train` processes at once (seeds 0, 1, ...), wait for all; their exit codes and the wall
    time in seconds. Each one's output goes to ``directory/flow-<i>.log``."""
    processes = []
    started = time.perf_counter()
    for index in range(flows):
        with open(directory / f"flow-{index}.log", "w") as log:
            processes.append(subprocess.Popen(
                flow_command(overrides, seed=index), cwd=PROJECT_ROOT,
                env=flow_environment(tracking_uri, prefect_api_url, directory / f"flow-{index}-home"),
                stdout=log, stderr=subprocess.STDOUT,
            ))
    deadline = started + timeout
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(deadline - time.perf_counter(), 1)))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append(process.wait())
    return codes, time.perf_counter() - started


def audit(
    tracking_uri: str, prefect_api_url: str, *, flows: int, epochs: int, model_name: str = "vae-mnist",
    experiment: str = "vae-mnist", wall_seconds: float = 0.0, exit_codes: Sequence[int] = (),
) -> LoadReport:
    """Read everything back through the servers and count it against what ``flows`` flows of ``epochs`` epochs write."""
    from mlflow import MlflowClient

    from pipeline import registry

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    lost: list[str] = [f"flow {index} exited with {code}" for index, code in enumerate(exit_codes) if code != 0]
    completed = _completed_flow_runs(prefect_api_url)
    if completed != flows:
        lost.append(f"{completed} Prefect flow runs of train-vae completed, not {flows}")

    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found is not None else []
    if len(runs) != flows:
        lost.append(f"{len(runs)} MLflow runs in {experiment}, not {flows}")
    metric_values = images = finished = 0
    for run in runs:
        run_id = run.info.run_id
        if run.info.status == "FINISHED":
            finished += 1
        else:
            lost.append(f"run {run_id} is {run.info.status}")
        for name in EPOCH_METRICS:
            steps = [metric.step for metric in client.get_metric_history(run_id, name)]
            metric_values += len(steps)
            if sorted(steps) != list(range(1, epochs + 1)):
                lost.append(f"run {run_id}: {name} logged at steps {sorted(steps)}, not 1..{epochs}")
        for name in TEST_METRICS:
            if name in run.data.metrics:
                metric_values += 1
            else:
                lost.append(f"run {run_id}: no {name}")
        files = artifact_paths(client, run_id)
        grids = sample_grid_epochs(files)
        images += len(grids) + sum(path.endswith((".png", ".gif")) for path in RUN_FILES if path in files)
        if grids != list(range(1, epochs + 1)):
            lost.append(f"run {run_id}: sample grids of epochs {grids}, not 1..{epochs}")
        missing = sorted(set(RUN_FILES) - set(files))
        if missing:
            lost.append(f"run {run_id}: missing {', '.join(missing)}")

    versions = registry.versions_of(client, model_name) if runs else []
    if sorted(str(version.run_id) for version in versions) != sorted(run.info.run_id for run in runs):
        lost.append(f"{len(versions)} versions of {model_name} registered for the {len(runs)} runs")
    aliases = {alias: str(number) for alias, number in client.get_registered_model(model_name).aliases.items()} if versions else {}
    # margin 0 and comparable test numbers: the champion must be the version with the lowest NLL (the first of equals)
    best = min(versions, key=lambda v: (float(v.tags["test_nll_nats"]), int(v.version)), default=None)
    best_version = None if best is None else str(best.version)
    if aliases.get(registry.CHAMPION) != best_version:
        lost.append(f"champion is v{aliases.get(registry.CHAMPION)}, the best version is v{best_version}")
    return LoadReport(
        flows=flows, epochs=epochs, wall_seconds=wall_seconds, flow_exit_codes=list(exit_codes),
        prefect_flow_runs_completed=completed, runs=len(runs), runs_finished=finished, metric_values=metric_values,
        images=images, versions=len(versions), champion=aliases.get(registry.CHAMPION), best_version=best_version,
        lost=lost,
    )


def artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    """Every file a run logged, read back through the client."""
    files = []
    for info in client.list_artifacts(run_id, path):
        files.extend(artifact_paths(client, run_id, info.path) if info.is_dir else [info.path])
    return files


def sample_grid_epochs(files: Sequence[str]) -> list[int]:
    """The epochs of the sample grids among a run's files (images/samples+step+<epoch>+...png), in order."""
    return sorted(int(path.split("+")[2]) for path in files if path.startswith("images/samples+") and path.endswith(".png"))


def _completed_flow_runs(prefect_api_url: str) -> int:
    """How many flow runs of train-vae the Prefect server at ``prefect_api_url`` holds in state Completed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_api_url}), get_client(sync_client=True) as prefect:
        runs = prefect.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["train-vae"])))
    return sum(run.state is not None and run.state.is_completed() for run in runs)


def main(argv: Sequence[str] | None = None) -> int:
    from tests.team_servers import mlflow_server, postgresql_cluster, prefect_server

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, default=8, help="concurrent training flows (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=SMALL_FLOW["train.epochs"], help="epochs of each (default: %(default)s)")
    parser.add_argument("--train-subset", type=int, default=SMALL_FLOW["data.train_subset"], help="training images of each (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--keep", type=Path, help="keep the flows' logs and the servers' logs in this directory")
    args = parser.parse_args(argv)
    overrides = {**SMALL_FLOW, "train.epochs": args.epochs, "data.train_subset": args.train_subset}

    directory = args.keep or Path(tempfile.mkdtemp(prefix="team-load-"))
    directory.mkdir(parents=True, exist_ok=True)
    with postgresql_cluster() as postgresql:
        tracking_db, prefect_db = postgresql.create_database("mlflow"), postgresql.create_database("prefect")
        with mlflow_server(postgresql.url(tracking_db), directory / "mlflow") as tracking_uri, \
                prefect_server(postgresql.url(prefect_db, "postgresql+asyncpg"), directory / "prefect") as api_url:
            codes, seconds = run_flows(args.flows, tracking_uri, api_url, directory, overrides)
            report = audit(tracking_uri, api_url, flows=args.flows, epochs=args.epochs, wall_seconds=seconds, exit_codes=codes)
    print(report.summary())
    print(f"(logs in {directory})")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0 if not report.lost else 1


if __name__ == "__main__":
    sys.exit(main())
