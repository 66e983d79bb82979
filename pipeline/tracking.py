"""The MLflow side of a run: the store, the run, its params, dataset, metrics and images."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from PIL import Image
from sqlalchemy.engine import make_url
from torch import nn

from pipeline import pictures
from pipeline.config import TEST_IMAGE_FIELDS, ConfigError, RunConfig, experiment_name, validate
from pipeline.data import DATASETS, PreparedData
from vae.data import ImageSet
from vae.engine import Callback, TrainingState

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # whose git commit a run records
MLRUNS_DIR = PROJECT_ROOT / "mlruns"  # the default store: mlflow.db and artifacts/ in here
ERROR_TAG_CHARS = 500  # the "error" tag holds the start of the message; error.txt holds the traceback
SAMPLES = 16  # decoded from the same z after every epoch: a 4x4 grid
CONFIG_ARTIFACT = "config.json"  # the resolved config, from which a run is evaluated or resumed
CHECKPOINT_ARTIFACT = "checkpoint/checkpoint.pt"  # the latest epoch's checkpoint
SAMPLES_KEY = "samples"  # the image series of prior samples, one per epoch

# Which settings of the data section shape each split, besides the published files (their content digest).
SPLIT_SETTINGS = {
    "training": ("validation_size", "split_seed", "train_subset", "binarization", "binarization_seed"),
    "validation": ("validation_size", "split_seed", "binarization", "binarization_seed"),
    "test": tuple(field.removeprefix("data.") for field in TEST_IMAGE_FIELDS if field != "data.dataset"),
}

_ready: set[str] = set()  # tracking URIs whose store this process has ensured


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI if set (a remote server works unchanged), else the SQLite store in ``mlruns/``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{MLRUNS_DIR / 'mlflow.db'}"


def ensure_store(tracking_uri: str | None = None) -> str:
    """Make MLflow track to ``tracking_uri`` (default: :func:`default_tracking_uri`) and return it.

    A SQLite store is created on first use, with its artifacts in ``artifacts/`` beside the database, under a file lock
    (``<db>.lock``): MLflow's first-time migrations corrupt a database that two processes create at once. Call it once
    before any parallel work; calling it again is cheap.
    """
    uri = tracking_uri or default_tracking_uri()
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
    """The id of the data set's experiment ("vae-mnist"), created on first use.

    In a SQLite store its artifacts go to ``artifacts/<experiment name>/`` beside the database; a tracking server
    chooses the artifact location itself.
    """
    name = experiment_name(dataset)
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
    ``parent_run_id`` if given (MLflow's "mlflow.parentRunId" tag). The tags are :func:`run_tags` plus ``tags``. With
    ``resume_run_id`` that run is reopened instead: params it does not have yet are added (MLflow keeps a param's
    first value; changed values go to the "resumed_with_changes" tag), ``config.json`` is replaced by ``config`` and
    the "resumed" tag counts the resumptions. The run ends FINISHED when the block completes. When it raises, the run
    ends FAILED (KILLED on Ctrl-C) with the error in the "error" tag (its class and the start of its message) and its
    traceback in ``error.txt``, and the exception propagates.
    """
    ensure_store(tracking_uri)
    all_tags = {**run_tags(config), **(tags or {})}
    params = flat_params(config)
    if resume_run_id is None:
        run = mlflow.start_run(
            experiment_id=experiment(config.data.dataset), run_name=run_name, tags=all_tags, parent_run_id=parent_run_id
        )
    else:
        previous = mlflow.MlflowClient().get_run(resume_run_id)
        run = mlflow.start_run(run_id=resume_run_id)
        logged = previous.data.params
        changes = [f"{key}: {logged[key]} -> {value}" for key, value in params.items() if logged.get(key, value) != value]
        params = {key: value for key, value in params.items() if key not in logged}
        all_tags["resumed"] = str(int(previous.data.tags.get("resumed", "0")) + 1)
        if changes:
            all_tags["resumed_with_changes"] = "; ".join(changes)
        if "error" in previous.data.tags:  # the error that interrupted it is history now (error.txt stays)
            mlflow.delete_tag("error")
        mlflow.set_tags(all_tags)
    try:
        mlflow.log_params(params)
        mlflow.log_dict(config.model_dump(mode="json"), CONFIG_ARTIFACT)
        yield run
    except BaseException as error:
        _record_error(error)
        status = RunStatus.KILLED if isinstance(error, KeyboardInterrupt) else RunStatus.FAILED
        mlflow.end_run(RunStatus.to_string(status))
        raise
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def run_config(run_id: str) -> RunConfig:
    """The resolved config a run was trained with, read back from its ``config.json``."""
    try:
        values = mlflow.artifacts.load_dict(f"runs:/{run_id}/{CONFIG_ARTIFACT}")
    except MlflowException as error:
        raise ConfigError(f"run {run_id} has no readable {CONFIG_ARTIFACT} ({error.message})") from None
    return validate(values)


def download_checkpoint(run_id: str, directory: Path) -> Path:
    """The latest training checkpoint of a run (see :class:`MLflowCallback`), downloaded into ``directory``."""
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=str(directory))
    except MlflowException as error:
        raise FileNotFoundError(f"run {run_id} has no checkpoint to resume from ({error.message})") from None
    return Path(local)


