"""Log the trained model, register it under a name per comparable family, and promote it by aliases (never stages).

Who holds ``champion`` and ``challenger`` is a pure function of the registered versions (see :func:`standing`), and
every writer of the aliases (each training flow after registering, ``flows.py promote``) writes what that function
says, then reads back and writes again until what it reads is what the function says (:func:`settle`). So the aliases
end right whatever the interleaving of concurrent flows, on any store (a SQLite file, a tracking server on
PostgreSQL), with or without a Prefect server: the last writer always writes the right answer. A Prefect global
concurrency limit around a read-decide-write was the other candidate; it protects only flows that share one Prefect
server (not the default ephemeral mode, where each flow has its own, nor hand promotions, nor scripts), and a holder
killed mid-promotion leaves its slot taken.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pydantic
import safetensors
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import BAD_REQUEST, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE, ErrorCode
from mlflow.pyfunc import PyFuncModel
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from torch import Tensor

from pipeline import serving, tracking
from pipeline.config import RunConfig, comparability_changes, comparable_on
from pipeline.redaction import redact
from vae import export
from vae.config import ModelConfig
from vae.export import ModelFileError
from vae.models import VAE, HierarchicalVAE, ServingHierarchicalVAE, ServingVAE, serving_copy

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_NAME = "model"  # the logged model's name inside its run
MODEL_FILES = "vae"  # the directory under the logged model's data/ holding its weights and config (vae.export)
PYFUNC = "python_function"  # MLflow's name of the pyfunc flavor
MAX_MLMODEL_BYTES = 64 << 10
COMPARABLE_ON_TAG = "comparable_on"  # on each version: JSON of the fields its test numbers compare on
MARGIN_TAG = "promotion_margin_nats"  # on each version: by how much it had to beat the champion
HAND_PROMOTION_TAG = "champion.by_hand"  # on the registered model: JSON of the latest promotion by hand
SETTLE_ROUNDS = 20  # each round that writes follows another writer's write; far more than concurrent flows need


class RegistryError(LookupError):
    """A registered model or one of its versions does not exist; the message names which."""


@dataclass(frozen=True)
class PromotionDecision:
    """Which alias a new version got, and why, in a sentence a person reads."""

    version: str
    alias: str | None  # CHAMPION or CHALLENGER; None for a version registered before a later promotion by hand
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


def log_model(model: VAE | HierarchicalVAE, config: ModelConfig, example: Tensor) -> str:
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
    """The model that ``reference`` names (see :func:`resolve`) as a :class:`VAE` (or :class:`HierarchicalVAE`) on
    ``device``, with its config.

    Only the logged model's own files are read (see :func:`load_model`); a tampered one is a
    :class:`vae.export.ModelFileError`.
    """
    uri, run_id = resolve(reference)
    return LoadedModel(_load_network(uri, device), tracking.run_config(run_id), run_id, uri)


def load_model(reference: str, *, device: torch.device | str = "cpu") -> ServingVAE | ServingHierarchicalVAE:
    """The model that ``reference`` names, as a module with ``sample``, ``decode``, ``encode`` and ``reconstruct``,
    whose ``forward`` returns reconstructions: ``load_model("models:/vae-mnist@champion").sample(16)``.

    ``reference`` is anything :func:`resolve` takes. Three files of the logged model are read, none of them executed:
    its ``MLmodel`` (refused unless its pyfunc flavor is exactly the one :func:`log_model` writes), the config (JSON,
    validated) and the weights (safetensors, checked against the network the config describes).
    """
    uri, _ = resolve(reference)
    return serving_copy(_load_network(uri, "cpu")).to(device)


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


def _load_network(uri: str, device: torch.device | str) -> VAE | HierarchicalVAE:
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
    with its run, data, preset, test metrics, what its test numbers compare on (``comparable_on``, JSON) and its
    promotion margin: all that the promotion rule reads, written with the version in one request."""
    metric, _, _ = primary_metric(metrics)
    tags = {
        "run_id": run_id,
        "dataset": config.data.dataset,
        "binarization": config.data.binarization,
        "preset": config.preset,
        "primary_metric": metric,
        COMPARABLE_ON_TAG: json.dumps(comparable_on(config), sort_keys=True),
        MARGIN_TAG: repr(float(config.registry.promotion_margin_nats)),
        **{key: repr(float(number)) for key, number in metrics.items() if key.startswith("test_")},
    }
    # MLflow's own registration (it links the logged model to the version) uses the configured URIs, as does the
    # SQL store when it resolves a models:/ source.
    return str(mlflow.register_model(model_uri, config.model_name, tags=tags).version)


