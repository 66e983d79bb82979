"""The MLflow side of a run: the store, the run, its params, dataset, metrics and images."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import psutil
import requests
import torch
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import RunStatus, RunTag
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from PIL import Image
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from torch import nn

from pipeline import pictures
from pipeline.config import TEST_IMAGE_FIELDS, ConfigError, PicturesConfig, RunConfig, experiment_name, validate
from pipeline.data import DATASETS, PreparedData
from pipeline.redaction import redact
from vae.data import ImageSet
from vae.checkpoint import load_checkpoint
from vae.engine import Callback, TrainingState

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # whose git commit a run records
MLRUNS_DIR = PROJECT_ROOT / "mlruns"  # the default store: mlflow.db and artifacts/ in here
ERROR_TAG_CHARS = 500  # the "error" tag holds the start of the message; error.txt holds the traceback
CONFIG_ARTIFACT = "config.json"  # the resolved config, from which a run is evaluated or resumed
CHECKPOINT_ARTIFACT = "checkpoint/checkpoint.pt"  # the latest epoch's checkpoint
# The same checkpoint, uploaded just before it: an upload is not atomic, and whenever a kill or a power cut tears one of
# the two copies, the other one is whole (the new epoch's, or the previous one's).
NEXT_CHECKPOINT_ARTIFACT = "checkpoint/next/checkpoint.pt"
SAMPLES_KEY = "samples"  # the image series of prior samples, one per epoch

# Who runs a run: recorded when it starts (and again when it resumes), so that a run whose process died without
# closing it (SIGKILL, power loss) can be told from one still training. pids are reused: the start time tells a later
# process with the same id apart.
HOST_TAG, PID_TAG, PROCESS_STARTED_TAG = "process.host", "process.pid", "process.started"
PROCESS_START_TOLERANCE_S = 1.0  # the start time read back may move with wall-clock adjustments
RESUME_COMMAND_TAG = "resume_command"  # the command that continues a training run from its last checkpoint
KILLED_TAG = "killed"  # on a run marked KILLED because its process was gone: what was found, and how to resume it

# Which settings of the data section shape each split, besides the published files (their content digest).
SPLIT_SETTINGS = {
    "training": ("validation_size", "split_seed", "train_subset", "binarization", "binarization_seed", "training_images"),
    "validation": ("validation_size", "split_seed", "binarization", "binarization_seed"),
    "test": tuple(field.removeprefix("data.") for field in TEST_IMAGE_FIELDS if field != "data.dataset"),
}

# How a SQL store's unique-key violation reads once a tracking server has turned it into text: SQLite, PostgreSQL
# (psycopg2 and asyncpg), MySQL.
UNIQUE_KEY_VIOLATIONS = ("UNIQUE constraint failed", "UniqueViolation", "duplicate key value", "Duplicate entry")

_ready: set[str] = set()  # tracking URIs whose store this process has ensured
_logger = logging.getLogger(__name__)


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI if set (a remote server works unchanged), else the SQLite store in ``mlruns/``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or _project_store_uri()


def is_tracking_server(uri: str) -> bool:
    """Whether the tracking URI names an MLflow tracking server (which serves the UI itself), not a local store."""
    return uri.startswith(("http://", "https://"))


def _project_store_uri() -> str:
    return f"sqlite:///{MLRUNS_DIR / 'mlflow.db'}"


def ensure_store(tracking_uri: str | None = None) -> str:
    """Make MLflow track to ``tracking_uri`` (default: :func:`default_tracking_uri`) and return it.

    A SQLite store is created on first use, with its artifacts in ``artifacts/`` beside the database, under a file lock
    (``<db>.lock``): MLflow's first-time migrations corrupt a database that two processes create at once. Call it once
    before any parallel work; calling it again is cheap. When the URI holds credentials, MLflow's own "View run at
    <tracking URI>/..." line, which would print them, is switched off (this process and those it starts).
    """
    uri = tracking_uri or default_tracking_uri()
    if redact(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    database = _sqlite_path(uri)
    if database is not None and uri not in _ready:
        database.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{database}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                # Creates the tables (and the Default experiment, with its artifacts beside the database) if missing.
                SqlAlchemyStore(uri, _artifact_root(database).as_uri())
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        _ready.add(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def experiment(dataset: str) -> str:
    """The id of the data set's experiment ("vae-mnist"), created on first use (see :func:`named_experiment`)."""
    return named_experiment(experiment_name(dataset))


