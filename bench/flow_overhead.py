"""Benchmark: what the Prefect flow and MLflow tracking add to the same training and evaluation done by the engine alone.

Both sides are whole processes (imports included) running one preset for the same epochs with the same data cache:
the engine alone (fetch, prepare, train, evaluate, nothing tracked) and `flows.py train` (the same stages as Prefect
tasks, tracked in MLflow, with pictures, the logged model and its registration). Pairs alternate engine, flow, so
machine-speed drift hits both alike, and the overhead (flow minus engine) is taken pair by pair and its median quoted,
in wall seconds and in CPU seconds (user + system of the whole process tree, which a loaded machine changes less).

- cold: no Prefect server; every flow run gets a new Prefect home and a new MLflow store (the pipeline's private
  Prefect server creates its database, MLflow its tables);
- home: no Prefect server; one Prefect home and one MLflow store kept across runs, as when `flows.py train` is run
  again and again on one machine;
- warm: a Prefect server running (`prefect server start`, as for scheduled retraining) named by PREFECT_API_URL, and
  one MLflow store kept across runs. The server's own CPU time is not counted;
- served: as warm, but each run is a flow run of a deployment of the training flow, run as `flows.py serve` runs it:
  a `python -m prefect.engine` process that loads the flow from its entrypoint (creating the deployment and each flow
  run is not timed; waiting for the server to hand the run out, which `serve` polls for every 10 s, is not counted).

Before the timed pairs, one untimed engine run fills the data cache, and one untimed flow run readies the kept home,
the kept store and the server's database.

    VAE_DATA_MIRROR=../shared/data .venv/bin/python bench/flow_overhead.py --pairs 3
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.config import parse_override  # noqa: E402  (light: no torch)

KINDS = ("cold", "home", "warm", "served")
DEPLOYMENT = "flow-overhead"


def engine_only(preset: str, epochs: int, overrides: dict) -> None:
    """The flow's stages without Prefect or MLflow: fetch, prepare, train, evaluate; prints the test metrics. With the
    command line's memory settings, so that both sides allocate alike."""
    from pipeline import data, training
    from pipeline.cli import keep_freed_memory
    from pipeline.config import load_config

    keep_freed_memory()

    config = load_config(preset, {"train.epochs": epochs, **overrides})
    prepared = data.prepare_configured(config.data, data.fetch(config.data.dataset, config.data.cache_dir))
    model, _ = training.train(config, prepared, progress=False)
    print(training.evaluate(model, prepared.test, config))


def create_deployment(preset: str, epochs: int, overrides: dict) -> None:
    """The deployment of the training flow that `flows.py serve` would create (without its schedule), on the server in
    PREFECT_API_URL."""
    import flows
    from pipeline.config import load_config

    config = load_config(preset, {"train.epochs": epochs, **overrides})
    flows.train_flow.to_deployment(name=DEPLOYMENT, parameters={"config": config.model_dump(mode="json")}).apply()


