"""The pipeline's Prefect flows (training, sweeps on Dask, scheduled retraining) and its command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import available_timezones

import mlflow
import pandas as pd
import torch
from mlflow.entities import RunInfo
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.schedules import Cron, Schedule
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.tasks import exponential_backoff
from prefect_dask import DaskTaskRunner

from pipeline import artifacts, data, registry, sweep, tracking, training
from pipeline.config import PRESETS, ConfigError, RunConfig, load_config, parse_override, with_overrides
from vae.engine import NonFiniteLossError, process_group, resolve_device

PROJECT_ROOT = Path(__file__).resolve().parent
SUMMARY_ARTIFACT_KEY = "vae-training-summary"
LEADERBOARD_ARTIFACT_KEY = "vae-sweep-leaderboard"
LEADERBOARD_FILE = "leaderboard.csv"  # in the sweep's parent MLflow run
LOCAL_WORKERS = 2  # processes of the local Dask cluster, one trial at a time each
DEFAULT_RETRAINING_CRON = "0 3 * * 1"  # `flows.py serve`: Mondays at 03:00

# Each stage is a plain function in pipeline/; here it becomes a Prefect task. Only data preparation is cached:
# the other tasks take models and tensors, which are neither worth hashing nor safe to skip.
fetch_data = task(
    data.fetch, name="fetch and verify data", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5), cache_policy=NO_CACHE
)
prepare_data = task(
    data.prepare_configured,
    name="prepare data",
    cache_policy=INPUTS + TASK_SOURCE,  # a second run with the same data settings reads the prepared sets back
    persist_result=True,
)
train_model = task(training.train, name="train", cache_policy=NO_CACHE)
evaluate_model = task(training.evaluate, name="evaluate on the test set", cache_policy=NO_CACHE)
make_artifacts = task(tracking.log_evaluation, name="make artifacts", cache_policy=NO_CACHE)
log_model = task(registry.log_model, name="log model", cache_policy=NO_CACHE)
register_model = task(registry.register_version, name="register", cache_policy=NO_CACHE)
promote_model = task(registry.assign_alias, name="promote", cache_policy=NO_CACHE)


@dataclass(frozen=True)
class TrainingOutcome:
    """What a training run produced: where its MLflow run is, its test metrics, its logged model and the registry
    decision, and how long it trained (training passes and validations)."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    metrics: dict[str, float]
    epochs_trained: int
    registered_model: str | None
    version: str | None
    alias: str | None
    promotion_reason: str | None
    model_uri: str | None = None  # None when the model was not logged
    training_minutes: float = 0.0


@flow(name="train-vae", log_prints=True)
def train_flow(config: RunConfig = RunConfig(), resume_run_id: str | None = None) -> TrainingOutcome:
    """Fetch and prepare the data, train, evaluate on the test set, log pictures, register and promote the model.

    Everything is tracked in one MLflow run, whose checkpoint is updated after every epoch; with ``resume_run_id`` an
    interrupted (or finished) run continues from its last checkpoint up to ``config.train.epochs``. When any step
    fails the run ends FAILED with the error, and nothing is registered.
    """
    outcome = tracked_training(
        config,
        run_name=f"{config.preset}-{config.data.dataset}",
        model_step="register" if config.registry.enabled else "skip",
        resume_run_id=resume_run_id,
    )
    create_markdown_artifact(markdown=summary_markdown(config, outcome), key=SUMMARY_ARTIFACT_KEY, description="Test metrics, MLflow run and registry decision")
    return outcome