def assign_alias(
    config: RunConfig, metrics: Mapping[str, float], version: str, *, client: MlflowClient | None = None
) -> PromotionDecision:
    """Settle the aliases of the config's registered model now that ``version`` is registered (see :func:`settle`), and
    record the decision on ``version`` as ``promotion.*`` tags and description (``demoted_by`` on the champion it
    replaced).

    A version becomes champion when there is none yet, or when the champion's test numbers compare with its own (the
    same :func:`pipeline.config.comparable_on`) and its primary metric beats the champion's by more than its
    ``registry.promotion_margin_nats``; otherwise it becomes challenger. ``metrics`` are the test metrics it was
    registered with: a RegistryError if its tags say otherwise (the wrong version number).
    """
    client = client or MlflowClient()
    name = config.model_name
    registered = _model_version(client, name, str(version))
    mismatched = sorted(key for key, value in metrics.items() if key.startswith("test_") and registered.tags.get(key) != repr(float(value)))
    if mismatched:
        raise RegistryError(f"{name} version {version} was registered with other {', '.join(mismatched)} than these metrics")
    settled = settle(name, client=client)
    decision = settled.decisions.get(str(version)) or _decided_by_hand(str(version), settled, primary_metric(metrics))
    if decision.promoted and decision.champion_version is not None:
        client.set_model_version_tag(name, decision.champion_version, "demoted_by", decision.version)
    outcome = {
        "promotion.decision": decision.alias or "none",
        "promotion.reason": decision.reason,
        "promotion.champion_version": decision.champion_version or "none",
        "promotion.champion_value": "none" if decision.champion_value is None else repr(decision.champion_value),
    }
    for key, text in outcome.items():
        client.set_model_version_tag(name, decision.version, key, text)
    client.update_model_version(name, decision.version, description=f"Registered as {decision.alias or 'neither champion nor challenger'}: {decision.reason}.")
    return decision


def promote(name: str, version: str | int, reason: str, *, client: MlflowClient | None = None) -> None:
    """Move ``champion`` to ``version`` by hand, recording ``reason`` on it and ``demoted_by`` on the old champion.

    The promotion is recorded on the registered model (``champion.by_hand``: the version, the newest version then, and
    the challenger, which loses its alias if it is the promoted version), so that :func:`standing` starts from it:
    versions registered afterwards challenge the hand-picked champion under the usual rule.
    """
    client = client or MlflowClient()
    version = str(version)
    target = _model_version(client, name, version)
    previous = champion(name, client=client)
    newest = max(int(found.version) for found in versions_of(client, name))
    challenger = {alias: str(number) for alias, number in client.get_registered_model(name).aliases.items()}.get(CHALLENGER)
    record = {"version": version, "after_version": newest, "challenger": None if challenger == version else challenger}
    client.set_model_version_tag(name, version, "promoted_by_hand", reason)
    client.set_registered_model_tag(name, HAND_PROMOTION_TAG, json.dumps(record, sort_keys=True))
    settle(name, client=client)
    if previous is not None and previous.version != target.version:
        client.set_model_version_tag(name, previous.version, "demoted_by", version)
    was = f" (replacing v{previous.version})" if previous is not None and previous.version != target.version else ""
    note = f"Promoted to champion by hand{was}: {reason}"
    description = f"{target.description}\n{note}" if target.description else note
    client.update_model_version(name, version, description=description)


@dataclass(frozen=True)
class Standing:
    """Who holds which alias, as the registered versions imply, and the decision each ranked version got."""

    champion: str | None
    challenger: str | None
    decisions: dict[str, PromotionDecision] = field(default_factory=dict)
    by_hand: str | None = None  # the version promoted by hand that the rule started from


def standing(versions: Iterable[ModelVersion], by_hand: Mapping[str, object] | None = None) -> Standing:
    """The champion and challenger that ``versions`` (of one registered model) imply, as if each had been decided on
    its own, one after another in version order, by the rule :func:`assign_alias` states.

    ``by_hand`` is the model's latest promotion by hand (its ``champion.by_hand`` tag): the rule then starts from its
    champion and challenger and takes only the versions registered after it. Versions without the tags
    :func:`register_version` writes (registered by other tools) hold no alias and change nothing.
    """
    every = {str(found.version): found for found in versions}
    ordered = sorted(every.values(), key=lambda found: int(found.version))
    held: dict[str, str | None] = {CHAMPION: None, CHALLENGER: None}
    start = None
    if by_hand is not None and str(by_hand["version"]) in every:
        start = str(by_hand["version"])
        challenger = by_hand.get("challenger")
        held = {CHAMPION: start, CHALLENGER: str(challenger) if str(challenger) in every else None}
        ordered = [found for found in ordered if int(found.version) > int(by_hand["after_version"])]
    entries = {number: _entry(found) for number, found in every.items()}
    decisions = {}
    for found in ordered:
        entry = entries[str(found.version)]
        if entry is None:
            continue
        current = None
        if held[CHAMPION] is not None:  # a hand-picked champion this pipeline did not register compares with nothing
            current = entries[held[CHAMPION]] or _Entry(held[CHAMPION], {}, {}, 0.0)
        decision = _decide(entry, current)
        decisions[entry.version] = decision
        held[decision.alias] = entry.version
    return Standing(held[CHAMPION], held[CHALLENGER], decisions, start)


