"""Benchmark: the tutorial presets' figures, read back from their MLflow runs, beside the numbers the tutorials report.

For each preset run (the latest FINISHED run of the preset in the tracking store, or the run ids given) it prints a
markdown row: the tutorial's number at each epoch it reports, this project's number at that epoch in the tutorial's
own unit (the run's per-epoch tutorial metric), the difference in percent, and the run's training seconds.

    .venv/bin/python bench/tutorial_parity.py                       # latest run of each tutorial preset
    .venv/bin/python bench/tutorial_parity.py --run keras-conv-fashion=<run id> --run tf-cvae-mnist=<run id>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What each tutorial reports (SEEDS.md): its metric and its number at each epoch it reports one. A and B report none.
REPORTED: dict[str, tuple[str, dict[int, float]]] = {
    "tf-fashion-mlp": ("tf_loss", {}),
    "vae-tutorial-mlp": ("tutorial_loss", {}),
    "keras-conv-fashion": ("keras_loss", {1: 301.9, 10: 260.0, 100: 252.5}),
    "tf-cvae-mnist": ("tf_test_elbo", {100: -78.3}),
    "matlab-conv-mnist": ("matlab_test_elbo_loss", {1: 28.0, 10: 19.7, 50: 18.5}),
}
PARITY_PERCENT = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[], metavar="PRESET=RUN_ID", help="the run to read for a preset")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from mlflow import MlflowClient

    from pipeline import tracking

    tracking.ensure_store()
    client = MlflowClient()
    chosen = dict(item.split("=", 1) for item in args.run)
    print("| preset | metric | epoch | tutorial | ours | difference | epochs run | training seconds (median epoch) | run |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for preset, (metric, reported) in REPORTED.items():
        run = _run(client, preset, chosen.get(preset))
        if run is None:
            print(f"| `{preset}` | `{metric}` | | | no run | | | | |")
            continue
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}
        seconds = sorted(m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds"))
        timing = f"{sum(seconds):,.0f} ({seconds[len(seconds) // 2]:.1f})" if seconds else ""
        last = max(history, default=0)
        for epoch in sorted(set(reported) | {last}):
            ours = history.get(epoch)
            theirs = reported.get(epoch)
            ours_text = "" if ours is None else f"{ours:.2f}"
            theirs_text = "" if theirs is None else f"{theirs:.1f}"
            difference = ""
            if ours is not None and theirs is not None:
                percent = 100 * (ours - theirs) / abs(theirs)
                difference = f"{percent:+.1f}%" + ("" if abs(percent) <= PARITY_PERCENT else " (miss)")
            print(f"| `{preset}` | `{metric}` | {epoch} | {theirs_text} | {ours_text} | {difference} | {last} | {timing} | `{run.info.run_id[:8]}` |")


def _run(client, preset: str, run_id: str | None):
    if run_id is not None:
        return client.get_run(run_id)
    from pipeline.config import load_config
    from pipeline.tracking import experiment

    runs = client.search_runs(
        [experiment(load_config(preset).data.dataset)],
        filter_string=f"params.preset = '{preset}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


if __name__ == "__main__":
    main()
