"""Shared test harness: Prefect and MLflow in temporary homes, never the user's or the project's own."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Prefect reads its settings when first imported: point it at a temporary home before any test imports it.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One Prefect server (a real one, on a SQLite database in a temporary directory) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store created once (its migrations take seconds); tests work on copies of it."""
    import mlflow

    from pipeline import tracking

    database = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    try:
        tracking.ensure_store(f"sqlite:///{database}")
    finally:
        mlflow.set_tracking_uri(None)
    return database


def use_store_copy(template: Path, directory: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Copy the template store into ``directory`` and make it MLFLOW_TRACKING_URI and the default ``mlruns/``."""
    from pipeline import tracking

    directory.mkdir(parents=True)
    shutil.copy(template, directory / "mlflow.db")
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    monkeypatch.setattr(tracking, "MLRUNS_DIR", directory)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def store_copier(mlflow_template: Path):
    """:func:`use_store_copy` of the session's template, for fixtures of wider scope than one test."""
    return lambda directory, monkeypatch: use_store_copy(mlflow_template, directory, monkeypatch)


@pytest.fixture
def mlflow_store(mlflow_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh MLflow store for one test, in ``tmp_path/mlruns``, made both MLFLOW_TRACKING_URI and the default."""
    import mlflow

    yield use_store_copy(mlflow_template, tmp_path / "mlruns", monkeypatch)
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
