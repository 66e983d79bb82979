"""Benchmark: what the Prefect flow and MLflow tracking add to the same training and evaluation done by the engine alone.

Both sides are whole processes (imports included) running one preset for the same epochs with the same data cache:
the engine alone (fetch, prepare, train, evaluate, nothing tracked) and `flows.py train` (the same stages as Prefect
tasks, tracked in MLflow, with pictures, the logged model and its registration). Pairs alternate engine, flow, so
machine-speed drift hits both alike, and the overhead (flow minus engine) is taken pair by pair and its median quoted.
Cold: every flow run gets a new Prefect home and a new MLflow store (server database and store created, nothing
cached). Warm: one Prefect home and store kept across runs, after one untimed run (database ready, prepared data
in Prefect's cache).

    VAE_DATA_MIRROR=../shared/data .venv/bin/python bench/flow_overhead.py --pairs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def engine_only(preset: str, epochs: int) -> None:
    """The flow's stages without Prefect or MLflow: fetch, prepare, train, evaluate; prints the test metrics."""
    sys.path.insert(0, str(ROOT))
    from pipeline import data, training
    from pipeline.config import load_config

    config = load_config(preset, {"train.epochs": epochs})
    prepared = data.prepare_configured(config.data, data.fetch(config.data.dataset, config.data.cache_dir))
    model, _ = training.train(config, prepared, progress=False)
    print(training.evaluate(model, prepared.test, config))


def timed(command: list[str], env: dict[str, str]) -> float:
    """Wall seconds of ``command`` as a whole process; its output is kept only if it fails."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return elapsed


def homes(root: Path, name: str) -> dict[str, str]:
    """Environment of a flow run whose Prefect home and MLflow store are in ``root/name``."""
    home = root / name
    (home / "mlruns").mkdir(parents=True, exist_ok=True)
    return {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlruns' / 'mlflow.db'}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=3, help="engine/flow pairs for each of cold and warm")
    parser.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine_only:
        return engine_only(args.preset, args.epochs)

    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    engine = [sys.executable, __file__, "--engine-only", "--preset", args.preset, "--epochs", str(args.epochs)]
    flow = [sys.executable, "flows.py", "train", "--preset", args.preset, "--epochs", str(args.epochs)]
    with tempfile.TemporaryDirectory(prefix="flow-overhead-") as scratch:
        root = Path(scratch)
        timed(engine, env)  # untimed: the data cache is filled and the files are in the page cache for both sides
        warm = {**env, **homes(root, "warm")}
        timed(flow, warm)  # untimed: the warm home gets its database and cached prepared data
        results: dict[str, list[tuple[float, float]]] = {"cold": [], "warm": []}
        for pair in range(args.pairs):
            for kind in ("cold", "warm"):
                flow_env = {**env, **homes(root, f"cold-{pair}")} if kind == "cold" else warm
                engine_seconds = timed(engine, env)
                flow_seconds = timed(flow, flow_env)
                results[kind].append((engine_seconds, flow_seconds))
                print(f"pair {pair + 1} {kind}: engine {engine_seconds:6.1f} s, flow {flow_seconds:6.1f} s, "
                      f"overhead {flow_seconds - engine_seconds:5.1f} s", flush=True)
    print(f"\n{args.preset}, {args.epochs} epoch(s), {args.pairs} pairs each; medians:")
    print("| | engine alone (s) | flow (s) | overhead (s) | flow / engine |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind, pairs in results.items():
        engine_seconds = statistics.median(e for e, _ in pairs)
        flow_seconds = statistics.median(f for _, f in pairs)
        overhead = statistics.median(f - e for e, f in pairs)
        ratio = statistics.median(f / e for e, f in pairs)
        print(f"| {kind} | {engine_seconds:.1f} | {flow_seconds:.1f} | {overhead:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
