"""The registry stage against a real MLflow SQLite store: logged models load back, aliases follow the promotion rule."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pydantic
import pytest
import safetensors
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

from pipeline.config import comparable_on, load_config, with_overrides
from pipeline.registry import (
    PromotionDecision,
    RegistryError,
    assign_alias,
    champion,
    load_model,
    load_pyfunc,
    log_model,
    primary_metric,
    promote,
    register_version,
    settle,
    standing,
)
from vae.config import ModelConfig
from vae.models import VAE, ServingVAE, build_model

pytestmark = pytest.mark.filterwarnings(
    # MLflow 3.17's SQLAlchemy store configures a deprecated loader strategy on import.
    "ignore:The ``noload`` loader strategy is deprecated",
)

TINY = ModelConfig(hidden_dims=(16,), latent_dim=2)
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
    scratch: Path

    def register(self, config=MNIST, margin: float = 0.0, **metrics: float) -> PromotionDecision:
        config = with_overrides(config, {"registry.promotion_margin_nats": margin})
        version = register_version(self.model_uri, config, metrics, self.run_id)
        return assign_alias(config, metrics, version, client=self.client)

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
    model = build_model(TINY, seed=0)
    example = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as monkeypatch:
        _use_store(monkeypatch, folder / "mlflow.db")
        try:
            experiment = MlflowClient().create_experiment("registry", artifact_location=(folder / "artifacts").as_uri())
            with mlflow.start_run(experiment_id=experiment) as run:
                model_uri = log_model(model, TINY, example)
        finally:
            mlflow.set_tracking_uri(None)
    return folder / "mlflow.db", model, example, model_uri, run.info.run_id


@pytest.fixture
def store(template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    database, model, example, model_uri, run_id = template
    shutil.copy(database, tmp_path / "mlflow.db")
    _use_store(monkeypatch, tmp_path / "mlflow.db")
    yield Store(MlflowClient(), model, example, model_uri, run_id, tmp_path / "scratch")
    mlflow.set_tracking_uri(None)


def test_the_primary_metric_is_the_nll_when_measured_else_the_elbo():
    assert primary_metric({"test_elbo_nats": -95.0, "test_nll_nats": 88.5}) == ("test_nll_nats", 88.5, True)
    assert primary_metric({"test_elbo_nats": -95.0}) == ("test_elbo_nats", -95.0, False)
    with pytest.raises(KeyError, match="neither test_nll_nats nor test_elbo_nats"):
        primary_metric({"val_elbo_nats": -95.0})


def test_a_logged_model_loads_from_the_champion_alias_and_samples_and_decodes(store):
    store.register(test_nll_nats=90.0)
    loaded = load_model("models:/vae-mnist@champion")
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))

    assert isinstance(loaded, ServingVAE) and isinstance(loaded, VAE)
    assert torch.equal(loaded.decode(z), store.model.decode(z))
    assert torch.equal(
        loaded.sample(3, generator=torch.Generator().manual_seed(2)),
        store.model.sample(3, generator=torch.Generator().manual_seed(2)),
    )
    assert torch.equal(loaded(store.example), store.model.reconstruct(store.example))


@pytest.mark.parametrize("form", ["alias", "version", "logged-model", "run-uri", "run-id", "registered-name"])
def test_one_line_loads_the_model_from_every_form_of_reference(store, form):
    store.register(test_nll_nats=90.0)
    reference = {
        "alias": "models:/vae-mnist@champion", "version": "models:/vae-mnist/1", "logged-model": store.model_uri,
        "run-uri": f"runs:/{store.run_id}/model", "run-id": store.run_id, "registered-name": "vae-mnist",
    }[form]

    loaded = load_model(reference)

    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in store.model.state_dict().items())
    assert not loaded.training


def test_logging_a_model_needs_an_active_run(store):
    with pytest.raises(RuntimeError, match="needs an active MLflow run"):
        log_model(store.model, TINY, store.example)


def test_the_logged_model_is_safetensors_weights_a_json_config_and_a_pyfunc_flavor_of_this_projects_loader(store):
    local = Path(mlflow.artifacts.download_artifacts(store.model_uri, dst_path=str(store.scratch)))
    # registered_model_meta is MLflow's own, written there once another test has registered the (shared) model.
    files = sorted(str(path.relative_to(local)) for path in local.rglob("*") if path.is_file())
    files = [name for name in files if name != "registered_model_meta"]

    assert files == [
        "MLmodel", "conda.yaml", "data/vae/model_config.json", "data/vae/weights.safetensors", "input_example.json",
        "python_env.yaml", "requirements.txt", "serving_input_example.json",
    ]
    flavors = yaml.safe_load((local / "MLmodel").read_text())["flavors"]
    assert list(flavors) == ["python_function"]
    assert {key: flavors["python_function"][key] for key in ("loader_module", "data", "code")} == {
        "loader_module": "pipeline.serving", "data": "data/vae", "code": None,
    }
    assert (local / "requirements.txt").read_text().splitlines() == [
        f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
        f"safetensors=={safetensors.__version__}", f"numpy=={np.__version__}", f"pydantic=={pydantic.__version__}",
    ]


def test_logging_a_model_warns_of_nothing(store, caplog):
    with mlflow.start_run(experiment_id=store.client.get_run(store.run_id).info.experiment_id):
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            with caplog.at_level(logging.WARNING, logger="mlflow"):
                mlflow_logger = logging.getLogger("mlflow")
                mlflow_logger.addHandler(caplog.handler)  # MLflow's loggers do not propagate to the root
                try:
                    log_model(store.model, TINY, store.example)
                finally:
                    mlflow_logger.removeHandler(caplog.handler)

    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
    assert [str(warning.message) for warning in warned] == []


def test_load_pyfunc_checks_the_mlmodel_then_loads_the_pyfunc_model(store):
    store.register(test_nll_nats=90.0)

    predicted = load_pyfunc("models:/vae-mnist@champion").predict(store.example.numpy())

    np.testing.assert_array_equal(predicted, store.model.reconstruct(store.example).numpy())


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
    decision = store.register(margin=0.5, test_nll_nats=88.25)

    assert decision.alias == "champion" and decision.promoted
    assert (decision.champion_version, decision.champion_value) == ("1", 89.0)
    assert decision.reason == "test_nll_nats 88.25 beats champion v1 (89.00) by 0.75 > margin 0.50"
    assert store.aliases() == {"champion": "2"}
    assert store.client.get_model_version("vae-mnist", "1").aliases == []
    assert store.client.get_model_version("vae-mnist", "1").tags["demoted_by"] == "2"


# Numbers whose differences float arithmetic computes exactly (89 - 88.5 is 0.5, where 89 - 88.9 is 0.0999...), so that
# "exactly the margin" is exactly the margin and tells "more than" from "at least".
@pytest.mark.parametrize(
    ("nll", "difference"),
    [(89.5, "-0.50"), (88.75, "0.25"), (88.5, "0.50")],
    ids=["worse", "better-by-less-than-the-margin", "better-by-exactly-the-margin"],
)
def test_a_version_not_better_by_more_than_the_margin_becomes_challenger_and_the_champion_stays(store, nll, difference):
    store.register(test_nll_nats=89.0)
    assert 89.0 - nll == float(difference)
    decision = store.register(margin=0.5, test_nll_nats=nll)

    assert (decision.alias, decision.promoted, decision.champion_version) == ("challenger", False, "1")
    assert decision.reason == (
        f"test_nll_nats {nll:.2f} does not beat champion v1 (89.00) by more than margin 0.50 "
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
        "promotion_margin_nats": "0.5",
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


def registered(version: int, nll: float, margin: float = 0.0, config=MNIST) -> ModelVersion:
    """A version as the registry lists it, with the tags register_version writes."""
    tags = {"test_nll_nats": repr(nll), "comparable_on": json.dumps(comparable_on(config), sort_keys=True), "promotion_margin_nats": repr(margin)}
    return ModelVersion("vae-mnist", str(version), 0, tags=[ModelVersionTag(key, value) for key, value in tags.items()])


def test_the_standing_is_the_rule_applied_in_version_order_whatever_order_the_versions_are_listed_in():
    versions = [registered(1, 89.0), registered(2, 89.5), registered(3, 88.5, margin=1.0), registered(4, 88.0), registered(5, 90.0)]
    expected = (
        "4", "5",
        {"1": ("champion", None), "2": ("challenger", "1"), "3": ("challenger", "1"), "4": ("champion", "1"), "5": ("challenger", "4")},
    )

    for listed in (versions, versions[::-1], [versions[2], versions[0], versions[4], versions[1], versions[3]]):
        result = standing(listed)
        decisions = {version: (d.alias, d.champion_version) for version, d in result.decisions.items()}
        assert (result.champion, result.challenger, decisions) == expected


def test_a_version_registered_by_another_tool_without_test_metrics_holds_no_alias_and_changes_nothing():
    bare = ModelVersion("vae-mnist", "2", 0, tags=[])

    result = standing([registered(1, 89.0), bare, registered(3, 90.0)])

    assert (result.champion, result.challenger, sorted(result.decisions)) == ("1", "3", ["1", "3"])


def test_settling_after_a_promotion_by_hand_keeps_the_hand_picked_champion_and_later_versions_challenge_it(store):
    store.register(test_nll_nats=89.0)
    store.register(test_nll_nats=89.6)
    promote("vae-mnist", 2, "sharper samples", client=store.client)

    assert settle("vae-mnist", client=store.client).champion == "2"  # v1 is better, but a person chose v2
    assert store.aliases() == {"champion": "2"}
    worse = store.register(test_nll_nats=89.8)
    better = store.register(test_nll_nats=89.4)

    assert (worse.alias, worse.champion_version, better.alias, better.champion_version) == ("challenger", "2", "champion", "2")
    assert better.reason == "test_nll_nats 89.40 beats champion v2 (89.60) by 0.20 > margin 0.00"
    assert store.aliases() == {"champion": "4", "challenger": "3"}
    assert store.client.get_model_version("vae-mnist", "2").tags["demoted_by"] == "4"
