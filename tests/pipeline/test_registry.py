"""The registry stage against a real MLflow SQLite store: logged models load back, aliases follow the promotion rule."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipeline.config import comparable_on, load_config
from pipeline.registry import (
    PromotionDecision,
    RegistryError,
    assign_alias,
    champion,
    log_model,
    primary_metric,
    promote,
    register_version,
)
from vae.config import ModelConfig
from vae.models import VAE, ServingVAE, build_model

pytestmark = pytest.mark.filterwarnings(
    # MLflow 3.17's SQLAlchemy store configures a deprecated loader strategy on import.
    "ignore:The ``noload`` loader strategy is deprecated",
)

MNIST = load_config("default", {"eval.iwae_samples": 0})
STATIC_MNIST = load_config("default", {"data.binarization": "static"})
FASHION = load_config("default", {"data.dataset": "fashion-mnist"})


@dataclass
class Store:
    """A fresh MLflow store for one test, holding one logged (not yet registered) model."""

    client: MlflowClient
    model: VAE
    example: torch.Tensor
    model_uri: str
    run_id: str

    def register(self, config=MNIST, margin: float = 0.0, **metrics: float) -> PromotionDecision:
        version = register_version(self.model_uri, config, metrics, self.run_id)
        return assign_alias(config, metrics, version, margin=margin, client=self.client)

    def aliases(self, name: str = "vae-mnist") -> dict[str, str]:
        """Alias -> version, as text (the SQL store gives numbers, the REST store text)."""
        return {alias: str(version) for alias, version in self.client.get_registered_model(name).aliases.items()}


def _use_store(monkeypatch: pytest.MonkeyPatch, database: Path) -> None:
    uri = f"sqlite:///{database}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_tracking_uri(uri)


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory):
    """A migrated SQLite store with one logged tiny model; creating the tables takes seconds, copying it does not."""
    folder = tmp_path_factory.mktemp("mlflow-template")
    model = build_model(ModelConfig(hidden_dims=(16,), latent_dim=2), seed=0)
    example = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as monkeypatch:
        _use_store(monkeypatch, folder / "mlflow.db")
        try:
            experiment = MlflowClient().create_experiment("registry", artifact_location=(folder / "artifacts").as_uri())
            with mlflow.start_run(experiment_id=experiment) as run:
                model_uri = log_model(model, example)
        finally:
            mlflow.set_tracking_uri(None)
    return folder / "mlflow.db", model, example, model_uri, run.info.run_id


@pytest.fixture
def store(template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    database, model, example, model_uri, run_id = template
    shutil.copy(database, tmp_path / "mlflow.db")
    _use_store(monkeypatch, tmp_path / "mlflow.db")
    yield Store(MlflowClient(), model, example, model_uri, run_id)
    mlflow.set_tracking_uri(None)


def test_the_primary_metric_is_the_nll_when_measured_else_the_elbo():
    assert primary_metric({"test_elbo_nats": -95.0, "test_nll_nats": 88.5}) == ("test_nll_nats", 88.5, True)
    assert primary_metric({"test_elbo_nats": -95.0}) == ("test_elbo_nats", -95.0, False)
    with pytest.raises(KeyError, match="neither test_nll_nats nor test_elbo_nats"):
        primary_metric({"val_elbo_nats": -95.0})


def test_a_logged_model_loads_from_the_champion_alias_and_samples_and_decodes(store):
    store.register(test_nll_nats=90.0)
    loaded = mlflow.pytorch.load_model("models:/vae-mnist@champion")
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))

    assert isinstance(loaded, ServingVAE) and isinstance(loaded, VAE)
    assert torch.equal(loaded.decode(z), store.model.decode(z))
    assert torch.equal(
        loaded.sample(3, generator=torch.Generator().manual_seed(2)),
        store.model.sample(3, generator=torch.Generator().manual_seed(2)),
    )
    assert torch.equal(loaded(store.example), store.model.reconstruct(store.example))


def test_logging_a_model_needs_an_active_run(store):
    with pytest.raises(RuntimeError, match="needs an active MLflow run"):
        log_model(store.model, store.example)


def test_pyfunc_predict_of_the_input_example_returns_its_reconstructions(store):
    version = store.register(test_nll_nats=90.0).version
    pyfunc = mlflow.pyfunc.load_model(f"models:/vae-mnist/{version}")

    predicted = pyfunc.predict(store.example.numpy())

    assert predicted.shape == (4, 1, 28, 28) and predicted.dtype == np.float32
    np.testing.assert_array_equal(predicted, store.model.reconstruct(store.example).numpy())
    assert pyfunc.metadata.get_input_schema().inputs[0].shape == (-1, 1, 28, 28)


def test_the_first_version_becomes_champion(store):
    decision = store.register(test_nll_nats=90.0, test_elbo_nats=-95.0)

    assert decision == PromotionDecision(
        version="1", alias="champion", promoted=True, metric="test_nll_nats", value=90.0,
        champion_version=None, champion_value=None,
        reason="no champion yet: v1 (test_nll_nats 90.00) becomes champion",
    )
    assert store.aliases() == {"champion": "1"}
    assert str(champion("vae-mnist", client=store.client).version) == "1"


def test_a_version_better_by_more_than_the_margin_becomes_champion_and_the_old_one_loses_the_alias(store):
    store.register(test_nll_nats=89.0)
    decision = store.register(margin=0.1, test_nll_nats=88.1)

    assert decision.alias == "champion" and decision.promoted
    assert (decision.champion_version, decision.champion_value) == ("1", 89.0)
    assert decision.reason == "test_nll_nats 88.10 beats champion v1 (89.00) by 0.90 > margin 0.10"
    assert store.aliases() == {"champion": "2"}
    assert store.client.get_model_version("vae-mnist", "1").aliases == []
    assert store.client.get_model_version("vae-mnist", "1").tags["demoted_by"] == "2"


@pytest.mark.parametrize(
    ("nll", "difference"),
    [(89.5, "-0.50"), (88.95, "0.05"), (88.9, "0.10")],
    ids=["worse", "better-by-less-than-the-margin", "better-by-exactly-the-margin"],
)
def test_a_version_not_better_by_more_than_the_margin_becomes_challenger_and_the_champion_stays(store, nll, difference):
    store.register(test_nll_nats=89.0)
    decision = store.register(margin=0.1, test_nll_nats=nll)

    assert (decision.alias, decision.promoted, decision.champion_version) == ("challenger", False, "1")
    assert decision.reason == (
        f"test_nll_nats {nll:.2f} does not beat champion v1 (89.00) by more than margin 0.10 "
        f"(difference {difference}, lower is better)"
    )
    assert store.aliases() == {"champion": "1", "challenger": "2"}


def test_without_an_nll_the_elbo_decides_and_higher_is_better(store):
    store.register(test_elbo_nats=-95.0)
    lower = store.register(test_elbo_nats=-96.0)
    higher = store.register(test_elbo_nats=-94.0)

    assert (lower.metric, lower.alias) == ("test_elbo_nats", "challenger")
    assert (higher.metric, higher.alias) == ("test_elbo_nats", "champion")
    assert higher.reason == "test_elbo_nats -94.00 beats champion v1 (-95.00) by 1.00 > margin 0.00"
    assert store.aliases() == {"champion": "3", "challenger": "2"}


def test_a_version_whose_metric_is_not_finite_is_never_champion(store):
    decision = store.register(test_nll_nats=float("nan"))

    assert (decision.alias, decision.reason) == ("challenger", "test_nll_nats is nan: not a number to promote on")
    assert store.aliases() == {"challenger": "1"}


def test_another_binarization_competes_in_its_own_registered_model(store):
    store.register(test_nll_nats=89.0)
    decision = store.register(STATIC_MNIST, test_nll_nats=95.0)

    assert (decision.version, decision.alias, decision.champion_version) == ("1", "champion", None)
    assert store.aliases("vae-mnist-static") == {"champion": "1"}
    assert store.aliases("vae-mnist") == {"champion": "1"}


def test_a_champion_scored_on_other_test_images_or_another_way_is_not_compared(store):
    store.register(test_nll_nats=89.0)
    other_images = store.register(load_config("default", {"eval.iwae_samples": 0, "data.binarization_seed": 5}), test_nll_nats=80.0)
    other_k = store.register(load_config("default", {"eval.iwae_samples": 5000}), test_nll_nats=80.0)

    assert (other_images.alias, other_images.champion_version, other_images.champion_value) == ("challenger", "1", None)
    assert other_images.reason == "not comparable with champion v1: data.binarization_seed: 0 -> 5"
    assert other_k.reason == "not comparable with champion v1: eval.iwae_samples: 0 -> 5000"
    assert store.aliases() == {"champion": "1", "challenger": "3"}


def test_a_champion_without_the_primary_metric_is_not_compared(store):
    store.register(test_elbo_nats=-95.0)
    decision = store.register(test_nll_nats=88.0, test_elbo_nats=-94.0)

    assert decision.alias == "challenger"
    assert decision.reason == "not comparable with champion v1: it has no test_nll_nats"


def test_version_tags_carry_the_run_the_config_the_test_metrics_and_the_decision(store):
    store.register(test_nll_nats=89.0)
    store.register(margin=0.5, test_nll_nats=88.75, test_elbo_nats=-94.25, test_bits_per_dim=0.16, val_elbo_nats=-1.0)
    version = store.client.get_model_version("vae-mnist", "2")

    reason = (
        "test_nll_nats 88.75 does not beat champion v1 (89.00) by more than margin 0.50 "
        "(difference 0.25, lower is better)"
    )
    assert version.tags == {
        "run_id": store.run_id,
        "dataset": "mnist",
        "binarization": "dynamic",
        "preset": "default",
        "primary_metric": "test_nll_nats",
        "comparable_on": json.dumps(comparable_on(MNIST), sort_keys=True),
        "test_nll_nats": "88.75",
        "test_elbo_nats": "-94.25",
        "test_bits_per_dim": "0.16",
        "promotion.decision": "challenger",
        "promotion.reason": reason,
        "promotion.champion_version": "1",
        "promotion.champion_value": "89.0",
    }
    assert version.description == f"Registered as challenger: {reason}."
    assert version.run_id == store.run_id
    assert store.client.get_model_version("vae-mnist", "1").tags["promotion.champion_version"] == "none"


def test_promote_by_hand_moves_the_champion_and_records_the_reason(store):
    store.register(test_nll_nats=89.0)
    store.register(test_nll_nats=89.5)

    promote("vae-mnist", 2, "v1 memorises the training set", client=store.client)

    assert store.aliases() == {"champion": "2"}
    promoted = store.client.get_model_version("vae-mnist", "2")
    assert promoted.tags["promoted_by_hand"] == "v1 memorises the training set"
    assert promoted.description.endswith("\nPromoted to champion by hand (replacing v1): v1 memorises the training set")
    assert store.client.get_model_version("vae-mnist", "1").tags["demoted_by"] == "2"


def test_promote_to_a_missing_version_fails_naming_the_model_and_the_version(store):
    store.register(test_nll_nats=89.0)

    with pytest.raises(RegistryError, match=r"^registered model 'vae-mnist' has no version 7 \(its versions: 1\)$"):
        promote("vae-mnist", 7, "typo", client=store.client)
    with pytest.raises(RegistryError, match=r"^registered model 'vae-cifar' has no version 1 \(its versions: none\)$"):
        promote("vae-cifar", "1", "wrong name", client=store.client)
    assert store.aliases() == {"champion": "1"}


def test_a_fashion_mnist_model_does_not_compete_with_mnist(store):
    store.register(test_nll_nats=89.0)
    decision = store.register(FASHION, test_nll_nats=200.0)

    assert (decision.version, decision.alias, decision.champion_version) == ("1", "champion", None)
    assert store.aliases("vae-fashion-mnist") == {"champion": "1"}
    assert store.aliases("vae-mnist") == {"champion": "1"}
    assert champion("vae-cifar", client=store.client) is None
