"""The pipeline's Prefect flows: training (train-vae), sweeps on Dask (sweep-vae) and the scheduled retraining
deployment, each wiring the stages of pipeline/ as tasks; the command line is pipeline/cli.py."""

from __future__ import annotations

import sys

if __name__ == "__main__":  # `python flows.py <command>`: the command line, which imports the flows only when it runs one
    from pipeline.cli import run

    run()

import asyncio
import json
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import available_timezones

from pipeline.cli import flows_imports
from pipeline.prefect_api import disable_telemetry

disable_telemetry()  # before Prefect and MLflow are imported, which read their settings once

with flows_imports():  # with the collector paused in the program and in served flow runs: see pipeline.cli
    import mlflow
    import pandas as pd
    import torch
    from mlflow.entities import RunInfo
    from prefect import flow, task
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.cache_policies import NO_CACHE
    from prefect.context import FlowRunContext
    from prefect.exceptions import TerminationSignal
    from prefect.futures import PrefectFuture
    from prefect.runner import Runner
    from prefect.schedules import Cron, Schedule
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipeline import data, registry, sample_quality, sweep, tracking, training, tutorials
    from pipeline.config import DEFAULT_RETRAINING_CRON, LOCAL_WORKERS, ConfigError, RunConfig
    from pipeline.redaction import redact

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner

SUMMARY_ARTIFACT_KEY = "vae-training-summary"
LEADERBOARD_ARTIFACT_KEY = "vae-sweep-leaderboard"
LEADERBOARD_FILE = "leaderboard.csv"  # in the sweep's parent MLflow run

# Each stage is a plain function in pipeline/; here it becomes a Prefect task. None is cached or retried by Prefect, and
# no result is written to Prefect's storage: the tasks take models and tensors, neither worth hashing nor safe to
# skip; preparing the data afresh (0.3 s for MNIST) is faster than reading it back from a cache, and what is slow
# (download, decompression, SHA-256) the data stage caches itself; and fetching retries what a retry can heal, network
# trouble and server errors, itself, while a file with the wrong hash or a malformed one fails at once.
fetch_data = task(data.fetch, name="fetch and verify data", cache_policy=NO_CACHE)
prepare_data = task(data.prepare_configured, name="prepare data", cache_policy=NO_CACHE)
train_model = task(training.train, name="train", cache_policy=NO_CACHE)
evaluate_model = task(training.evaluate, name="evaluate on the test set", cache_policy=NO_CACHE)
get_classifier = task(sample_quality.ensure_classifier, name="find or train the data set's classifier", cache_policy=NO_CACHE)
score_samples = task(sample_quality.score, name="sample quality (FID)", cache_policy=NO_CACHE)
log_evaluation = task(tracking.log_evaluation, name="log test metrics and pictures", cache_policy=NO_CACHE)
log_model = task(registry.log_model, name="log model", cache_policy=NO_CACHE)
register_model = task(registry.register_version, name="register", cache_policy=NO_CACHE)
promote_model = task(registry.assign_alias, name="promote", cache_policy=NO_CACHE)


