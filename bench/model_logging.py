"""Time logging the default preset's model to MLflow and loading it back in one line, in a fresh SQLite store."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import mlflow
import torch

from pipeline import registry, tracking
from pipeline.config import load_config
from vae.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    config = load_config("default")
    model = build_model(config.model, seed=0)
    example = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    log_seconds, load_seconds = [], []
    with tempfile.TemporaryDirectory() as scratch:
        tracking.ensure_store(f"sqlite:///{scratch}/mlflow.db")
        mlflow.set_experiment("bench-model-logging")
        for _ in range(args.rounds):
            with mlflow.start_run():
                started = time.perf_counter()
                uri = registry.log_model(model, config.model, example)
                log_seconds.append(time.perf_counter() - started)
            started = time.perf_counter()
            registry.load_model(uri)
            load_seconds.append(time.perf_counter() - started)
    for name, seconds in (("log_model", log_seconds), ("load_model", load_seconds)):
        spread = f"min {min(seconds):.3f}, max {max(seconds):.3f}"
        print(f"{name}: median {statistics.median(seconds):.3f} s ({spread}), {len(seconds)} rounds")


if __name__ == "__main__":
    main()