def tracked_training(
    config: RunConfig,
    *,
    run_name: str,
    model_step: Literal["skip", "log", "register"],
    resume_run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> TrainingOutcome:
    """One whole training run in one MLflow run, its stages as Prefect tasks: fetch and prepare the data, train,
    evaluate on the test set, log the pictures, then log the model ("log"), or log, register and promote it
    ("register"), or neither ("skip").

    The MLflow run (see :func:`pipeline.tracking.start_run` for ``resume_run_id``, ``parent_run_id``, ``tags`` and
    ``tracking_uri``) ends FAILED with the error when any step fails, and the error propagates.
    """
    tracking_uri = tracking.ensure_store(tracking_uri)
    with tracking.start_run(
        config, run_name=run_name, tags=tags, resume_run_id=resume_run_id, parent_run_id=parent_run_id, tracking_uri=tracking_uri
    ) as run:
        files = fetch_data(config.data.dataset, config.data.cache_dir)
        prepared = prepare_data(config.data, files)
        if resume_run_id is None:
            tracking.log_dataset(prepared, config)
        with tempfile.TemporaryDirectory() as scratch:
            checkpoint = Path(scratch) / "checkpoint.pt"
            if resume_run_id is not None:
                checkpoint = tracking.download_checkpoint(resume_run_id, Path(scratch))
            callbacks = [tracking.MLflowCallback(checkpoint_path=checkpoint), training.EpochReport()]
            model, state = train_model(
                config, prepared, callbacks=callbacks, checkpoint_path=checkpoint, resume=resume_run_id is not None
            )
        metrics = evaluate_model(model, prepared.test, config)
        make_artifacts(model, prepared.test, prepared.class_names, metrics)
        model_uri = version = decision = None
        if model_step in ("log", "register"):
            model_uri = log_model(model, prepared.test.pixels[:4])
        if model_step == "register":
            version = register_model(model_uri, config, metrics, run.info.run_id)
            decision = promote_model(config, metrics, version, margin=config.registry.promotion_margin_nats)
    return TrainingOutcome(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        tracking_uri=tracking_uri,
        metrics=metrics,
        epochs_trained=state.epoch,
        registered_model=registry.registered_model_name(config.data.dataset) if version else None,
        version=version,
        alias=decision.alias if decision else None,
        promotion_reason=decision.reason if decision else None,
        model_uri=model_uri,
        training_minutes=state.training_minutes,
    )


def summary_markdown(config: RunConfig, outcome: TrainingOutcome) -> str:
    """The flow run's report: test metrics, the MLflow run and how to open it, and the registry outcome."""
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in outcome.metrics.items())
    note = training.likelihood_note(config)
    if outcome.version is None:
        registry_text = "Not registered (`registry.enabled` is false)."
    else:
        registry_text = (
            f"Registered as **{outcome.registered_model}** version **{outcome.version}**, alias "
            f"**{outcome.alias}**: {outcome.promotion_reason}."
        )
    return f"""# {config.preset} on {config.data.dataset}

{outcome.epochs_trained} epochs, binarization `{config.data.binarization}`, {config.model.architecture} with latent size {config.model.latent_dim}.

| test metric | value |
| --- | ---: |
{rows}
{f"{chr(10)}Note: {note}.{chr(10)}" if note else ""}
## MLflow

Run `{outcome.run_id}` in experiment `{outcome.experiment_id}` of `{outcome.tracking_uri}`.
Open it with `python flows.py ui` and follow the experiment `vae-{config.data.dataset}`.

## Registry

{registry_text}
"""


# --- sweeps: trials in parallel on Dask, nested under one MLflow run -------------------------------------------------


def dask_task_runner(address: str | None = None, workers: int = LOCAL_WORKERS) -> DaskTaskRunner:
    """Prefect's Dask task runner on the scheduler at ``address``, else on a local cluster of ``workers`` processes
    of one thread each (Dask also starts them with OMP_NUM_THREADS=1)."""
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})


def run_trial(trial: sweep.Trial, parent_run_id: str, tracking_uri: str) -> TrainingOutcome:
    """One trial of a sweep, on a Dask worker: a whole training run, nested under the sweep's MLflow run in the sweep's
    store, its model logged but not registered. Torch uses one thread: the trials run side by side.

    Its error comes back as a :class:`pipeline.sweep.TrialError` holding the original's class and message.
    """
    torch.set_num_threads(1)
    try:
        return tracked_training(
            trial.config,
            run_name=f"trial-{trial.number}",
            model_step="log",
            parent_run_id=parent_run_id,
            tags={"sweep.trial": str(trial.number), "sweep.values": trial.describe()},
            tracking_uri=tracking_uri,
        )
    except Exception as error:
        raise sweep.TrialError(f"{type(error).__name__}: {error}") from error


sweep_trial = task(run_trial, name="trial", task_run_name="trial-{trial.number}", cache_policy=NO_CACHE)