def settle(name: str, *, client: MlflowClient | None = None) -> Standing:
    """Make the aliases of ``name`` what :func:`standing` says of its versions, and return that standing.

    Writes the aliases that differ, then reads everything again, until what it reads is what the rule says: a
    concurrent writer that decided on fewer versions may write after us, but then it reads back and writes again, so
    the last write is always made on all versions registered by then (a version is registered before its flow
    settles). A RegistryError if the aliases still move after SETTLE_ROUNDS rounds.
    """
    client = client or MlflowClient()
    for _ in range(SETTLE_ROUNDS):
        model = client.get_registered_model(name)
        record = model.tags.get(HAND_PROMOTION_TAG)
        wanted = standing(versions_of(client, name), json.loads(record) if record else None)
        held = {alias: str(number) for alias, number in model.aliases.items()}
        targets = {CHAMPION: wanted.champion, CHALLENGER: wanted.challenger}
        if all(held.get(alias) == target for alias, target in targets.items()):
            return wanted
        for alias, target in targets.items():
            try:
                if target is None and alias in held:
                    client.delete_registered_model_alias(name, alias)
                elif target is not None and held.get(alias) != target:
                    client.set_registered_model_alias(name, alias, target)
            except MlflowException as error:
                if not _lost_to_another_writer(error):
                    raise  # else the next round reads what the other writer wrote
    raise RegistryError(f"the aliases of {name!r} kept changing under concurrent writers for {SETTLE_ROUNDS} rounds")


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


@dataclass(frozen=True)
class _Entry:
    """What the promotion rule knows of a registered version: its test numbers, what they compare on, its margin."""

    version: str
    comparable_on: Mapping[str, object]
    metrics: Mapping[str, float]
    margin: float


def _entry(version: ModelVersion) -> _Entry | None:
    """A version as the rule sees it, from the tags :func:`register_version` wrote; None without test metrics."""
    metrics = {key: float(value) for key, value in version.tags.items() if key.startswith("test_")}
    try:
        primary_metric(metrics)
    except KeyError:
        return None
    if COMPARABLE_ON_TAG in version.tags and MARGIN_TAG in version.tags:
        return _Entry(str(version.version), json.loads(version.tags[COMPARABLE_ON_TAG]), metrics, float(version.tags[MARGIN_TAG]))
    # versions registered before these tags existed: from the config of the run that logged them
    compared, margin = _from_run_config(version.run_id)
    return _Entry(str(version.version), json.loads(version.tags.get(COMPARABLE_ON_TAG, compared)), metrics, margin)


@lru_cache(maxsize=256)
def _from_run_config(run_id: str) -> tuple[str, float]:
    config = tracking.run_config(run_id)
    return json.dumps(comparable_on(config), sort_keys=True), config.registry.promotion_margin_nats


def _decide(entry: _Entry, current: _Entry | None) -> PromotionDecision:
    metric, value, lower_is_better = primary_metric(entry.metrics)

    def decided(promoted: bool, reason: str, champion_value: float | None = None) -> PromotionDecision:
        return PromotionDecision(
            version=entry.version,
            alias=CHAMPION if promoted else CHALLENGER,
            promoted=promoted,
            metric=metric,
            value=value,
            champion_version=None if current is None else current.version,
            champion_value=champion_value,
            reason=reason,
        )

    margin = entry.margin
    if not math.isfinite(value):
        return decided(False, f"{metric} is {value}: not a number to promote on")
    if current is None:
        return decided(True, f"no champion yet: v{entry.version} ({metric} {value:.2f}) becomes champion")
    changes = comparability_changes(entry.comparable_on, current.comparable_on)
    if changes:
        return decided(False, f"not comparable with champion v{current.version}: {'; '.join(changes)}")
    if metric not in current.metrics:
        return decided(False, f"not comparable with champion v{current.version}: it has no {metric}")
    best = current.metrics[metric]
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


