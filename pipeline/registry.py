"""Log the trained model, register it under a name per data set, and promote it by aliases (never stages)."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pydantic
import safetensors
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.pyfunc import PyFuncModel
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from torch import Tensor

from pipeline import serving, tracking
from pipeline.config import RunConfig, comparability_changes, comparable_on
from pipeline.redaction import redact
from vae import export
from vae.config import ModelConfig
from vae.export import ModelFileError
from vae.models import VAE, ServingVAE

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_NAME = "model"  # the logged model's name inside its run
MODEL_FILES = "vae"  # the directory under the logged model's data/ holding its weights and config (vae.export)
PYFUNC = "python_function"  # MLflow's name of the pyfunc flavor
MAX_MLMODEL_BYTES = 64 << 10
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

    model: VAE
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


def log_model(model: VAE, config: ModelConfig, example: Tensor) -> str:
    """Log ``model`` (built from ``config``) to the active run with a signature and input example (a few [N, 1, 28, 28]
    images); its URI.

    The logged model holds the weights in safetensors and the config in JSON (see :mod:`vae.export`) under
    ``data/vae/``, and a pyfunc flavor whose loader is :mod:`pipeline.serving`: loading it rebuilds the network with
    this project's code and unpickles nothing, so whoever can write to the store cannot make loaders run code.
    """
    if mlflow.active_run() is None:
        raise RuntimeError("log_model needs an active MLflow run: call it inside mlflow.start_run()")
    device = next(model.parameters()).device
    images = example.detach().to("cpu", torch.float32)
    signature = infer_signature(images.numpy(), model.reconstruct(images.to(device)).cpu().numpy())
    with tempfile.TemporaryDirectory() as scratch:
        files = Path(scratch) / MODEL_FILES
        export.save(model, config, files)
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            loader_module=serving.LOADER_MODULE,
            data_path=str(files),
            signature=signature,
            input_example=images.numpy(),
            # Explicit requirements skip MLflow's inference, which loads the model again in a subprocess.
            pip_requirements=_requirements(),
        )
    return info.model_uri


def _requirements() -> list[str]:
    """What loading a logged model needs besides this project's own packages (``vae``, ``pipeline``)."""
    modules = {"mlflow": mlflow, "torch": torch, "safetensors": safetensors, "numpy": np, "pydantic": pydantic}
    return [f"{name}=={module.__version__.split('+')[0]}" for name, module in modules.items()]


def resolve(reference: str, *, client: MlflowClient | None = None) -> tuple[str, str]:
    """The model URI and the id of the run that logged it, for what a person types to name a model.

    ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``models:/<logged model id>``, ``runs:/<run id>/model``,
    a registered model's name (its champion), or a run id (its logged model).
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
            elif name.startswith("m-") and not version:  # a logged model's id, as log_model returns it
                return reference, client.get_logged_model(name).source_run_id
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
        raise RegistryError(redact(f"no model {reference!r} in {mlflow.get_tracking_uri()}: {error.message}")) from None


def load(reference: str, *, device: torch.device | str = "cpu") -> LoadedModel:
    """The model that ``reference`` names (see :func:`resolve`) as a :class:`VAE` on ``device``, with its config.

    Only the logged model's own files are read (see :func:`load_model`); a tampered one is a
    :class:`vae.export.ModelFileError`.
    """
    uri, run_id = resolve(reference)
    return LoadedModel(_load_network(uri, device), tracking.run_config(run_id), run_id, uri)


def load_model(reference: str, *, device: torch.device | str = "cpu") -> ServingVAE:
    """The model that ``reference`` names, as a module with ``sample``, ``decode``, ``encode`` and ``reconstruct``,
    whose ``forward`` returns reconstructions: ``load_model("models:/vae-mnist@champion").sample(16)``.

    ``reference`` is anything :func:`resolve` takes. Three files of the logged model are read, none of them executed:
    its ``MLmodel`` (refused unless its pyfunc flavor is exactly the one :func:`log_model` writes), the config (JSON,
    validated) and the weights (safetensors, checked against the network the config describes).
    """
    uri, _ = resolve(reference)
    model = _load_network(uri, device)
    return ServingVAE(model.encoder, model.decoder, model.latent_dim, model.image_shape).eval()


def load_pyfunc(reference: str) -> PyFuncModel:
    """``mlflow.pyfunc.load_model`` of the model ``reference`` names, once its ``MLmodel`` has been checked.

    MLflow imports whatever ``loader_module`` an ``MLmodel`` names (and puts its ``code`` directory first on the import
    path), so on a store others can write, serve models through this, not ``mlflow.pyfunc.load_model`` directly.
    """
    uri, _ = resolve(reference)
    with tempfile.TemporaryDirectory() as scratch:
        local = _download_checked(uri, Path(scratch), everything=True)
        return mlflow.pyfunc.load_model(str(local))


def check_mlmodel(path: Path, uri: str) -> None:
    """Refuse (with a :class:`vae.export.ModelFileError`) an ``MLmodel`` that would make MLflow load anything but this
    project's loader: other flavors, another ``loader_module``, a ``code`` directory, another data path or predict
    function."""
    try:
        if path.stat().st_size > MAX_MLMODEL_BYTES:
            raise ModelFileError(f"{uri}: its MLmodel is larger than {MAX_MLMODEL_BYTES:,} bytes")
        meta = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ModelFileError(f"{uri}: unreadable MLmodel ({type(error).__name__}: {error})") from None
    flavors = meta.get("flavors") if isinstance(meta, dict) else None
    if not isinstance(flavors, dict) or not isinstance(flavors.get(PYFUNC), dict):
        raise ModelFileError(f"{uri}: its MLmodel has no {PYFUNC} flavor: not a model this pipeline logged")
    pyfunc = flavors[PYFUNC]
    wanted = {"loader_module": serving.LOADER_MODULE, "data": f"data/{MODEL_FILES}", "code": None,
              "predict_fn": "predict", "model_config": None, "streamable": False}
    defaults = {"predict_fn": "predict", "streamable": False}
    changed = [f"flavors are {sorted(flavors)}, not [{PYFUNC!r}]"] if set(flavors) != {PYFUNC} else []
    for key, value in wanted.items():
        if (found := pyfunc.get(key, defaults.get(key))) != value:
            changed.append(f"{key} is {found!r}, not {value!r}")
    if changed:
        raise ModelFileError(
            f"{uri}: its MLmodel was altered or is not this pipeline's ({'; '.join(changed)}): refusing to load it, "
            "as MLflow would import and run what it names"
        )


def _load_network(uri: str, device: torch.device | str) -> VAE:
    with tempfile.TemporaryDirectory() as scratch:
        return export.load(_download_checked(uri, Path(scratch)) / "data" / MODEL_FILES, device=device)


def _download_checked(uri: str, directory: Path, *, everything: bool = False) -> Path:
    """Download the logged model's ``MLmodel``, check it (:func:`check_mlmodel`), then its config and weights (or, with
    ``everything``, all its files); the local directory of the model."""
    repository = get_artifact_repository(uri)
    mlmodel = Path(repository.download_artifacts("MLmodel", str(directory)))
    check_mlmodel(mlmodel, uri)
    if everything:
        return Path(repository.download_artifacts("", str(directory)))
    for name in (export.CONFIG_FILE, export.WEIGHTS_FILE):
        repository.download_artifacts(f"data/{MODEL_FILES}/{name}", str(directory))
    return mlmodel.parent


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