@dataclass(frozen=True)
class SweepOutcome:
    """What a sweep produced: its parent MLflow run, the leaderboard (best first) and the best trial's registry
    decision."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    leaderboard: pd.DataFrame
    best_trial: int
    best_run_id: str
    registered_model: str | None
    version: str | None
    alias: str | None
    promotion_reason: str | None


@flow(name="sweep-vae", log_prints=True, task_runner=dask_task_runner())
def sweep_flow(base: RunConfig, grid: dict[str, list[Any]], samples: int | None = None, seed: int = 0) -> SweepOutcome:
    """Train the trials of a sweep in parallel on Dask, each in an MLflow run nested under the sweep's, rank them in a
    leaderboard, and register and promote the best.

    The trials are ``base`` with each combination of the ``grid``'s values, or ``samples`` of them drawn with ``seed``
    (see :func:`pipeline.sweep.trials`); a bad value fails the flow before any trial starts. A failing trial is a
    failed row of the leaderboard and does not stop the others; when every trial fails the sweep fails and nothing is
    registered. The trials run on a local Dask cluster, or wherever ``sweep_flow.with_options(task_runner=...)`` says.
    """
    trials = sweep.trials(base, grid, samples=samples, seed=seed)
    tracking_uri = tracking.ensure_store()  # created once here; the workers are told to track to this very store
    run_name = f"sweep-{base.preset}-{base.data.dataset}"
    with tracking.start_run(base, run_name=run_name, tags={"sweep": "parent"}, tracking_uri=tracking_uri) as parent:
        swept = {f"sweep.{name}": json.dumps(values) for name, values in grid.items()}
        mlflow.log_params({**swept, "sweep.samples": "all" if samples is None else samples, "sweep.seed": seed})
        fetch_data(base.data.dataset, base.data.cache_dir)  # once, so that the trials read the cache, not all download
        with _prefect_api_for_workers():
            futures = [sweep_trial.submit(trial, parent.info.run_id, tracking_uri) for trial in trials]
        results = _trial_results(trials, futures, parent.info)
        board = sweep.leaderboard(results)
        mlflow.log_text(board.to_csv(index=False), LEADERBOARD_FILE)
        create_table_artifact(
            table=board.to_dict(orient="records"), key=LEADERBOARD_ARTIFACT_KEY,
            description=f"Trials of the sweep in MLflow run {parent.info.run_id}, best first",
        )
        best = sweep.best(results)
        if best is None:
            errors = "; ".join(f"trial {result.trial.number}: {result.error}" for result in results)
            raise sweep.SweepError(f"all {len(results)} trials failed, so nothing is registered ({errors})")
        mlflow.set_tags({"sweep.best_trial": str(best.trial.number), "sweep.best_run_id": best.run_id})
        version = decision = None
        if base.registry.enabled:
            version = register_model(best.model_uri, best.trial.config, best.metrics, best.run_id)
            decision = promote_model(best.trial.config, best.metrics, version, margin=base.registry.promotion_margin_nats)
    return SweepOutcome(
        run_id=parent.info.run_id,
        experiment_id=parent.info.experiment_id,
        tracking_uri=tracking_uri,
        leaderboard=board,
        best_trial=best.trial.number,
        best_run_id=best.run_id,
        registered_model=registry.registered_model_name(base.data.dataset) if version else None,
        version=version,
        alias=decision.alias if decision else None,
        promotion_reason=decision.reason if decision else None,
    )


@contextmanager
def _prefect_api_for_workers() -> Iterator[None]:
    """Task runs submitted inside carry this process's Prefect API to their Dask workers.

    Without PREFECT_API_URL, Prefect starts a temporary server in each process that needs one: every worker would run
    its own. With this they report to the flow's (on 127.0.0.1: workers on other machines need PREFECT_API_URL).
    """
    if PREFECT_API_URL.value():
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: str(FlowRunContext.get().client.api_url)}):
        yield


def _trial_results(
    trials: Sequence[sweep.Trial], futures: Sequence[PrefectFuture[TrainingOutcome]], parent: RunInfo
) -> list[sweep.TrialResult]:
    """Each trial's result, once every task run has ended; a failed trial's MLflow run, if it started one, is found by
    its "sweep.trial" tag among the parent's nested runs."""
    outcomes = []
    for future in futures:
        try:
            outcomes.append(future.result(raise_on_failure=False))  # the trial's exception when it failed
        except Exception as error:  # the Dask worker itself died before the task run could report
            outcomes.append(error)
    nested = {}
    if not all(isinstance(outcome, TrainingOutcome) for outcome in outcomes):
        runs = mlflow.MlflowClient().search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
        nested = {run.data.tags.get("sweep.trial"): run.info.run_id for run in runs}
    return [
        sweep.TrialResult(trial, outcome.run_id, outcome.metrics, outcome.model_uri, training_minutes=outcome.training_minutes)
        if isinstance(outcome, TrainingOutcome)
        else sweep.TrialResult(trial, nested.get(str(trial.number)), error=_error_text(outcome))
        for trial, outcome in zip(trials, outcomes)
    ]