def named_experiment(name: str) -> str:
    """The id of the experiment ``name``, created on first use.

    In a SQLite store its artifacts go to ``artifacts/<experiment name>/`` beside the database; a tracking server
    chooses the artifact location itself.
    """
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    database = _sqlite_path(mlflow.get_tracking_uri())
    location = (_artifact_root(database) / name).as_uri() if database is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as error:  # another process created it in between
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(name).experiment_id


def experiments() -> dict[str, str]:
    """Name -> id of the store's experiments of runs (the pipeline's "vae-*" ones first, then any other but Default)."""
    found = {e.name: e.experiment_id for e in mlflow.MlflowClient().search_experiments() if e.name != "Default"}
    return dict(sorted(found.items(), key=lambda item: (not item[0].startswith("vae-"), item[0])))


def flat_params(config: RunConfig) -> dict[str, str]:
    """The whole resolved config as dotted params: {"train.learning_rate": "0.001", "model.hidden_dims": "[400]"}.

    Values are cut to MLflow's limit of characters per param value.
    """
    flat: dict[str, str] = {}

    def walk(prefix: str, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, Mapping):
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = str(value)[:MAX_PARAM_VAL_LENGTH]

    walk("", config.model_dump(mode="json"))
    return flat


def run_tags(config: RunConfig) -> dict[str, str]:
    """The tags every run carries: preset, data set, torch version and the project's git commit."""
    commit, dirty = git_revision(PROJECT_ROOT)
    return {
        "preset": config.preset,
        "dataset": config.data.dataset,
        "torch_version": torch.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
    }


def git_revision(root: Path) -> tuple[str, str]:
    """The commit checked out at ``root`` and whether the work tree differs from it ("true"/"false").

    ("unknown", "unknown") when ``root`` is not a git checkout or git is not installed.
    """
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown", "unknown"
        # --no-optional-locks: a status check must not rewrite the index of the checkout it looks at.
        status = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain"],
            cwd=root, capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", "unknown"
    dirty = "unknown" if status.returncode != 0 else str(bool(status.stdout.strip())).lower()
    return head.stdout.strip(), dirty