@dataclass(frozen=True)
class TrainingOutcome:
    """What a training run produced: where its MLflow run is, its test metrics and the validation ELBO of the model it
    returned, its logged model and the registry decision, and how long it trained (training passes and validations)."""

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
    tutorial_figures: dict[str, float] | None = None  # the last epoch's figures in the tutorial's unit, if any
    training_minutes: float = 0.0
    validation_elbo_nats: float | None = None  # None without a validation set


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
    evaluate on the test set (and, with ``eval.fid``, score sample quality on the data set's registered classifier,
    trained first if there is none), log the pictures, then log the model ("log"), or log, register and promote it
    ("register"), or neither ("skip").

    The MLflow run (see :func:`pipeline.tracking.start_run` for ``resume_run_id``, ``parent_run_id``, ``tags`` and
    ``tracking_uri``) ends FAILED with the error when any step fails, and the error propagates.
    """
    tracking_uri = tracking.ensure_store(tracking_uri)
    with tracking.start_run(
        config, run_name=run_name, tags=tags, resume_run_id=resume_run_id, parent_run_id=parent_run_id, tracking_uri=tracking_uri
    ) as run:
        announce_run(run.info.run_id, config, tracking_uri)
        files = fetch_data(config.data.dataset, config.data.cache_dir)
        prepared = prepare_data(config.data, files)
        tracking.log_dataset(prepared, config)
        with tempfile.TemporaryDirectory() as scratch:
            checkpoint = Path(scratch) / "checkpoint.pt"
            if resume_run_id is not None:  # without a whole checkpoint (killed in its first epoch) it starts over
                checkpoint = tracking.download_checkpoint(resume_run_id, Path(scratch)) or checkpoint
            report = training.EpochReport(extra=tutorials.figure_names(config))
            callbacks = [tracking.MLflowCallback(checkpoint_path=checkpoint, samples=config.pictures.samples), report]
            model, state = train_model(
                config, prepared, callbacks=callbacks, checkpoint_path=checkpoint, resume=resume_run_id is not None
            )
        metrics = evaluate_model(model, prepared.test, config)
        if config.eval.fid:
            classifier = get_classifier(config.data.dataset, files, config.classifier, device=config.train.device, lock_dir=config.data.cache_dir)
            mlflow.set_tag(sample_quality.CLASSIFIER_TAG, classifier.uri)
            metrics |= score_samples(model, classifier.classifier, files, prepared.test, config)
        log_evaluation(model, prepared.test, prepared.class_names, metrics, config.pictures)
        model_uri = version = decision = None
        if model_step in ("log", "register"):
            model_uri = log_model(model, config.model, prepared.test.pixels[:4])
        if model_step == "register":
            version = register_model(model_uri, config, metrics, run.info.run_id)
            decision = promote_model(config, metrics, version)
    return TrainingOutcome(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        tracking_uri=tracking_uri,
        metrics=metrics,
        epochs_trained=state.epoch,
        registered_model=config.model_name if version else None,
        version=version,
        alias=decision.alias if decision else None,
        promotion_reason=decision.reason if decision else None,
        model_uri=model_uri,
        tutorial_figures={name: state.history[-1][name] for name in tutorials.figure_names(config) if state.history and name in state.history[-1]},
        training_minutes=state.training_minutes,
        validation_elbo_nats=state.final_val_elbo_nats,
    )


def announce_run(run_id: str, config: RunConfig, tracking_uri: str) -> None:
    """Print the run id and the command that resumes the run, and record that command on the run, before any work:
    a run whose process dies is then found and continued without searching the store."""
    command = tracking.resume_command(run_id, tracking_uri)
    mlflow.set_tag(tracking.RESUME_COMMAND_TAG, command)
    print(f"MLflow run {run_id} (experiment {config.experiment_name}); if it is interrupted, resume it with:\n"
          f"  {command}", flush=True)


def summary_markdown(config: RunConfig, outcome: TrainingOutcome) -> str:
    """The flow run's report: test metrics, the MLflow run and how to open it, and the registry outcome."""
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in outcome.metrics.items())
    note = "; ".join(training.run_notes(config))
    address = tracking.ui_url(outcome.experiment_id, outcome.run_id, tracking_uri=outcome.tracking_uri)
    local = not tracking.is_tracking_server(outcome.tracking_uri)
    ui_link = f"[open it in the MLflow UI]({address})" + (" once `python flows.py ui` serves the store" if local else "")
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

Run `{outcome.run_id}` in experiment `{config.experiment_name}` of `{redact(outcome.tracking_uri)}`: {ui_link}.

## Registry