def _error_text(error: BaseException) -> str:
    """"<error class>: <message>", as a trial's :class:`pipeline.sweep.TrialError` already says it."""
    return str(error) if isinstance(error, sweep.TrialError) else f"{type(error).__name__}: {error}"


def _config_from(args: argparse.Namespace) -> RunConfig:
    overrides = dict(parse_override(text) for text in args.overrides)
    shortcuts = {"data.dataset": args.dataset, "train.epochs": args.epochs, "train.device": args.device}
    overrides.update({key: value for key, value in shortcuts.items() if value is not None})
    if args.resume is not None:
        tracking.ensure_store()
        return with_overrides(tracking.run_config(args.resume), overrides)
    return load_config(args.preset, overrides, file=args.config)


def _print_metrics(config: RunConfig, metrics: dict[str, float]) -> None:
    print(f"  test ELBO       {metrics['test_elbo_nats']:9.2f} nats  (reconstruction {metrics['test_reconstruction_nats']:.2f}, KL {metrics['test_kl_nats']:.2f})")
    if "test_nll_nats" in metrics:
        print(f"  test NLL (IWAE) {metrics['test_nll_nats']:9.2f} nats  ({metrics['test_bits_per_dim']:.4f} bits/dim, k={config.eval.iwae_samples})")
    if note := training.likelihood_note(config):
        print(f"  note            {note}")


def _print_outcome(config: RunConfig, outcome: TrainingOutcome) -> None:
    print(f"\n{config.preset} on {config.data.dataset}: {outcome.epochs_trained} epochs, {outcome.training_minutes:.1f} minutes of training")
    _print_metrics(config, outcome.metrics)
    print(f"  MLflow run      {outcome.run_id} (experiment vae-{config.data.dataset}, store {outcome.tracking_uri})")
    if outcome.version is not None:
        print(f"  registered      models:/{outcome.registered_model}/{outcome.version} as {outcome.alias}: {outcome.promotion_reason}")
    print("  open the UI     python flows.py ui")


def _train(args: argparse.Namespace) -> int:
    with process_group() as (rank, world_size):  # under torchrun: every process it started; else this one alone
        if world_size > 1 and args.resume is not None:
            return _fail(ValueError("--resume continues a run in one process: launch it without torchrun"), 2)
        try:
            config = _config_from(args)
            resolve_device(config.train.device)
        except (ConfigError, RuntimeError) as error:
            return _fail(error, 2)
        if rank != 0:
            return _train_shard(config)
        outcome = train_flow(config, resume_run_id=args.resume, return_state=True)
        if outcome.is_failed():
            print(f"error: the training flow failed: {outcome.message}", file=sys.stderr)
            return 1
        _print_outcome(config, outcome.result())
        return 0


def _train_shard(config: RunConfig) -> int:
    """A torchrun process of rank > 0: the same data, its shard of every batch; no Prefect, MLflow or checkpoint."""
    prepared = data.prepare_configured(config.data, data.fetch(config.data.dataset, config.data.cache_dir))
    try:
        training.train(config, prepared)
    except NonFiniteLossError as error:
        # Rank 0 stopped at the same step and ends its MLflow run FAILED with the error, then exits 1. Exiting 1
        # here first would make torchrun stop rank 0 before it has.
        print(f"error: {error} (rank 0 records it)", file=sys.stderr)
    return 0


