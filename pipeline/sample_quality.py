"""The sample-quality stage: the data set's classifier (trained once per verified data set and recipe, tracked as its
own MLflow run, registered as classifier-<dataset>, then found and reused by every later run) and a run's FID."""

from __future__ import annotations

import fcntl
import hashlib
import json
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.utils.time import get_current_time_millis

from pipeline import data, tracking
from pipeline.config import RunConfig, classifier_name
from vae.classifier import ARCHITECTURE, Classifier, accuracy, load_classifier, save_classifier, train_classifier
from vae.config import ClassifierConfig
from vae.data import ImageSet, binarize
from vae.distributed import resolve_device
from vae.models import VAE
from vae.sample_quality import sample_quality

ARTIFACT_DIR = "classifier"  # in the classifier's run: the weights, as registered
WEIGHTS_FILE = "classifier.safetensors"
KEY_TAG = "classifier_key"  # on the classifier's run and registered version: see classifier_key
CLASSIFIER_TAG = "fid.classifier"  # on a training run: the registered classifier its FID was measured with


@dataclass(frozen=True)
class RegisteredClassifier:
    """The data set's classifier, loaded, with the registered version it is and whether this call trained it."""

    classifier: Classifier
    name: str
    version: str
    run_id: str
    test_accuracy: float
    trained: bool  # False: found in the registry and reused

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def classifier_key(recipe: ClassifierConfig, dataset_digest: str) -> str:
    """What identifies a classifier: a SHA-256 of the data set's content digest, the recipe and the network's layout.

    Equal keys mean a classifier trained the same way on the same verified files, so one registered version serves
    every run with that key; a changed recipe (or layout, or data) gets a new one.
    """
    identity = {"architecture": ARCHITECTURE, "dataset_digest": dataset_digest, "recipe": recipe.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def find_classifier(dataset: str, key: str, *, client: MlflowClient | None = None) -> ModelVersion | None:
    """The first registered version of ``classifier-<dataset>`` with this :func:`classifier_key`, or None."""
    client = client or MlflowClient()
    found = client.search_model_versions(f"name = '{classifier_name(dataset)}' AND tags.{KEY_TAG} = '{key}'")
    return min(found, key=lambda version: int(version.version), default=None)


def ensure_classifier(
    dataset: str,
    files: Mapping[str, Path],
    recipe: ClassifierConfig,
    *,
    device: str = "auto",
    lock_dir: Path | None = None,
) -> RegisteredClassifier:
    """The data set's registered classifier for ``recipe``: found in the tracking store and loaded, or, the first time,
    trained on the verified ``files`` (all training images, in grayscale), tracked as its own run and registered.

    Processes on one machine that ask at once (sweep trials, parallel runs) take turns through a lock file in
    ``lock_dir`` (default: the data cache): one trains, the others then find its version.
    """
    key = classifier_key(recipe, data.DATASETS[dataset].digest)
    with _machine_lock(Path(lock_dir or data.default_cache_dir()) / f"classifier-{key[:16]}.lock"):
        found = find_classifier(dataset, key)
        if found is not None:
            return _load(found, trained=False, device=device)
        return _train_and_register(dataset, files, recipe, key, device)


def score(
    model: VAE, classifier: Classifier, files: Mapping[str, Path], test: ImageSet, config: RunConfig
) -> dict[str, float]:
    """The run's sample-quality metrics: ``test_fid`` (``eval.fid_samples`` prior samples against the data set's
    10,000 test images in grayscale), ``test_reconstruction_fid`` and ``test_reconstruction_accuracy`` (the test set as
    the model sees it, reconstructed); see :func:`vae.sample_quality.sample_quality`."""
    raw = data.read(config.data.dataset, files)
    reference = binarize(raw.test_images, raw.test_labels, "none").pixels
    quality = sample_quality(
        model, classifier, reference, test,
        samples=config.eval.fid_samples, batch_size=config.eval.batch_size, seed=config.eval.seed,
    )
    return {f"test_{name}": value for name, value in quality.items()}


def _load(version: ModelVersion, *, trained: bool, device: str) -> RegisteredClassifier:
    with tempfile.TemporaryDirectory() as scratch:
        path = mlflow.artifacts.download_artifacts(
            run_id=version.run_id, artifact_path=f"{ARTIFACT_DIR}/{WEIGHTS_FILE}", dst_path=scratch
        )
        classifier = load_classifier(path, device=resolve_device(device))
    return RegisteredClassifier(
        classifier, version.name, str(version.version), version.run_id, float(version.tags["test_accuracy"]), trained
    )


def _train_and_register(
    dataset: str, files: Mapping[str, Path], recipe: ClassifierConfig, key: str, device: str
) -> RegisteredClassifier:
    """Train the classifier in a run of its own (experiment ``classifier-<dataset>``), then register it.

    The run is created with the client, not as the active run: it happens inside a training run's active run. It
    ends FINISHED only once the weights are logged and the version registered; on an error it ends FAILED with the
    error in its "error" tag and traceback in ``error.txt``, and nothing is registered.
    """
    client = MlflowClient()
    name = classifier_name(dataset)
    commit, dirty = tracking.git_revision(tracking.PROJECT_ROOT)
    tags = {
        "dataset": dataset, "dataset_digest": data.DATASETS[dataset].digest, KEY_TAG: key,
        "torch_version": torch.__version__, "git_commit": commit, "git_dirty": dirty,
    }
    run = client.create_run(tracking.named_experiment(name), run_name=name, tags=tags)
    run_id = run.info.run_id
    try:
        params = {f"classifier.{field}": json.dumps(value) for field, value in recipe.model_dump(mode="json").items()}
        client.log_batch(run_id, params=[Param(field, value) for field, value in params.items()])
        raw = data.read(dataset, files)
        train = binarize(raw.train_images, raw.train_labels, "none")
        test = binarize(raw.test_images, raw.test_labels, "none")
        print(f"training the {name} classifier (once per data set and recipe) ...", flush=True)
        classifier, history = train_classifier(recipe, train.pixels, train.labels, device=resolve_device(device))
        test_accuracy = accuracy(classifier, test.pixels, test.labels)
        now = get_current_time_millis()
        metrics = [
            Metric(metric, value, now, epoch)
            for epoch, record in enumerate(history, start=1)
            for metric, value in (("train_loss", record["train_loss"]), ("train_accuracy", record["train_accuracy"]), ("epoch_seconds", record["seconds"]))
        ]
        metrics += [Metric("test_accuracy", test_accuracy, now, 0), Metric("train_seconds", sum(r["seconds"] for r in history), now, 0)]
        client.log_batch(run_id, metrics=metrics)
        with tempfile.TemporaryDirectory() as scratch:
            weights = Path(scratch) / WEIGHTS_FILE
            save_classifier(classifier, weights)
            client.log_artifact(run_id, str(weights), ARTIFACT_DIR)
        version = _register(client, name, run_id, key, dataset, test_accuracy)
        print(f"  {name}: test accuracy {test_accuracy:.2%}, registered as models:/{name}/{version}", flush=True)
    except BaseException as error:
        tracking.record_error(run_id, error)
        client.set_terminated(run_id, RunStatus.to_string(tracking.failed_status(error)))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return RegisteredClassifier(classifier, name, version, run_id, test_accuracy, trained=True)


def _register(client: MlflowClient, name: str, run_id: str, key: str, dataset: str, test_accuracy: float) -> str:
    try:
        client.create_registered_model(name, description=f"The {dataset} classifier whose penultimate features FID uses.")
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    tags = {KEY_TAG: key, "dataset_digest": data.DATASETS[dataset].digest, "test_accuracy": repr(test_accuracy)}
    # The weights are a safetensors file, not an MLflow model: the version points at the run's artifact folder.
    version = client.create_model_version(name, f"runs:/{run_id}/{ARTIFACT_DIR}", run_id=run_id, tags=tags)
    return str(version.version)


@contextmanager
def _machine_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