{registry_text}
"""


# --- sweeps: trials in parallel on Dask, nested under one MLflow run -------------------------------------------------


def dask_task_runner(address: str | None = None, workers: int = LOCAL_WORKERS) -> DaskTaskRunner:
    """Prefect's Dask task runner on the scheduler at ``address``, else on a local cluster of ``workers`` processes
    of one thread each (Dask also starts them with OMP_NUM_THREADS=1).

    The local cluster's scheduler, workers and dashboard listen on 127.0.0.1 only: Dask runs the pickled functions
    any client sends it, without authentication (its dashboard would otherwise listen on every interface).
    """
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": workers, "threads_per_worker": 1, "processes": True,
        "host": "127.0.0.1", "dashboard_address": "127.0.0.1:8787",
    })


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


def run_sweep(base: RunConfig, grid: dict[str, list[Any]], samples: int | None = None, seed: int = 0) -> SweepOutcome:
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
        files = fetch_data(base.data.dataset, base.data.cache_dir)  # once, so that the trials read the cache, not all download
        if base.eval.fid:  # likewise the classifier: trained here if need be, found by every trial
            get_classifier(base.data.dataset, files, base.classifier, device=base.train.device, lock_dir=base.data.cache_dir)
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
            decision = promote_model(best.trial.config, best.metrics, version)
    return SweepOutcome(
        run_id=parent.info.run_id,
        experiment_id=parent.info.experiment_id,
        tracking_uri=tracking_uri,
        leaderboard=board,
        best_trial=best.trial.number,
        best_run_id=best.run_id,
        registered_model=base.model_name if version else None,
        version=version,
        alias=decision.alias if decision else None,
        promotion_reason=decision.reason if decision else None,
    )


def __getattr__(name: str) -> Any:
    """``sweep_flow``, the flow ``sweep-vae`` (:func:`run_sweep`) on a local Dask cluster, made on first use: a training
    run imports this module, and Dask, which it does not need, costs a quarter of a second to import."""
    if name == "sweep_flow":
        globals()[name] = flow(run_sweep, name="sweep-vae", log_prints=True, task_runner=dask_task_runner())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        sweep.TrialResult(
            trial, outcome.run_id, outcome.metrics, outcome.model_uri,
            training_minutes=outcome.training_minutes, validation_elbo_nats=outcome.validation_elbo_nats,
        )
        if isinstance(outcome, TrainingOutcome)
        else sweep.TrialResult(trial, nested.get(str(trial.number)), error=_error_text(outcome))
        for trial, outcome in zip(trials, outcomes)
    ]


def _error_text(error: BaseException) -> str:
    """"<error class>: <message>", as a trial's :class:`pipeline.sweep.TrialError` already says it."""
    return str(error) if isinstance(error, sweep.TrialError) else f"{type(error).__name__}: {error}"


# --- scheduled retraining: a cron deployment of the training flow on a Prefect server ---------------------------------


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


def serve_retraining(config: RunConfig, schedule: Schedule, name: str) -> None:
    """Create the deployment ``name`` of the training flow with ``schedule`` on the Prefect server in PREFECT_API_URL
    and run its flow runs in this process until interrupted (which pauses the schedule)."""
    retraining = train_flow.to_deployment(
        name=name,
        schedule=schedule,
        parameters={"config": config.model_dump(mode="json")},  # validated as a RunConfig by every run
        description=f"Scheduled retraining of {config.preset} on {config.data.dataset}; each run competes for "
        f"{config.model_name}@champion.",
        tags=["scheduled-retraining", config.data.dataset],
    )
    # Not train_flow.serve(): that pickles the flow into each run's process, where its annotations (RunConfig, under
    # `from __future__ import annotations`) no longer resolve. A Runner starts each run as `python -m prefect.engine`,
    # which imports this file afresh.
    runner = _PausingRunner(f"{train_flow.name}/{name}")
    runner.add_deployment(retraining)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal):
        pass
    finally:
        runner.pause_deployment()  # after Ctrl-C (and again after SIGTERM: pausing is idempotent)


class _PausingRunner(Runner):
    """A Prefect Runner that pauses its deployment itself, before it stops on SIGTERM, instead of Prefect's own pausing:
    that runs while asyncio tears the event loop down, where it was seen to hang until the process was killed, leaving
    the schedule active."""

    def __init__(self, deployment_name: str) -> None:
        super().__init__(pause_on_shutdown=False)
        self.deployment_name = deployment_name

    def pause_deployment(self) -> None:
        """Pause the deployment's schedule, or warn that it stays active (the server may be gone) and go on stopping."""
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                client.pause_deployment(client.read_deployment_by_name(self.deployment_name).id)
        except Exception as error:  # noqa: BLE001 - stopping must not fail on it
            print(redact(f"warning: could not pause the deployment {self.deployment_name} ({error}); its schedule stays "
                         "active with nothing to run it: pause it in the Prefect UI"), file=sys.stderr)

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        self.pause_deployment()
        super().handle_sigterm(*args, **kwargs)