def _record_error(error: BaseException) -> None:
    try:
        mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:ERROR_TAG_CHARS])
        mlflow.log_text("".join(traceback.format_exception(error)), "error.txt")
    except Exception as failure:  # the store may be what failed; the run still has to end and the error to propagate
        error.add_note(f"(could not record this error in MLflow: {type(failure).__name__}: {failure})")


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
    shaped = hashlib.sha256(json.dumps({"split": split, **settings}, sort_keys=True).encode()).hexdigest()
    return f"{content_digest[:8]}-{shaped[:8]}"


def log_dataset(prepared: PreparedData, config: RunConfig) -> None:
    """The training, validation (if any) and test splits as dataset inputs of the active run.

    Each is named after the data set, has a :func:`split_digest` and its image count as profile, and points at where
    the data set is published. The run is also tagged with the full content digest ("dataset_digest").
    """
    source = HTTPDatasetSource(DATASETS[prepared.name].hosts[0])
    splits = {"training": prepared.train, "validation": prepared.validation, "test": prepared.test}
    contexts = [context for context, images in splits.items() if images is not None]
    datasets = [
        ImageSplit(source, prepared.name, split_digest(prepared.digest, context, config), len(splits[context]))
        for context in contexts
    ]
    mlflow.log_inputs(datasets, contexts=contexts, tags_list=[None] * len(contexts))
    mlflow.set_tag("dataset_digest", prepared.digest)


class MLflowCallback(Callback):
    """Logs each epoch's metrics, a grid of samples decoded from the same z and the checkpoint; at the end the grids'
    GIF and the loss curves.

    Metrics (the history's, the epoch's seconds and the training minutes so far: training passes and validations) go
    to the active run at step = epoch. Under a learned prior the grid's z are drawn from the prior as it is at the
    epoch's end, with the same noise every epoch. The grids as the "samples" image series (one per step), the
    checkpoint (when the engine writes one, at ``checkpoint_path``) to ``checkpoint/checkpoint.pt``, replacing the
    previous epoch's, so that an interrupted run can be resumed from wherever its artifacts are. A resumed run's GIF
    starts from the grids its earlier epochs logged. The device training runs on becomes the "device" tag.
    """

    def __init__(self, *, checkpoint_path: Path | None = None, samples: int = SAMPLES, seed: int = 0):
        self.checkpoint_path, self.samples, self.seed = checkpoint_path, samples, seed
        self.frames: list[tuple[int, Image.Image]] = []

    def on_fit_start(self, state: TrainingState) -> None:
        self.frames = _logged_frames(mlflow.active_run().info.run_id, state.epoch) if state.epoch else []
        mlflow.set_tag("device", str(state.device))

    def on_epoch_end(self, state: TrainingState) -> None:
        elapsed = {"epoch_seconds": state.epoch_seconds[-1], "training_minutes": state.training_minutes}
        mlflow.log_metrics({**state.history[-1], **elapsed}, step=state.epoch)
        grid = pictures.prior_samples(state.model, pictures.prior_latents(state.model, self.samples, self.seed))
        # synchronous: MLflow 3.17 logs images in a background thread by default, and ending a run does not wait for it.
        mlflow.log_image(grid, key=SAMPLES_KEY, step=state.epoch, synchronous=True)
        self.frames.append((state.epoch, grid))
        if self.checkpoint_path is not None and Path(self.checkpoint_path).exists():
            mlflow.log_artifact(str(self.checkpoint_path), artifact_path=os.path.dirname(CHECKPOINT_ARTIFACT))

    def on_fit_end(self, state: TrainingState) -> None:
        if self.frames:
            epochs, grids = zip(*self.frames)
            gif = pictures.animated_gif(grids, captions=[f"epoch {epoch}" for epoch in epochs])
            _log_bytes(gif, "samples/samples.gif")
        if state.history:
            mlflow.log_image(pictures.loss_curves(state.history), artifact_file="loss_curves.png")


def _logged_frames(run_id: str, last_epoch: int) -> list[tuple[int, Image.Image]]:
    """The sample grids a run logged for epochs 1 to ``last_epoch`` (the latest one of each epoch), in order."""
    client = mlflow.MlflowClient()
    latest: dict[int, str] = {}
    for info in client.list_artifacts(run_id, "images"):  # images/samples+step+<n>+timestamp+<ms>+<uuid>.png
        parts = os.path.basename(info.path).split("+")
        if info.path.endswith(".png") and parts[0] == SAMPLES_KEY and parts[1] == "step" and int(parts[2]) <= last_epoch:
            latest[int(parts[2])] = max(latest.get(int(parts[2]), ""), info.path)
    with tempfile.TemporaryDirectory() as scratch:
        frames = []
        for epoch, path in sorted(latest.items()):
            with Image.open(client.download_artifacts(run_id, path, scratch)) as image:
                frames.append((epoch, image.copy()))
    return frames


def log_evaluation(
    model: nn.Module, test: ImageSet, class_names: Sequence[str] | None, metrics: Mapping[str, float]
) -> None:
    """The test metrics (every entry of ``metrics``: test_elbo_nats, test_nll_nats, ...) and the pictures of the
    trained model: reconstructions.png, latent_space.png and, for a 2-D latent, latent_manifold.png."""
    mlflow.log_metrics({name: float(value) for name, value in metrics.items()})
    mlflow.log_image(pictures.reconstructions(model, test, class_names), artifact_file="reconstructions.png")
    mlflow.log_image(pictures.latent_scatter(model, test, class_names), artifact_file="latent_space.png")
    if model.latent_dim == 2:
        mlflow.log_image(pictures.latent_manifold(model), artifact_file="latent_manifold.png")


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