def create_flow_run() -> None:
    """A new flow run of the benchmark's deployment; prints its id."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"train-vae/{DEPLOYMENT}")
        print(client.create_flow_run_from_deployment(deployment.id).id)


def check_completed(flow_run_id: str) -> None:
    """Fails unless the flow run ended Completed (a failed flow run's process may still exit with 0)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    if state is None or not state.is_completed():
        raise SystemExit(f"flow run {flow_run_id} ended {state}")


def output_of(command: list[str], env: dict[str, str]) -> str:
    """What ``command`` prints, run in the project's root; its output is shown only if it fails."""
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result.stdout


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of ``command`` as a whole process tree; its output is kept only if it fails."""
    cpu, started = children_cpu_seconds(), time.perf_counter()
    output_of(command, env)
    return time.perf_counter() - started, children_cpu_seconds() - cpu


def homes(root: Path, name: str) -> dict[str, str]:
    """Environment of a flow run whose Prefect home and MLflow store are in ``root/name``."""
    home = root / name
    (home / "mlruns").mkdir(parents=True, exist_ok=True)
    return {"PREFECT_HOME": str(home / "prefect"), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlruns' / 'mlflow.db'}"}


@contextmanager
def prefect_server(root: Path, env: dict[str, str]):
    """`prefect server start` on a free port of 127.0.0.1, its home in ``root``; yields its API URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api_url = f"http://127.0.0.1:{port}/api"
    command = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server_env = {**env, "PREFECT_HOME": str(root / "server-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with open(root / "prefect-server.log", "w") as log:
        server = subprocess.Popen(command, env=server_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{api_url}/health", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"prefect server start failed:\n{(root / 'prefect-server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield api_url
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="a setting for both sides, e.g. --set eval.iwae_samples=50 (repeatable)")
    parser.add_argument("--pairs", type=int, default=3, help="engine/flow pairs for each kind")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"which of {', '.join(KINDS)} (default: all)")
    parser.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--create-deployment", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--create-flow-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--check-completed", metavar="FLOW_RUN_ID", help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = dict(parse_override(text) for text in args.overrides)
    if args.engine_only:
        return engine_only(args.preset, args.epochs, overrides)
    if args.create_deployment:
        return create_deployment(args.preset, args.epochs, overrides)
    if args.create_flow_run:
        return create_flow_run()
    if args.check_completed:
        return check_completed(args.check_completed)

    kinds = args.kinds.split(",")
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    settings = [arg for text in args.overrides for arg in ("--set", text)]
    engine = [sys.executable, __file__, "--engine-only", "--preset", args.preset, "--epochs", str(args.epochs), *settings]
    flow = [sys.executable, "flows.py", "train", "--preset", args.preset, "--epochs", str(args.epochs), *settings]
    flow_command = {kind: flow for kind in KINDS} | {"served": [sys.executable, "-m", "prefect.engine"]}
    with tempfile.TemporaryDirectory(prefix="flow-overhead-") as scratch:
        root = Path(scratch)
        with prefect_server(root, env) if {"warm", "served"} & set(kinds) else _nothing() as api_url:
            warm = {**env, **homes(root, "warm"), "PREFECT_API_URL": api_url or ""}
            if "served" in kinds:
                output_of([sys.executable, __file__, "--create-deployment", "--preset", args.preset, "--epochs",
                           str(args.epochs), *settings], warm)
            flow_env = {
                "cold": lambda pair: {**env, **homes(root, f"cold-{pair}")},
                "home": lambda pair: {**env, **homes(root, "home")},
                "warm": lambda pair: warm,
                "served": lambda pair: {
                    **warm, "PREFECT__FLOW_RUN_ID": output_of([sys.executable, __file__, "--create-flow-run"], warm).strip()
                },
            }
            timed(engine, env)  # untimed: the data cache is filled and the files are in the page cache for both sides
            for kind in kinds:
                if kind != "cold":  # untimed: the kept home, store and server database are ready
                    timed(flow_command[kind], flow_env[kind](None))
            check = [sys.executable, __file__, "--check-completed"]
            results: dict[str, list[tuple[float, float, float, float]]] = {kind: [] for kind in kinds}
            for pair in range(args.pairs):
                for kind in kinds:
                    engine_wall, engine_cpu = timed(engine, env)
                    run_env = flow_env[kind](pair)
                    flow_wall, flow_cpu = timed(flow_command[kind], run_env)
                    if kind == "served":
                        output_of([*check, run_env["PREFECT__FLOW_RUN_ID"]], warm)
                    results[kind].append((engine_wall, flow_wall, engine_cpu, flow_cpu))
                    print(f"pair {pair + 1} {kind}: engine {engine_wall:6.1f} s ({engine_cpu:5.1f} s CPU), flow "
                          f"{flow_wall:6.1f} s ({flow_cpu:5.1f} s CPU), overhead {flow_wall - engine_wall:5.1f} s "
                          f"({flow_cpu - engine_cpu:4.1f} s CPU)", flush=True)
    print(f"\n{args.preset}, {args.epochs} epoch(s) {' '.join(settings)}, {args.pairs} pairs each; medians:")
    print("| | engine alone (s) | flow (s) | overhead (s) | flow / engine | CPU overhead (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, pairs in results.items():
        engine_wall = statistics.median(e for e, _, _, _ in pairs)
        flow_wall = statistics.median(f for _, f, _, _ in pairs)
        overhead = statistics.median(f - e for e, f, _, _ in pairs)
        ratio = statistics.median(f / e for e, f, _, _ in pairs)
        cpu_overhead = statistics.median(f - e for _, _, e, f in pairs)
        print(f"| {kind} | {engine_wall:.1f} | {flow_wall:.1f} | {overhead:.1f} | {ratio:.2f} | {cpu_overhead:.1f} |")


@contextmanager
def _nothing():
    yield None


if __name__ == "__main__":
    main()