@contextmanager
def start_run(
    config: RunConfig,
    *,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    resume_run_id: str | None = None,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run in the data set's experiment, with the config as params and ``config.json``, and tags.

    The run goes to the store at ``tracking_uri`` (default: :func:`default_tracking_uri`), nested under
    ``parent_run_id`` if given (MLflow's "mlflow.parentRunId" tag). The tags are :func:`run_tags`, :func:`process_tags`
    (who runs it) and ``tags``. Before the run starts, runs of the experiment whose process died are marked KILLED
    (:func:`mark_dead_runs`). With ``resume_run_id`` that run is reopened instead (refused with
    :class:`RunInProgressError` while its process is alive): params it does not have yet are added (MLflow keeps a
    param's first value; changed values go to the "resumed_with_changes" tag), ``config.json`` is replaced by ``config``
    and the "resumed" tag counts the resumptions. The run ends FINISHED when the block completes. When it raises, the
    run ends FAILED (KILLED on Ctrl-C) with the error in the "error" tag (its class and the start of its message) and
    its traceback in ``error.txt``, and the exception propagates.
    """
    ensure_store(tracking_uri)
    client = mlflow.MlflowClient()
    all_tags = {**run_tags(config), **process_tags(), **(tags or {})}
    params = flat_params(config)
    if resume_run_id is None:
        experiment_id = experiment(config.data.dataset)
        mark_dead_runs([experiment_id])
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags, parent_run_id=parent_run_id)
    else:
        check_not_running(resume_run_id)
        mark_dead_runs([client.get_run(resume_run_id).info.experiment_id])
        previous = client.get_run(resume_run_id)  # as marked, if it was
        # This process's tags go on before the run is RUNNING again, so that no one sees it RUNNING under the old,
        # dead process and marks it KILLED.
        client.log_batch(resume_run_id, tags=[RunTag(key, value) for key, value in process_tags().items()])
        run = mlflow.start_run(run_id=resume_run_id)
        logged = previous.data.params
        changes = [f"{key}: {logged[key]} -> {value}" for key, value in params.items() if logged.get(key, value) != value]
        params = {key: value for key, value in params.items() if key not in logged}
        all_tags["resumed"] = str(int(previous.data.tags.get("resumed", "0")) + 1)
        if changes:
            all_tags["resumed_with_changes"] = "; ".join(changes)
        for stale in ("error", KILLED_TAG):  # what interrupted it is history now (error.txt stays)
            if stale in previous.data.tags:
                mlflow.delete_tag(stale)
        mlflow.set_tags(all_tags)
    try:
        mlflow.log_params(params)
        mlflow.log_dict(config.model_dump(mode="json"), CONFIG_ARTIFACT)
        yield run
    except BaseException as error:
        status = RunStatus.to_string(failed_status(error))
        # When the store is what failed, the client has just spent all its retries on it: ask once more, not for minutes.
        with _http_retries(1 if store_unreachable(error) else None):
            record_error(run.info.run_id, error)
            try:
                mlflow.end_run(status)
            except Exception as failure:
                run_id = run.info.run_id
                error.add_note(
                    f"MLflow run {run_id} could not be marked {status} ({type(failure).__name__}), so the store still "
                    f"shows it RUNNING. Once the tracking store answers again, resume it: flows.py train --resume "
                    f"{run_id}"
                )  # (mlflow.end_run has forgotten the run in this process before telling the store)
        raise
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def store_unreachable(error: BaseException) -> bool:
    """Whether ``error`` comes from the tracking server not answering (refused, reset or timed out) after the
    client's retries, rather than from the run itself."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextmanager
def _http_retries(retries: int | None) -> Iterator[None]:
    """MLflow's client retries each HTTP request this many times inside the block (it reads the variable per request);
    None leaves the setting alone."""
    if retries is None:
        yield
        return
    previous = os.environ.get(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name)
    os.environ[MLFLOW_HTTP_REQUEST_MAX_RETRIES.name] = str(retries)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, None)
        else:
            os.environ[MLFLOW_HTTP_REQUEST_MAX_RETRIES.name] = previous


# --- runs whose process died -----------------------------------------------------------------------------------------


class RunInProgressError(RuntimeError):
    """The run is RUNNING in a process that is still alive: it cannot be resumed by another one."""


def process_tags() -> dict[str, str]:
    """This host's name and this process's id and start time (seconds since the epoch), as run tags."""
    me = psutil.Process()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(me.pid), PROCESS_STARTED_TAG: f"{me.create_time():.3f}"}


def process_alive(tags: Mapping[str, str]) -> bool | None:
    """Whether the process that :func:`process_tags` describes is still running: None when it cannot be told (another
    host, or no process recorded). A process with the recorded id but another start time is a later one: not alive."""
    if tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in tags or PROCESS_STARTED_TAG not in tags:
        return None
    try:
        started = psutil.Process(int(tags[PID_TAG])).create_time()
    except psutil.NoSuchProcess:  # a zombie (killed, not yet reaped by its parent) counts as gone too
        return False
    return abs(started - float(tags[PROCESS_STARTED_TAG])) < PROCESS_START_TOLERANCE_S


def check_not_running(run_id: str) -> None:
    """Raise :class:`RunInProgressError` if the run is RUNNING in a process that is alive; a run RUNNING on another
    host, which cannot be checked from here, is reported on stderr and let through (its machine may be gone)."""
    run = mlflow.MlflowClient().get_run(run_id)
    if run.info.status != "RUNNING":
        return
    tags, run_id = run.data.tags, run.info.run_id
    alive = process_alive(tags)
    if alive:
        raise RunInProgressError(
            f"run {run_id} is still running in process {tags[PID_TAG]} on this host ({tags[HOST_TAG]}): "
            "stop that process first, or wait for it to finish"
        )
    if alive is None and HOST_TAG in tags:
        print(f"warning: run {run_id} is marked RUNNING by process {tags.get(PID_TAG)} on {tags[HOST_TAG]}, which "
              "cannot be checked from here; resuming it anyway", file=sys.stderr, flush=True)


def mark_dead_runs(experiment_ids: Sequence[str] | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of these experiments (default: all of the store's) whose process (recorded by
    :func:`process_tags`) is gone from this host, each with a "killed" tag saying what was found and how to resume it;
    return their ids, and say so on stdout. Runs on other hosts, and runs without a recorded process, are left as they
    are."""
    client = mlflow.MlflowClient()
    if experiment_ids is None:
        experiment_ids = [found.experiment_id for found in mlflow.search_experiments()]  # every page
    host = socket.gethostname()
    query = f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
    killed, token = [], None
    while True:
        page = client.search_runs(list(experiment_ids), query, page_token=token)
        for run in page:
            if process_alive(run.data.tags) is not False:
                continue
            current = client.get_run(run.info.run_id)  # read again: it may have been resumed since the search
            if current.info.status != "RUNNING" or process_alive(current.data.tags) is not False:
                continue
            tags = current.data.tags
            how = (
                f"resume it with: {tags[RESUME_COMMAND_TAG]}" if RESUME_COMMAND_TAG in tags
                else "it cannot be resumed: run it again"
            )
            reason = f"process {tags[PID_TAG]} on {host} ended without closing this run; {how}"
            client.set_tag(run.info.run_id, KILLED_TAG, reason)
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))  # end time: when found
            print(f"run {run.info.run_id} marked KILLED: {reason}", flush=True)
            killed.append(run.info.run_id)
        token = page.token
        if not token:
            return killed


def resume_command(run_id: str, tracking_uri: str | None = None) -> str:
    """The shell command that continues training run ``run_id`` from its last checkpoint, from any directory.

    It names the store when it is not the project's default (credentials in its URI masked: see :func:`redact`).
    """
    command = shlex.join([sys.executable, str(PROJECT_ROOT / "flows.py"), "train", "--resume", run_id])
    uri = tracking_uri or default_tracking_uri()
    if uri == _project_store_uri():
        return command
    return f"MLFLOW_TRACKING_URI={shlex.quote(redact(uri))} {command}"


def run_config(run_id: str) -> RunConfig:
    """The resolved config a run was trained with, read back from its ``config.json``."""
    try:
        values = mlflow.artifacts.load_dict(f"runs:/{run_id}/{CONFIG_ARTIFACT}")
    except MlflowException as error:
        raise ConfigError(f"run {run_id} has no readable {CONFIG_ARTIFACT} ({error.message})") from None
    return validate(values)


def download_checkpoint(run_id: str, directory: Path) -> Path | None:
    """The latest whole training checkpoint of a run (see :class:`MLflowCallback`), downloaded into ``directory``.

    Both uploaded copies are downloaded and checked (:func:`vae.checkpoint.load_checkpoint`); the later epoch's whole
    copy is used. Which one, and why the other was passed over, is printed. None, printing why, when no copy is whole
    (a run killed in its first epoch has none): the run then trains again from the start.
    """
    whole, problems = [], []
    for artifact in (CHECKPOINT_ARTIFACT, NEXT_CHECKPOINT_ARTIFACT):
        into = directory / os.path.dirname(artifact)  # one folder each: MLflow puts a file under its bare name
        into.mkdir(parents=True, exist_ok=True)
        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(into)))
        except MlflowException as error:  # runs of earlier versions have no second copy
            problems.append(f"{artifact} is not there ({error.message})")
            continue
        try:
            whole.append((load_checkpoint(local)["epoch"], artifact == CHECKPOINT_ARTIFACT, artifact, local))
        except ValueError as error:
            problems.append(f"{artifact} is damaged, its upload cut short ({error})")
    if not whole:
        print(f"run {run_id} has no whole checkpoint ({'; '.join(problems)}): it trains again from the start", flush=True)
        return None
    epoch, _, artifact, local = max(whole)  # the later epoch; at equal epochs the usual name
    passed_over = [problem for problem in problems if "is damaged" in problem]
    passed_over += [f"{other} is of epoch {other_epoch}" for other_epoch, _, other, _ in whole if other_epoch < epoch]
    note = f" ({'; '.join(passed_over)})" if passed_over else ""
    print(f"resuming run {run_id} from the checkpoint of epoch {epoch}, {artifact}{note}", flush=True)
    return local


def record_error(run_id: str, error: BaseException) -> None:
    """The error in the run's "error" tag (its class and the start of its message) and its traceback in ``error.txt``,
    both :func:`redact`-ed (a source URL or the tracking URI in a message may hold a password); if the store cannot
    take them, a note on the error says so (the error is what matters)."""
    try:
        client = mlflow.MlflowClient()
        client.set_tag(run_id, "error", redact(error_summary(error))[:ERROR_TAG_CHARS])
        client.log_text(run_id, redact("".join(traceback.format_exception(error))), "error.txt")
    except Exception as failure:  # the store may be what failed; the run still has to end and the error to propagate
        error.add_note(redact(f"(could not record this error in MLflow: {type(failure).__name__}: {failure})"))


def error_summary(error: BaseException) -> str:
    """"<class>: <message>", the class alone for an error without a message, and the signal's name for one raised by
    a signal (Prefect's TerminationSignal, whose message would be the bare number: "TerminationSignal: SIGTERM")."""
    message = _signal_name(error) or str(error)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _signal_name(error: BaseException) -> str | None:
    """The name of the signal that ``error`` stands for (Prefect's TerminationSignal carries its number), if any."""
    number = getattr(error, "signal", None)
    try:
        return signal.Signals(number).name if isinstance(number, int) else None
    except ValueError:
        return None


def failed_status(error: BaseException) -> RunStatus:
    """How a run that ``error`` stopped ends: KILLED on Ctrl-C or a termination signal (SIGTERM, as Prefect's
    cancellation sends), else FAILED."""
    stopped = isinstance(error, KeyboardInterrupt) or _signal_name(error) is not None
    return RunStatus.KILLED if stopped else RunStatus.FAILED


class ImageSplit(MetaDataset):
    """One split of an image data set as MLflow knows it: name, digest, published source and image count."""

    def __init__(self, source: HTTPDatasetSource, name: str, digest: str, num_images: int):
        self._profile = {"num_rows": num_images}
        super().__init__(source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, int]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def split_digest(content_digest: str, split: str, config: RunConfig) -> str:
    """"<first 8 of the content digest>-<8 of a hash of the settings that shape the split>" (MLflow keeps 36 chars).

    Equal digests mean equal images: the same published files, split and binarized the same way.
    """
    settings = {name: getattr(config.data, name) for name in SPLIT_SETTINGS[split]}
    if settings.get("training_images") == "train":  # the default keeps the digests runs had before the setting
        del settings["training_images"]
    shaped = hashlib.sha256(json.dumps({"split": split, **settings}, sort_keys=True).encode()).hexdigest()
    return f"{content_digest[:8]}-{shaped[:8]}"


def log_dataset(prepared: PreparedData, config: RunConfig) -> None:
    """The training, validation (if any) and test splits as dataset inputs of the active run, unless it has them
    already (a resumed run logged them when it first started, unless it was killed before).

    Each is named after the data set, has a :func:`split_digest` and its image count as profile, and points at where
    the data set is published. The run is also tagged with the full content digest ("dataset_digest").
    """
    if mlflow.MlflowClient().get_run(mlflow.active_run().info.run_id).inputs.dataset_inputs:
        return
    source = HTTPDatasetSource(DATASETS[prepared.name].hosts[0])
    splits = {"training": prepared.train, "validation": prepared.validation, "test": prepared.test}
    contexts = [context for context, images in splits.items() if images is not None]
    datasets = [
        ImageSplit(source, prepared.name, split_digest(prepared.digest, context, config), len(splits[context]))
        for context in contexts
    ]
    _log_inputs(datasets, contexts)
    mlflow.set_tag("dataset_digest", prepared.digest)


def _log_inputs(datasets: Sequence[ImageSplit], contexts: Sequence[str]) -> None:
    """``mlflow.log_inputs``, again each time another run inserted one of the same datasets at the same moment.

    A SQL store keeps one row per (experiment, name, digest): it looks for the row, inserts it if missing, and links
    the run to it, in one transaction. Two runs of a sweep that log the same split at once both find nothing, and the
    second insert breaks the unique key, rolling back that run's whole transaction. Logging again is then correct
    (the row is there now, and the run gets linked to it) and ends: each collision means another run committed one of
    these datasets, so there are at most as many collisions as datasets.
    """
    for collisions in range(len(datasets) + 1):
        try:
            mlflow.log_inputs(list(datasets), contexts=list(contexts), tags_list=[None] * len(contexts))
            return
        except MlflowException as error:
            if collisions == len(datasets) or not _is_unique_key_violation(error):
                raise
            _logger.info("another run logged the same dataset at the same moment (%s): logging again", error.message[:200])


def _is_unique_key_violation(error: MlflowException) -> bool:
    """Whether the store refused a write because another one had just inserted the same key."""
    cause: BaseException | None = error
    while cause is not None:  # a local SQL store chains the driver's error
        if isinstance(cause, IntegrityError):
            return True
        cause = cause.__cause__
    return any(text in error.message for text in UNIQUE_KEY_VIOLATIONS)  # a tracking server sends only its text


class MLflowCallback(Callback):
    """Logs each epoch's checkpoint, metrics and a grid of samples; at the end the grids' GIF, the loss curves, and
    the epochs trained (``epochs_trained``).

    The checkpoint (when the engine writes one, at ``checkpoint_path``) goes first, to ``checkpoint/next/checkpoint.pt``
    and then to ``checkpoint/checkpoint.pt``, replacing the previous epoch's, so that an interrupted run can be resumed
    from wherever its artifacts are (:func:`download_checkpoint`). Then the metrics (the history's, the epoch's seconds
    and ``training_minutes``, the minutes of training passes and validations so far) go to the active run at step =
    epoch and the grid to the "samples" image series: whatever an epoch logged is covered by a checkpoint, so a resumed
    run never logs an epoch twice. The grid's z are drawn with the same noise every epoch, from the prior as it is at
    the epoch's end (a learned prior changes). A resumed run logs first what its last checkpointed epoch did not get to
    log before the interruption, and its GIF starts from the grids its earlier epochs logged. The device training runs
    on becomes the "device" tag.
    """

    def __init__(self, *, checkpoint_path: Path | None = None, samples: int = PicturesConfig().samples, seed: int = 0):
        self.checkpoint_path, self.samples, self.seed = checkpoint_path, samples, seed
        self.frames: list[tuple[int, Image.Image]] = []

    def on_fit_start(self, state: TrainingState) -> None:
        mlflow.set_tag("device", str(state.device))
        self.frames = []
        if state.epoch:
            run_id = mlflow.active_run().info.run_id
            self.frames = _logged_frames(run_id, state.epoch)
            self._log_what_the_interruption_cut_off(run_id, state)

    def on_epoch_end(self, state: TrainingState) -> None:
        if self.checkpoint_path is not None and Path(self.checkpoint_path).exists():
            for artifact in (NEXT_CHECKPOINT_ARTIFACT, CHECKPOINT_ARTIFACT):
                mlflow.log_artifact(str(self.checkpoint_path), artifact_path=os.path.dirname(artifact))
        self._log_epoch(state, state.epoch)
        self._log_grid(state)

    def on_fit_end(self, state: TrainingState) -> None:
        if self.frames:
            epochs, grids = zip(*self.frames)
            gif = pictures.animated_gif(grids, captions=[f"epoch {epoch}" for epoch in epochs])
            _log_bytes(gif, "samples/samples.gif")
        if state.history:
            mlflow.log_image(pictures.loss_curves(state.history), artifact_file="loss_curves.png")
        # What the leaderboard shows of training, with the last training_minutes: epochs done, resumptions included.
        mlflow.log_metric("epochs_trained", state.epoch)

    def _log_epoch(self, state: TrainingState, epoch: int) -> None:
        elapsed = {"epoch_seconds": state.epoch_seconds[epoch - 1], "training_minutes": state.training_minutes_after(epoch)}
        mlflow.log_metrics({**state.history[epoch - 1], **elapsed}, step=epoch)

    def _log_grid(self, state: TrainingState) -> None:
        """The grid of the model as it is now, at step ``state.epoch``."""
        grid = pictures.prior_samples(state.model, pictures.prior_latents(state.model, self.samples, self.seed))
        # synchronous: MLflow 3.17 logs images in a background thread by default, and ending a run does not wait for it.
        mlflow.log_image(grid, key=SAMPLES_KEY, step=state.epoch, synchronous=True)
        self.frames.append((state.epoch, grid))

    def _log_what_the_interruption_cut_off(self, run_id: str, state: TrainingState) -> None:
        """The metrics of checkpointed epochs that MLflow lacks, and the last one's grid (the model is that epoch's
        now): a kill after an epoch's checkpoint upload and before its metrics or grid leaves them out."""
        client = mlflow.MlflowClient()
        names = [*state.history[-1], "epoch_seconds", "training_minutes"]
        logged = {name: {metric.step for metric in client.get_metric_history(run_id, name)} for name in names}
        for epoch in range(1, state.epoch + 1):
            if any(epoch not in steps for steps in logged.values()):
                self._log_epoch(state, epoch)
        if not self.frames or self.frames[-1][0] != state.epoch:
            self._log_grid(state)


def _logged_frames(run_id: str, last_epoch: int) -> list[tuple[int, Image.Image]]:
    """The sample grids a run logged for epochs 1 to ``last_epoch`` (the latest one of each epoch), in order; a grid
    whose upload was cut short is left out."""
    client = mlflow.MlflowClient()
    latest: dict[int, str] = {}
    for info in client.list_artifacts(run_id, "images"):  # images/samples+step+<n>+timestamp+<ms>+<uuid>.png
        parts = os.path.basename(info.path).split("+")
        if info.path.endswith(".png") and parts[0] == SAMPLES_KEY and parts[1] == "step" and int(parts[2]) <= last_epoch:
            latest[int(parts[2])] = max(latest.get(int(parts[2]), ""), info.path)
    with tempfile.TemporaryDirectory() as scratch:
        frames = []
        for epoch, path in sorted(latest.items()):
            try:
                with Image.open(client.download_artifacts(run_id, path, scratch)) as image:
                    frames.append((epoch, image.copy()))
            except OSError:  # a truncated PNG
                continue
    return frames


def log_evaluation(
    model: nn.Module,
    test: ImageSet,
    class_names: Sequence[str] | None,
    metrics: Mapping[str, float],
    sizes: PicturesConfig = PicturesConfig(),
) -> None:
    """The test metrics (every entry of ``metrics``: test_elbo_nats, test_nll_nats, ...) and the pictures of the
    trained model: reconstructions.png, latent_space.png, for a 2-D latent latent_manifold.png, and, when ``sizes``
    asks for them, first_reconstructions.png."""
    mlflow.log_metrics({name: float(value) for name, value in metrics.items()})
    mlflow.log_image(pictures.reconstructions(model, test, class_names), artifact_file="reconstructions.png")
    if sizes.first_reconstructions:
        first = pictures.first_reconstructions(model, test, min(sizes.first_reconstructions, len(test)))
        mlflow.log_image(first, artifact_file="first_reconstructions.png")
    mlflow.log_image(pictures.latent_scatter(model, test, class_names), artifact_file="latent_space.png")
    if model.latent_dim == 2:
        mlflow.log_image(pictures.latent_manifold(model, n=sizes.manifold_size), artifact_file="latent_manifold.png")


LOCAL_UI = "http://127.0.0.1:5000"  # where `flows.py ui` serves a local store by default
# MLflow 3's UI opens experiments in its GenAI view unless told otherwise; the query names the runs view, which the
# browser then keeps for later visits.
ML_VIEW = "workflowType=machine_learning"


def ui_url(experiment_id: str, run_id: str | None = None, *, tracking_uri: str | None = None, ui: str | None = None) -> str:
    """The address that opens an experiment's runs (or one run) in the MLflow UI, in the runs view.

    The UI is the tracking server's own when ``tracking_uri`` (default: :func:`default_tracking_uri`) is one, else
    ``ui`` (default: :data:`LOCAL_UI`, where `flows.py ui` serves a local store).
    """
    uri = tracking_uri or default_tracking_uri()
    if is_tracking_server(uri):  # the server's address without credentials: the browser asks for them
        parts = urllib.parse.urlsplit(uri)
        base = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    else:
        base = ui or LOCAL_UI
    page = f"experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{base.rstrip('/')}/#/{page}?{ML_VIEW}"


def ui_command(tracking_uri: str, *, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The ``mlflow ui`` command line that serves a local store; experiments made in the UI keep artifacts beside it."""
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri, "--host", host, "--port", str(port)]
    command += ["--workers", "1"]  # one person browsing: starts in a quarter of the time of the default 4
    database = _sqlite_path(tracking_uri)
    if database is not None:
        command += ["--default-artifact-root", _artifact_root(database).as_uri()]
    return command


def _log_bytes(data: bytes, artifact_file: str) -> None:
    directory, name = os.path.split(artifact_file)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / name
        path.write_bytes(data)
        mlflow.log_artifact(str(path), artifact_path=directory or None)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, made absolute; None for any other store."""
    if not uri.startswith("sqlite:"):
        return None
    database = make_url(uri).database
    if not database or database == ":memory:":
        return None
    return Path(database).absolute()


def _artifact_root(database: Path) -> Path:
    return database.parent / "artifacts"
