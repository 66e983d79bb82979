"""Specification of the sample-quality stage: the data set's classifier is trained once per verified data set and
recipe, tracked as its own MLflow run, registered as classifier-<dataset> and found again; a run's FID metrics."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from pipeline import data, tracking
from pipeline.config import load_config
from pipeline.sample_quality import CLASSIFIER_TAG, KEY_TAG, classifier_key, ensure_classifier, find_classifier, score
from vae.config import ClassifierConfig
from vae.models import build_model
from tests.conftest import TINY_CLASSIFIER, needs_data

TINY = ClassifierConfig(**{key.removeprefix("classifier."): value for key, value in TINY_CLASSIFIER.items() if key.startswith("classifier.")})


def test_the_classifier_key_changes_with_the_recipe_and_the_data_and_nothing_else():
    digest = data.DATASETS["mnist"].digest
    key = classifier_key(TINY, digest)
    assert classifier_key(TINY.model_copy(), digest) == key
    assert classifier_key(TINY.model_copy(update={"epochs": 3}), digest) != key
    assert classifier_key(TINY, data.DATASETS["fashion-mnist"].digest) != key
    assert len(key) == 64 and CLASSIFIER_TAG == "fid.classifier"


@pytest.fixture
def mnist_files():
    return data.fetch("mnist")


@needs_data
@pytest.mark.usefixtures("mlflow_store")
def test_the_classifier_is_trained_tracked_and_registered_once_then_found(mnist_files, tmp_path):
    first = ensure_classifier("mnist", mnist_files, TINY, device="cpu", lock_dir=tmp_path)
    assert (first.name, first.version, first.uri, first.trained) == ("classifier-mnist", "1", "models:/classifier-mnist/1", True)
    client = MlflowClient()
    (run,) = client.search_runs([tracking.named_experiment("classifier-mnist")])
    assert run.info.run_id == first.run_id and run.info.status == "FINISHED"
    assert run.data.tags[KEY_TAG] == classifier_key(TINY, data.DATASETS["mnist"].digest)
    assert run.data.tags["dataset_digest"] == data.DATASETS["mnist"].digest
    assert run.data.params == {
        "classifier.conv_channels": "[4, 8]", "classifier.feature_dim": "32", "classifier.dropout": "0.25", "classifier.epochs": "2",
        "classifier.batch_size": "25", "classifier.learning_rate": "0.01", "classifier.train_subset": "2000",
        "classifier.seed": "0",
    }
    assert run.data.metrics["test_accuracy"] == first.test_accuracy
    assert 0.5 < first.test_accuracy < 1.0  # a real classifier, of 2000 images after two epochs
    assert [m.step for m in client.get_metric_history(first.run_id, "train_accuracy")] == [1, 2]
    assert [a.path for a in client.list_artifacts(first.run_id, "classifier")] == ["classifier/classifier.safetensors"]
    version = client.get_model_version("classifier-mnist", "1")
    assert version.run_id == first.run_id and version.tags[KEY_TAG] == run.data.tags[KEY_TAG]

    again = ensure_classifier("mnist", mnist_files, TINY, device="cpu", lock_dir=tmp_path)
    assert (again.version, again.run_id, again.trained, again.test_accuracy) == ("1", first.run_id, False, first.test_accuracy)
    images = torch.rand(8, 1, 28, 28)
    assert torch.equal(again.classifier(images), first.classifier(images))
    assert len(client.search_runs([tracking.named_experiment("classifier-mnist")])) == 1

    other = ensure_classifier("mnist", mnist_files, TINY.model_copy(update={"seed": 1}), device="cpu", lock_dir=tmp_path)
    assert (other.version, other.trained) == ("2", True)
    assert str(find_classifier("mnist", classifier_key(TINY, data.DATASETS["mnist"].digest)).version) == "1"


@needs_data
@pytest.mark.usefixtures("mlflow_store")
def test_a_classifier_that_fails_to_train_leaves_a_failed_run_with_the_error_and_nothing_registered(mnist_files, tmp_path):
    too_many = TINY.model_copy(update={"train_subset": 60_001})
    with pytest.raises(ValueError, match=r"train_subset \(60001\) exceeds the 60000 training images"):
        ensure_classifier("mnist", mnist_files, too_many, device="cpu", lock_dir=tmp_path)
    (run,) = MlflowClient().search_runs([tracking.named_experiment("classifier-mnist")])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "ValueError: train_subset (60001) exceeds the 60000 training images"
    assert MlflowClient().search_registered_models() == []


@needs_data
@pytest.mark.usefixtures("mlflow_store")
def test_a_run_is_scored_against_the_grayscale_test_images_and_reconstructs_its_own_test_set(mnist_files, tmp_path):
    config = load_config("default", {"eval.fid_samples": 300, "eval.batch_size": 1000, "data.binarization": "threshold"})
    prepared = data.prepare_configured(config.data, mnist_files)
    classifier = ensure_classifier("mnist", mnist_files, TINY, device="cpu", lock_dir=tmp_path).classifier
    model = build_model(config.model, seed=0)
    metrics = score(model, classifier, mnist_files, prepared.test, config)
    from vae.sample_quality import sample_quality

    raw = data.read("mnist", mnist_files)
    grayscale = raw.test_images.float().div(255).unsqueeze(1)
    expected = sample_quality(model, classifier, grayscale, prepared.test, samples=300, batch_size=1000, seed=0)
    assert metrics == {f"test_{name}": value for name, value in expected.items()}