NO_PREFECT_SERVER = """scheduled retraining needs a Prefect server, and PREFECT_API_URL names none (without one, Prefect
would use a temporary server that ends with this command, and nothing would ever run on schedule). Start one, point
PREFECT_API_URL at it, then serve again:
  prefect server start                                # in another terminal; listens on http://127.0.0.1:4200
  export PREFECT_API_URL=http://127.0.0.1:4200/api    # or: prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api"""


def retraining_schedule(cron: str, timezone: str) -> Schedule:
    """The schedule of ``flows.py serve``: ``cron`` read in ``timezone``; a ConfigError naming the option that is wrong."""
    if timezone not in available_timezones():
        raise ConfigError(f"--timezone {timezone!r} is not an IANA time zone name, such as UTC or Europe/Paris")
    try:
        return Cron(cron, timezone=timezone)
    except ValueError:
        raise ConfigError(
            f"--cron {cron!r} is not a cron expression: expected minute hour day-of-month month day-of-week, "
            f"such as {DEFAULT_RETRAINING_CRON!r} (Mondays at 03:00)"
        ) from None


def next_run_time(schedule: Schedule) -> datetime:
    """When ``schedule`` fires next, computed by the Prefect server's own scheduling code."""
    from prefect.server.schemas.schedules import CronSchedule

    (when,) = asyncio.run(CronSchedule(cron=schedule.cron, timezone=schedule.timezone, day_or=schedule.day_or).get_dates(n=1))
    return when


def _serve(args: argparse.Namespace) -> int:
    try:
        config = _config_from(args)
        resolve_device(config.train.device)
        schedule = retraining_schedule(args.cron, args.timezone)
    except (ConfigError, RuntimeError) as error:
        return _fail(error, 2)
    api_url = PREFECT_API_URL.value()
    if not api_url:
        print(f"error: {NO_PREFECT_SERVER}", file=sys.stderr)
        return 2
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        unreachable = client.api_healthcheck()
    if unreachable is not None:
        print(f"error: no Prefect server answers at PREFECT_API_URL={api_url} ({unreachable}); start it with "
              "`prefect server start`, or point PREFECT_API_URL at a running one", file=sys.stderr)
        return 2
    tracking_uri = tracking.ensure_store()
    name = args.name or f"scheduled-retraining-{config.preset}"
    deployment = f"{train_flow.name}/{name}"
    model = registry.registered_model_name(config.data.dataset)
    print(f"deployment      {deployment} on the Prefect server at {api_url}")
    print(f"  schedule      {schedule.cron} ({schedule.timezone}), next run {next_run_time(schedule):%Y-%m-%d %H:%M %Z}")
    print(f"  each run      {config.preset} on {config.data.dataset}, {config.train.epochs} epochs: a new MLflow run in "
          f"experiment vae-{config.data.dataset} of {tracking_uri}, registered as a new version of {model} that "
          "competes for champion")
    print(f"  run it now    prefect deployment run '{deployment}'")
    print("This process runs the deployment's flow runs: keep it running (Ctrl-C stops it and pauses the schedule).", flush=True)
    retraining = train_flow.to_deployment(
        name=name,
        schedule=schedule,
        parameters={"config": config.model_dump(mode="json")},  # validated as a RunConfig by every run
        description=f"Scheduled retraining of {config.preset} on {config.data.dataset}; each run competes for {model}@champion.",
        tags=["scheduled-retraining", config.data.dataset],
    )
    # Not train_flow.serve(): that pickles the flow into each run's process, where its annotations (RunConfig, under
    # `from __future__ import annotations`) no longer resolve. prefect.serve starts each run as `python -m
    # prefect.engine`, which imports this file afresh.
    from prefect import serve as serve_deployments

    serve_deployments(retraining, print_starting_message=False)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    try:
        base = _config_from(args)
        grid = sweep.parse_grid(args.grid)
        sweep.trials(base, grid, samples=args.samples, seed=args.seed)  # every trial's config, checked before any work
    except ConfigError as error:
        return _fail(error, 2)
    runner = dask_task_runner(args.dask_address, args.workers or LOCAL_WORKERS)
    state = sweep_flow.with_options(task_runner=runner)(base, grid, samples=args.samples, seed=args.seed, return_state=True)
    if state.is_failed():
        print(f"error: the sweep failed: {state.message}", file=sys.stderr)
        return 1
    outcome: SweepOutcome = state.result()
    print(f"\n{len(outcome.leaderboard)} trials of {base.preset} on {base.data.dataset}, best first:")
    print(outcome.leaderboard.fillna({"error": ""}).to_string(index=False, max_colwidth=80))
    print(f"  MLflow run      {outcome.run_id} with the trials nested (experiment vae-{base.data.dataset}, store {outcome.tracking_uri})")
    print(f"  best            trial {outcome.best_trial}, run {outcome.best_run_id}")
    if outcome.version is not None:
        print(f"  registered      models:/{outcome.registered_model}/{outcome.version} as {outcome.alias}: {outcome.promotion_reason}")
    print("  open the UI     python flows.py ui")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    tracking.ensure_store()
    try:
        device = resolve_device(args.device)
        loaded = registry.load(args.model, device=device)
        overrides = {"eval.iwae_samples": args.iwae_samples} if args.iwae_samples is not None else {}
        config = with_overrides(loaded.config, overrides)
        prepared = data.prepare_configured(config.data, data.fetch(config.data.dataset, config.data.cache_dir))
    except (ConfigError, RuntimeError, LookupError, data.DataError) as error:
        return _fail(error, 1)
    metrics = training.evaluate(loaded.model, prepared.test, config)
    if args.json:
        print(json.dumps({"model": loaded.uri, "run_id": loaded.run_id, "iwae_samples": config.eval.iwae_samples, **metrics}))
    else:
        print(f"{loaded.uri} (run {loaded.run_id}) on the {config.data.dataset} test set:")
        _print_metrics(config, metrics)
    return 0