def _decided_by_hand(version: str, settled: Standing, primary: tuple[str, float, bool]) -> PromotionDecision:
    """The decision of a version that a later promotion by hand took out of the rule's hands."""
    metric, value, _ = primary
    alias = CHAMPION if settled.champion == version else CHALLENGER if settled.challenger == version else None
    return PromotionDecision(
        version=version, alias=alias, promoted=False, metric=metric, value=value,
        champion_version=settled.champion, champion_value=None,
        reason=f"v{settled.by_hand} was promoted to champion by hand after v{version} was registered",
    )


def _lost_to_another_writer(error: MlflowException) -> bool:
    """Whether an alias write failed only because another writer changed the same alias at the same moment.

    MLflow's SQL store sets an alias by reading it, then inserting or updating it: two writers that both read "none"
    both insert, and the second fails on the alias's unique key (PostgreSQL: UniqueViolation; SQLite: IntegrityError,
    or the database is locked), which the store and the tracking server report as BAD_REQUEST or
    TEMPORARILY_UNAVAILABLE; a deletion that another writer made first is RESOURCE_DOES_NOT_EXIST.
    """
    if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
        return True
    conflict = ("UniqueViolation", "IntegrityError", "UNIQUE constraint failed", "database is locked")
    return error.error_code in (ErrorCode.Name(BAD_REQUEST), ErrorCode.Name(TEMPORARILY_UNAVAILABLE)) and any(
        text in error.message for text in conflict
    )


def versions_of(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of the registered model ``name``, with its tags, through all pages of the search."""
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions


# The leaderboard's columns, in order; "model" only when it lists several registered models.
LEADERBOARD_COLUMNS = [
    "model", "version", "aliases", "preset", "test_nll_nats", "test_elbo_nats", "test_bits_per_dim", "test_fid",
    "epochs", "training_minutes", "registered", "run_id",
]
VAE_MODEL_PREFIX = "vae-"  # the registered models the leaderboard lists when given no name (classifiers are not)


def leaderboard(name: str | None = None, *, client: MlflowClient | None = None) -> pd.DataFrame:
    """The registered versions of ``name`` (default: every VAE family, "vae-*"), one row each, best first within each
    model: by test NLL (lower first) where measured, then by test ELBO (higher first), then newest first.

    Columns: :data:`LEADERBOARD_COLUMNS` (metrics in nats as registered, FID where logged, else NaN); ``epochs`` and
    ``training_minutes`` come from each version's run (NaN for runs that did not log them), ``registered`` is the
    version's creation time (UTC). A :class:`RegistryError` when ``name`` is not a registered model.
    """
    client = client or MlflowClient()
    if name is None:
        models = client.search_registered_models(f"name LIKE '{VAE_MODEL_PREFIX}%'")
    else:
        models = client.search_registered_models(f"name = '{name}'")
        if not models:
            raise RegistryError(f"no registered model {name!r} in {mlflow.get_tracking_uri()}")
    aliases = {model.name: model.aliases for model in models}
    versions = [version for model in models for version in versions_of(client, model.name)]
    runs = _runs_by_id(client, {version.run_id for version in versions if version.run_id})
    board = pd.DataFrame(
        [_leaderboard_row(version, aliases[version.name], runs.get(version.run_id)) for version in versions],
        columns=LEADERBOARD_COLUMNS,
    )
    order = ["model", "test_nll_nats", "test_elbo_nats", "registered"]
    board = board.sort_values(order, ascending=[True, True, False, False], na_position="last", kind="stable")
    return board.reset_index(drop=True)


def _leaderboard_row(version: ModelVersion, aliases: Mapping[str, str | int], run: Run | None) -> dict[str, object]:
    metrics = run.data.metrics if run is not None else {}
    return {
        "model": version.name,
        "version": int(version.version),
        "aliases": ",".join(sorted(alias for alias, number in aliases.items() if str(number) == str(version.version))),
        "preset": version.tags.get("preset", ""),
        **{key: float(version.tags.get(key, "nan")) for key in ("test_nll_nats", "test_elbo_nats", "test_bits_per_dim", "test_fid")},
        "epochs": metrics.get("epochs_trained", math.nan),
        "training_minutes": metrics.get("training_minutes", math.nan),
        "registered": pd.Timestamp(version.creation_timestamp, unit="ms", tz="UTC"),
        "run_id": version.run_id,
    }


def _runs_by_id(client: MlflowClient, run_ids: set[str]) -> dict[str, Run]:
    """The runs with these ids, fetched in one search per experiment rather than one request per run."""
    if not run_ids:
        return {}
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    quoted = ", ".join(f"'{run_id}'" for run_id in sorted(run_ids))
    runs = client.search_runs(experiments, f"attributes.run_id IN ({quoted})", max_results=len(run_ids))
    return {run.info.run_id: run for run in runs}


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
