"""Benchmark: the training flow's cached "prepare data" task against the same preparation as a task without a cache.

In one flow run, in a new Prefect home, the two alternate round by round on the default preset's data settings (all
of MNIST): the first cached call computes and writes the result, the later ones read it back.

    VAE_DATA_MIRROR=../shared/data .venv/bin/python bench/prepare_cache.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="prepare-cache-")
    os.environ.update(PREFECT_HOME=home, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    os.environ.pop("PREFECT_API_URL", None)
    sys.path.insert(0, str(ROOT))
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    import flows
    from pipeline import data
    from pipeline.config import load_config

    settings = load_config("default").data
    uncached = task(data.prepare_configured, name="prepare data without a cache", cache_policy=NO_CACHE)

    @flow(name="prepare-cache-benchmark")
    def rounds() -> list[tuple[float, float]]:
        files = data.fetch(settings.dataset, settings.cache_dir)
        timings = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            uncached(settings, files)
            middle = time.perf_counter()
            flows.prepare_data(settings, files)
            timings.append((middle - started, time.perf_counter() - middle))
        return timings

    timings = rounds()
    stored = sum(path.stat().st_size for path in Path(home, "storage").iterdir())
    for number, (plain, cached) in enumerate(timings, start=1):
        print(f"round {number}: uncached task {plain:.2f} s, cached task {cached:.2f} s")
    later = timings[1:]
    print(f"\nfirst cached call (computes and writes the cache): {timings[0][1]:.2f} s; later rounds, medians: "
          f"uncached {statistics.median(p for p, _ in later):.2f} s, cached {statistics.median(c for _, c in later):.2f} s; "
          f"cache on disk {stored / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