def _generate(args: argparse.Namespace) -> int:
    tracking.ensure_store()
    try:
        loaded = registry.load(args.model)
    except LookupError as error:
        return _fail(error, 1)
    images = loaded.model.sample(args.n, generator=torch.Generator().manual_seed(args.seed))
    artifacts.image_grid(images, *artifacts.grid_shape(args.n)).save(args.output)
    print(f"{args.n} samples of {loaded.uri} written to {args.output}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    tracking.ensure_store()
    try:
        registry.promote(args.name, args.version, args.reason)
    except LookupError as error:
        return _fail(error, 1)
    print(f"models:/{args.name}@{registry.CHAMPION} is now version {args.version} ({args.reason})")
    return 0


def _ui(args: argparse.Namespace) -> int:
    uri = tracking.default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        print(f"MLFLOW_TRACKING_URI is a tracking server, which serves the UI itself: open {uri}")
        return 0
    command = tracking.ui_command(tracking.ensure_store(uri), host=args.host, port=args.port)
    print(f"MLflow UI on http://{args.host}:{args.port} over {uri} (Ctrl-C stops it)", flush=True)
    os.execv(command[0], command)


def _fail(error: BaseException, code: int) -> int:
    print(f"error: {error}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # downloads here are a few small files
    parser = argparse.ArgumentParser(prog="flows.py", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    config_options = argparse.ArgumentParser(add_help=False)  # the run config, shared by train, serve and sweep
    config_options.add_argument("--preset", default="default", choices=sorted(PRESETS), help="the starting config (default: %(default)s)")
    config_options.add_argument("--config", type=Path, help="a TOML or JSON file of settings applied over the preset")
    config_options.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override one setting, e.g. --set model.latent_dim=2 (repeatable)")
    config_options.add_argument("--dataset", choices=["mnist", "fashion-mnist"], help="shortcut for --set data.dataset=...")
    config_options.add_argument("--epochs", type=int, help="shortcut for --set train.epochs=...")
    config_options.add_argument("--device", help="shortcut for --set train.device=... (auto, cpu, cuda, mps)")

    train = commands.add_parser("train", parents=[config_options], help="run the training flow (a preset plus overrides)")
    train.add_argument("--resume", metavar="RUN_ID", help="continue an MLflow run from its last checkpoint, with its config (plus --epochs, --set)")
    train.set_defaults(handler=_train)

    serve = commands.add_parser(
        "serve", parents=[config_options],
        help="retrain on a cron schedule: create a deployment of the training flow on the Prefect server and run it",
        description="Create a deployment of the training flow with a cron schedule on the Prefect server that "
        "PREFECT_API_URL names, and run its flow runs in this process until Ctrl-C (which pauses the schedule). "
        "Each run is a new MLflow run and a new registered version that competes for champion.",
    )
    serve.add_argument("--cron", default=DEFAULT_RETRAINING_CRON, help="when to retrain: minute hour day-of-month month day-of-week (default: %(default)r, Mondays at 03:00)")
    serve.add_argument("--timezone", default="UTC", help="the IANA time zone the cron expression is read in (default: %(default)s)")
    serve.add_argument("--name", help="the deployment's name (default: scheduled-retraining-<preset>)")
    serve.set_defaults(handler=_serve, resume=None)

    sweeps = commands.add_parser(
        "sweep", parents=[config_options],
        help="train a grid (or a random sample) of configs in parallel on Dask, nested under one MLflow run; register the best",
        description="Train every combination of the --grid values over the base config (--preset, --config, --set) as "
        "Prefect tasks on Dask, each trial an MLflow run nested under the sweep's run. The leaderboard goes to the "
        "sweep's run as leaderboard.csv and to Prefect as a table artifact; the best trial is registered and competes "
        "for champion. A failing trial is a failed row and does not stop the others.",
    )
    sweeps.add_argument("--grid", action="append", required=True, metavar="SECTION.FIELD=V1,V2,...", help="a swept field and its values, read as JSON when they parse, e.g. --grid model.latent_dim=2,10,20 or --grid model.hidden_dims=[400],[512,256] (repeatable: the trials are every combination)")
    sweeps.add_argument("--samples", type=int, metavar="N", help="train N distinct combinations drawn at random instead of all of them")
    sweeps.add_argument("--seed", type=int, default=0, help="seed of the --samples draws (default: %(default)s)")
    sweeps.add_argument("--dask-address", metavar="ADDRESS", help="run the trials on an existing Dask scheduler, e.g. tcp://127.0.0.1:8786 (default: a local cluster)")
    sweeps.add_argument("--workers", type=int, help=f"worker processes of the local cluster, one trial at a time each (default: {LOCAL_WORKERS})")
    sweeps.set_defaults(handler=_sweep, resume=None)

    model_help = "models:/<name>@<alias>, models:/<name>/<version>, runs:/<run id>/model, a registered model name or a run id"
    evaluate = commands.add_parser("evaluate", help="evaluate a registered model or a run's model on its test set")
    evaluate.add_argument("model", help=model_help)
    evaluate.add_argument("--iwae-samples", type=int, help="importance samples of the NLL estimate (published numbers use 5000; default: the run's)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: %(default)s)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    evaluate.set_defaults(handler=_evaluate)

    generate = commands.add_parser("generate", help="decode images from the prior of a model into a PNG grid")
    generate.add_argument("model", help=model_help)
    generate.add_argument("-n", type=int, default=64, help="how many images (default: %(default)s)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the latent draws (default: %(default)s)")
    generate.add_argument("-o", "--output", type=Path, default=Path("samples.png"), help="the PNG to write (default: %(default)s)")
    generate.set_defaults(handler=_generate)

    promote = commands.add_parser("promote", help="move the champion alias to a version by hand, recording why")
    promote.add_argument("name", help="the registered model, e.g. vae-mnist")
    promote.add_argument("version", help="the version that becomes champion")
    promote.add_argument("--reason", required=True, help="why, recorded on the version")
    promote.set_defaults(handler=_promote)

    ui = commands.add_parser("ui", help="start the MLflow UI over the tracking store and print its address")
    ui.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: %(default)s)")
    ui.add_argument("--port", type=int, default=5000, help="(default: %(default)s)")
    ui.set_defaults(handler=_ui)

    args = parser.parse_args(argv)
    if getattr(args, "n", 1) < 1:
        parser.error("-n must be at least 1")
    if getattr(args, "workers", None) is not None and (args.workers < 1 or args.dask_address):
        parser.error("--workers sizes the local cluster: at least 1, and not with --dask-address (whose workers run the trials)")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
