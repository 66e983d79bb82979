"""Log the trained model, register it under a name per data set, and promote it by aliases (never stages)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from torch import Tensor

from pipeline import tracking
from pipeline.config import RunConfig, comparability_changes, comparable_on
from vae.models import VAE, HierarchicalVAE, serving_copy

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_NAME = "model"  # the logged model's name inside its run
COMPARABLE_ON_TAG = "comparable_on"  # on each version: JSON of the fields its test numbers compare on


class RegistryError(LookupError):
    """A registered model or one of its versions does not exist; the message names which."""


@dataclass(frozen=True)
class PromotionDecision:
    """Which alias a new version got, and why, in a sentence a person reads."""

    version: str
    alias: str  # CHAMPION or CHALLENGER
    promoted: bool
    metric: str
    value: float
    champion_version: str | None
    champion_value: float | None
    reason: str


@dataclass(frozen=True)
class LoadedModel:
    """A logged model loaded back for use, with the config it was trained with and where it came from."""

    model: VAE | HierarchicalVAE
    config: RunConfig
    run_id: str
    uri: str


def primary_metric(metrics: Mapping[str, float]) -> tuple[str, float, bool]:
    """(name, value, lower_is_better): the IWAE test NLL in nats when measured, else the test ELBO in nats."""
    if "test_nll_nats" in metrics:
        return "test_nll_nats", float(metrics["test_nll_nats"]), True
    if "test_elbo_nats" in metrics:
        return "test_elbo_nats", float(metrics["test_elbo_nats"]), False
    raise KeyError(f"metrics hold neither test_nll_nats nor test_elbo_nats: {sorted(metrics)}")


def log_model(model: VAE | HierarchicalVAE, example: Tensor) -> str:
    """Log ``model`` to the active run with a signature and input example (a few [N, 1, 28, 28] images); its URI.

    The model is pickled (not exported to pt2) so that the loaded module keeps ``sample``, ``decode`` and
    ``encode``; loading it needs this project's ``vae`` and ``pipeline`` packages importable.
    """
    if mlflow.active_run() is None:
        raise RuntimeError("log_model needs an active MLflow run: call it inside mlflow.start_run()")
    logged = serving_copy(model)
    images = example.detach().to("cpu", torch.float32)
    signature = infer_signature(images.numpy(), logged(images).numpy())
    info = mlflow.pytorch.log_model(
        logged,
        name=MODEL_NAME,
        signature=signature,
        input_example=images.numpy(),
        serialization_format="pickle",
        # Explicit requirements skip MLflow's inference, which loads the model again in a subprocess.
        pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
    )
    return info.model_uri


def resolve(reference: str, *, client: MlflowClient | None = None) -> tuple[str, str]:
    """The model URI and the id of the run that logged it, for what a person types to name a model.

    ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/<run id>/model``, a registered model's name (its
    champion), or a run id (its logged model).
    """
    client = client or MlflowClient()
    try:
        if reference.startswith("models:/"):
            name, _, version = reference.removeprefix("models:/").partition("/")
            name, _, alias = name.partition("@")
            if alias:
                found = client.get_model_version_by_alias(name, alias)
            elif version.isdigit():
                found = client.get_model_version(name, version)
            else:
                raise RegistryError(f"{reference!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
            return reference, found.run_id
        if reference.startswith("runs:/"):
            run_id = reference.removeprefix("runs:/").split("/", 1)[0]
            client.get_run(run_id)
            return reference, run_id
        if client.search_registered_models(f"name = '{reference}'"):
            return resolve(f"models:/{reference}@{CHAMPION}", client=client)
        client.get_run(reference)
        return f"runs:/{reference}/{MODEL_NAME}", reference
    except MlflowException as error:
        raise RegistryError(f"no model {reference!r} in {mlflow.get_tracking_uri()}: {error.message}") from None


def load(reference: str, *, device: torch.device | str = "cpu") -> LoadedModel:
    """The model that ``reference`` names (see :func:`resolve`) as a :class:`VAE` (or :class:`HierarchicalVAE`) on
    ``device``, with its config."""
    uri, run_id = resolve(reference)
    served = mlflow.pytorch.load_model(uri, map_location=device)
    model = served.unwrap().eval()
    return LoadedModel(model, tracking.run_config(run_id), run_id, uri)


def register_version(model_uri: str, config: RunConfig, metrics: Mapping[str, float], run_id: str) -> str:
    """Register a new version under the name of the config's comparable family (:attr:`RunConfig.model_name`), tagged
    with its run, data, preset, test metrics and what its test numbers compare on (``comparable_on``, JSON)."""
    metric, _, _ = primary_metric(metrics)
    tags = {
        "run_id": run_id,
        "dataset": config.data.dataset,
        "binarization": config.data.binarization,
        "preset": config.preset,
        "primary_metric": metric,
        COMPARABLE_ON_TAG: json.dumps(comparable_on(config), sort_keys=True),
        **{key: repr(float(number)) for key, number in metrics.items() if key.startswith("test_")},
    }
    # MLflow's own registration (it links the logged model to the version) uses the configured URIs, as does the
    # SQL store when it resolves a models:/ source.
    return str(mlflow.register_model(model_uri, config.model_name, tags=tags).version)


def assign_alias(
    config: RunConfig,
    metrics: Mapping[str, float],
    version: str,
    *,
    margin: float = 0.0,
    client: MlflowClient | None = None,
) -> PromotionDecision:
    """Make ``version`` champion or challenger, recording the decision on it as ``promotion.*`` tags and description.

    It becomes champion when there is none yet, or when the champion's test numbers compare with its own (the same
    :func:`pipeline.config.comparable_on`) and the new primary metric beats the champion's by more than ``margin``
    nats; otherwise it becomes challenger.
    """
    client = client or MlflowClient()
    name = config.model_name
    metric, value, lower_is_better = primary_metric(metrics)
    current = champion(name, client=client)
    decision = _decide(version, comparable_on(config), metric, value, lower_is_better, margin, current)
    client.set_registered_model_alias(name, decision.alias, decision.version)
    if decision.promoted and current is not None:
        client.set_model_version_tag(name, current.version, "demoted_by", decision.version)
    outcome = {
        "promotion.decision": decision.alias,
        "promotion.reason": decision.reason,
        "promotion.champion_version": decision.champion_version or "none",
        "promotion.champion_value": "none" if decision.champion_value is None else repr(decision.champion_value),
    }
    for key, text in outcome.items():
        client.set_model_version_tag(name, decision.version, key, text)
    client.update_model_version(name, decision.version, description=f"Registered as {decision.alias}: {decision.reason}.")
    return decision


def promote(name: str, version: str | int, reason: str, *, client: MlflowClient | None = None) -> None:
    """Move ``champion`` to ``version`` by hand, recording ``reason`` on it and ``demoted_by`` on the old champion."""
    client = client or MlflowClient()
    version = str(version)
    target = _model_version(client, name, version)
    previous = champion(name, client=client)
    client.set_registered_model_alias(name, CHAMPION, version)
    if CHALLENGER in target.aliases:
        client.delete_registered_model_alias(name, CHALLENGER)
    client.set_model_version_tag(name, version, "promoted_by_hand", reason)
    if previous is not None and previous.version != target.version:
        client.set_model_version_tag(name, previous.version, "demoted_by", version)
    was = f" (replacing v{previous.version})" if previous is not None and previous.version != target.version else ""
    note = f"Promoted to champion by hand{was}: {reason}"
    description = f"{target.description}\n{note}" if target.description else note
    client.update_model_version(name, version, description=description)


def champion(name: str, *, client: MlflowClient | None = None) -> ModelVersion | None:
    """The version of ``name`` that holds the ``champion`` alias, or None (no champion, or no such model)."""
    client = client or MlflowClient()
    try:
        version = client.get_registered_model(name).aliases.get(CHAMPION)
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    return None if version is None else client.get_model_version(name, str(version))


def _decide(
    version: str,
    ours: Mapping[str, object],
    metric: str,
    value: float,
    lower_is_better: bool,
    margin: float,
    current: ModelVersion | None,
) -> PromotionDecision:
    def decided(promoted: bool, reason: str, champion_value: float | None = None) -> PromotionDecision:
        return PromotionDecision(
            version=version,
            alias=CHAMPION if promoted else CHALLENGER,
            promoted=promoted,
            metric=metric,
            value=value,
            champion_version=None if current is None else str(current.version),
            champion_value=champion_value,
            reason=reason,
        )

    if not math.isfinite(value):
        return decided(False, f"{metric} is {value}: not a number to promote on")
    if current is None:
        return decided(True, f"no champion yet: v{version} ({metric} {value:.2f}) becomes champion")
    changes = comparability_changes(ours, _comparable_on(current))
    if changes:
        return decided(False, f"not comparable with champion v{current.version}: {'; '.join(changes)}")
    if metric not in current.tags:
        return decided(False, f"not comparable with champion v{current.version}: it has no {metric}")
    best = float(current.tags[metric])
    gain = best - value if lower_is_better else value - best
    if gain > margin:
        return decided(
            True,
            f"{metric} {value:.2f} beats champion v{current.version} ({best:.2f}) by {gain:.2f} > margin {margin:.2f}",
            best,
        )
    return decided(
        False,
        f"{metric} {value:.2f} does not beat champion v{current.version} ({best:.2f}) by more than margin "
        f"{margin:.2f} (difference {gain:.2f}, {'lower' if lower_is_better else 'higher'} is better)",
        best,
    )


def _comparable_on(version: ModelVersion) -> Mapping[str, object]:
    """What a registered version's test numbers compare on: its tag, else (versions registered before the tag
    existed) computed from its run's config."""
    if COMPARABLE_ON_TAG in version.tags:
        return json.loads(version.tags[COMPARABLE_ON_TAG])
    return comparable_on(tracking.run_config(version.run_id))


def _model_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(name, version)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
    try:
        versions = sorted(int(found.version) for found in client.search_model_versions(f"name = '{name}'"))
    except MlflowException:
        versions = []
    known = ", ".join(str(number) for number in versions) or "none"
    raise RegistryError(f"registered model {name!r} has no version {version} (its versions: {known})") from None
