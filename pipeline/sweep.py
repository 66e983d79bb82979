"""A sweep's trials (validated run configs from a grid of field values, or a seeded random sample of it) and its leaderboard."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipeline.config import SCORE_FIELDS, ConfigError, RunConfig, parse_value, with_overrides
from pipeline.registry import primary_metric

FINISHED = "finished"
FAILED = "failed"
VALIDATION_METRIC = "val_elbo_nats"
LEADERBOARD_METRICS = ("test_elbo_nats", "test_nll_nats")

# Trials are ranked on one score and the best competes in its family's registry: the fields that decide what the
# score measures (pipeline.config.SCORE_FIELDS) are the same for every trial. Two more are the sweep's own business.
SWEEP_SETTINGS = {
    "registry": "only the best trial is registered: set registry.* for the whole sweep with --set",
    "preset": "the preset is the base config: set it with --preset",
}


class SweepError(RuntimeError):
    """A sweep produced nothing to register: every one of its trials failed."""


class TrialError(RuntimeError):
    """What stopped a trial, as the text "<error class>: <message>": unlike some exceptions (those whose ``__init__``
    takes other arguments than the message), it survives the pickling that brings it back from a Dask worker."""


@dataclass(frozen=True)
class Trial:
    """One point of a sweep: its number (from 1), the value of each swept field, and the full validated config."""

    number: int
    values: dict[str, Any]
    config: RunConfig

    def describe(self) -> str:
        """"model.latent_dim=2, objective.beta=0.5": the swept fields as a person reads them."""
        return _describe(self.values)


@dataclass(frozen=True)
class TrialResult:
    """What became of one trial: its MLflow run (None if it never started one), its test metrics, the validation ELBO
    of the model it returned (None without a validation set), its logged model, or the error that stopped it."""

    trial: Trial
    run_id: str | None
    metrics: Mapping[str, float] = field(default_factory=dict)
    model_uri: str | None = None
    error: str | None = None
    training_minutes: float | None = None  # training passes and validations
    validation_elbo_nats: float | None = None

    @property
    def status(self) -> str:
        return FAILED if self.error is not None else FINISHED


def parse_grid(texts: Sequence[str]) -> dict[str, list[Any]]:
    """``["model.latent_dim=2,10,20", "objective.beta=0.5,1"]`` -> {"model.latent_dim": [2, 10, 20], "objective.beta":
    [0.5, 1]}: each swept field and its values, as ``--grid`` gives them.

    The values are separated by commas; each is read as JSON when it parses, else kept as text (``mlp,conv``), so a
    list value is written as JSON: ``model.hidden_dims=[400],[512,256]``.
    """
    grid: dict[str, list[Any]] = {}
    for text in texts:
        name, separator, raw = text.partition("=")
        name, raw = name.strip(), raw.strip()
        if not separator or not name or not raw:
            raise ConfigError(f"--grid {text!r} is not of the form section.field=value1,value2,...")
        if name in grid:
            raise ConfigError(f"{name} is swept twice: give all its values in one --grid")
        grid[name] = _values(text, raw)
    return grid


def trials(
    base: RunConfig, grid: Mapping[str, Sequence[Any]], *, samples: int | None = None, seed: int = 0
) -> list[Trial]:
    """The sweep's trials: ``base`` with every combination of the ``grid``'s values (``{"model.latent_dim": [2, 10]}``),
    the first field varying slowest; with ``samples``, that many distinct combinations drawn at random with ``seed``,
    kept in grid order.

    Every trial's config is validated here, so that a bad value stops the sweep before any trial starts; the
    :class:`ConfigError` names the trial, its swept values and the bad field.
    """
    if not grid:
        raise ConfigError("a sweep needs at least one swept field (--grid section.field=value1,value2,...)")
    for name, values in grid.items():
        _check_field(name, values)
    combinations = list(itertools.product(*grid.values()))
    if samples is not None:
        if not 1 <= samples <= len(combinations):
            raise ConfigError(
                f"samples must be between 1 and the grid's {len(combinations)} combinations, got {samples}"
            )
        picked = sorted(random.Random(seed).sample(range(len(combinations)), samples))
        combinations = [combinations[index] for index in picked]
    result = []
    for number, combination in enumerate(combinations, start=1):
        values = dict(zip(grid, combination))
        try:
            config = with_overrides(base, values)
        except ConfigError as error:
            raise ConfigError(f"trial {number} of {len(combinations)} ({_describe(values)}): {error}") from None
        result.append(Trial(number, values, config))
    return result


def leaderboard(results: Sequence[TrialResult]) -> pd.DataFrame:
    """One row per trial, best first, failed trials last in trial order.

    Trials are ranked by the validation ELBO (higher is better) when every finished trial has one: choosing among
    trials by their test scores would make the chosen one's test score an optimistic estimate. Without a validation
    set they are ranked by the primary test metric (:func:`pipeline.registry.primary_metric`: the test NLL when
    measured, lower is better, else the test ELBO, higher is better).

    Columns: trial, run_id, status ("finished" or "failed"), each swept field, val_elbo_nats (when any trial has it),
    test_elbo_nats, test_nll_nats (when any trial measured it), training_minutes (when any trial reports it) and
    error (the failed trials' error, empty for the others).
    """
    fields = list(dict.fromkeys(name for result in results for name in result.trial.values))
    metrics = [name for name in LEADERBOARD_METRICS if any(name in result.metrics for result in results)]
    metrics = metrics or ["test_elbo_nats"]
    validated = [VALIDATION_METRIC] if any(result.validation_elbo_nats is not None for result in results) else []
    timed = ["training_minutes"] if any(result.training_minutes is not None for result in results) else []
    rows = [
        {
            "trial": result.trial.number,
            "run_id": result.run_id,
            "status": result.status,
            **{name: result.trial.values.get(name) for name in fields},
            **{name: math.nan if result.validation_elbo_nats is None else result.validation_elbo_nats for name in validated},
            **{name: float(result.metrics.get(name, math.nan)) for name in metrics},
            **{name: math.nan if result.training_minutes is None else result.training_minutes for name in timed},
            "error": result.error,
        }
        for result in results
    ]
    board = pd.DataFrame(rows, columns=["trial", "run_id", "status", *fields, *validated, *metrics, *timed, "error"])
    board = board.sort_values("trial", kind="stable")
    finished = [result for result in results if result.status == FINISHED]
    if finished and all(_finite(result.validation_elbo_nats) for result in finished):
        board = board.sort_values(VALIDATION_METRIC, ascending=False, na_position="last", kind="stable")
    elif finished:
        metric, _, lower_is_better = primary_metric(finished[0].metrics)
        board = board.sort_values(metric, ascending=lower_is_better, na_position="last", kind="stable")
    board = board.sort_values("status", key=lambda status: status.eq(FAILED), kind="stable")
    return board.reset_index(drop=True)


def best(results: Sequence[TrialResult]) -> TrialResult | None:
    """The trial at the top of the :func:`leaderboard`, or None when every trial failed (or there were none)."""
    board = leaderboard(results)
    if board.empty or board.at[0, "status"] == FAILED:
        return None
    return next(result for result in results if result.trial.number == board.at[0, "trial"])


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _check_field(name: str, values: Sequence[Any]) -> None:
    if name in SCORE_FIELDS or any(field.startswith(f"{name}.") for field in SCORE_FIELDS):
        raise ConfigError(
            f"{name} cannot be swept: the trials' test scores compare only when they are measured alike, and it "
            "decides what they measure (pipeline.config.SCORE_FIELDS): set it for the whole sweep with --set"
        )
    sweep_setting = next((why for prefix, why in SWEEP_SETTINGS.items() if name == prefix or name.startswith(f"{prefix}.")), None)
    if sweep_setting is not None:
        raise ConfigError(f"{name} cannot be swept: {sweep_setting}")
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ConfigError(f"{name}: a swept field needs a non-empty list of values, got {values!r}")
    seen = set()
    for value in values:
        key = json.dumps(value, sort_keys=True, default=str)
        if key in seen:
            raise ConfigError(f"{name}: the value {key} is listed twice")
        seen.add(key)


def _describe(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{name}={json.dumps(value)}" for name, value in values.items())


def _values(text: str, raw: str) -> list[Any]:
    try:
        return json.loads(f"[{raw}]")
    except json.JSONDecodeError:
        pass
    items = [item.strip() for item in raw.split(",")]
    if "" in items:
        raise ConfigError(f"--grid {text!r}: a value is empty (values are separated by single commas)")
    return [parse_value(item) for item in items]
