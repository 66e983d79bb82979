"""Benchmark: how far training in two processes drifts from one process by float rounding alone, over many seeds.

The figures behind the bounds of the two-process tests. For each seed the same fit runs in two processes (Gloo, one
thread each, joined as the tests join them) and in one process (one thread), and the script reports:
  - whether every step's images and noise were exactly the one-process batch's rows (they must be, always);
  - each step's averaged gradient against the whole batch's exact (float64) gradient at the same parameters, its
    relative error as a fraction of the bound the test asserts (tests/vae/test_engine.py: float32_error_bound), and
    the same for one process's float32 gradient;
  - the largest relative difference of the epoch metrics, and how the final parameters differ (largest, median,
    how many by more than 1e-6 and 1e-5), where Adam's division by the gradient's RMS magnifies rounding.

Settings: ``engine`` is tests/vae/test_engine.py's fit (MLP 784-32-4, 235 random images, dynamic binarization, Monte
Carlo KL, batch 64, 2 epochs); ``torchrun`` is tests/test_distributed.py's (the default preset's 784-400-20 on 512 MNIST
images, threshold binarization, batch 128, 1 epoch; needs the data, e.g. VAE_DATA_MIRROR=../shared/data).

    .venv/bin/python bench/distributed_rounding.py --setting engine --seeds 50
    .venv/bin/python bench/distributed_rounding.py --setting torchrun --seeds 20
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.vae import test_engine as spec  # noqa: E402
from vae.engine import fit  # noqa: E402
from vae.models import build_model  # noqa: E402

TORCHRUN = {  # tests/test_distributed.py's TINY
    "data.train_subset": 512, "data.validation_size": 256, "data.binarization": "threshold",
    "train.epochs": 1, "train.device": "cpu", "eval.iwae_samples": 2,
}


def setting(name: str, seed: int):
    """(model config, train set, validation set, objective, train config) of ``name`` with ``seed``."""
    if name == "engine":
        return (spec.MODEL, spec.images(235, 2 + seed), spec.VALIDATION, spec.MONTE_CARLO,
                spec.train_config(epochs=2, seed=3 + seed))
    from pipeline import data
    from pipeline.config import load_config

    config = load_config("default", TORCHRUN | {"train.seed": seed})
    prepared = data.prepare_configured(config.data, data.fetch(config.data.dataset, config.data.cache_dir))
    return config.model, prepared.train, prepared.validation, config.objective, config.train


def fit_recorded(name: str, seed: int):
    model_config, train, validation, objective, train_config = setting(name, seed)
    model = build_model(model_config, seed=train_config.seed)
    with spec.StepRecorder(model) as steps:
        state = fit(model, train, validation, objective, train_config, progress=False)
    return {"parameters": model.state_dict(), "history": state.history, "steps": steps.saved()}


def fit_every_seed(name: str, seeds: list[int], rank: int, directory: Path) -> None:
    for seed in seeds:
        torch.save(fit_recorded(name, seed), directory / f"rank{rank}-seed{seed}.pt")
    torch.save({}, directory / f"rank{rank}.pt")  # what run_in_two_processes reads back


def compare(name: str, seed: int, two: dict[int, dict], one: dict) -> dict[str, float]:
    model_config, _, _, objective, _ = setting(name, seed)
    exact, two_used, one_used = True, 0.0, 0.0
    for step, (x, eps) in enumerate(zip(one["steps"]["images"], one["steps"]["noise"])):
        bound = spec.float32_error_bound(len(x))
        for rank in (0, 1):
            steps = two[rank]["steps"]
            exact &= torch.equal(steps["images"][step], spec.shard(x, rank))
            exact &= torch.equal(steps["noise"][step], spec.shard(eps, rank))
            reference = spec.exact_gradient(model_config, objective, steps["parameters"][step], x, eps)
            errors = spec.relative_gradient_errors(steps["gradients"][step], reference)
            two_used = max(two_used, max(errors.values()) / bound)
        reference = spec.exact_gradient(model_config, objective, one["steps"]["parameters"][step], x, eps)
        errors = spec.relative_gradient_errors(one["steps"]["gradients"][step], reference)
        one_used = max(one_used, max(errors.values()) / bound)
    history = max(
        abs(shared[key] - alone[key]) / abs(alone[key])
        for shared, alone in zip(two[0]["history"], one["history"]) for key in alone if alone[key] != 0
    )
    drift = torch.cat([(two[0]["parameters"][key] - value).abs().flatten() for key, value in one["parameters"].items()])
    return {
        "exact_batches_and_noise": exact,
        "two_processes_gradient_error_of_bound": two_used,
        "one_process_gradient_error_of_bound": one_used,
        "history_max_relative_difference": history,
        "parameters_max_difference": drift.max().item(),
        "parameters_median_difference": drift.median().item(),
        "parameters_over_1e-6": int((drift > 1e-6).sum()),
        "parameters_over_1e-5": int((drift > 1e-5).sum()),
        "parameters": drift.numel(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=["engine", "torchrun"], default="engine")
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--json", type=Path, help="write every seed's figures here")
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        spec.run_in_two_processes(
            functools.partial(fit_every_seed, args.setting, seeds), directory, timeout=600.0 * len(seeds)
        )
        rows = []
        for seed in seeds:
            two = {rank: torch.load(directory / f"rank{rank}-seed{seed}.pt") for rank in (0, 1)}
            with spec.one_thread():
                one = fit_recorded(args.setting, seed)
            rows.append({"seed": seed, **compare(args.setting, seed, two, one)})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"{args.setting}, {len(seeds)} seeds, {time.perf_counter() - started:.0f} s:")
    print(f"  batches and noise exact in {sum(row['exact_batches_and_noise'] for row in rows)} of {len(rows)}")
    for key in ("two_processes_gradient_error_of_bound", "one_process_gradient_error_of_bound", "history_max_relative_difference",
                "parameters_max_difference", "parameters_over_1e-6", "parameters_over_1e-5"):
        values = [row[key] for row in rows]
        print(f"  {key}: median {statistics.median(values):.3g}, max {max(values):.3g}")
    print(f"  of {rows[0]['parameters']} parameters")


if __name__ == "__main__":
    main()
