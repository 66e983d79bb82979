"""Specification of the pipeline under attack, with real servers and processes: a tampered model runs no code, the UI
listens no wider than asked, and credentials never leak."""

import asyncio
import base64
import gzip
import http.server
import itertools
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
import tomllib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow

import pytest
import torch
import yaml
from mlflow import MlflowClient
from packaging.requirements import Requirement
from packaging.version import Version

import flows
from pipeline import cli, data, registry, tracking
from pipeline.config import load_config
from tests.conftest import (
    PROJECT_ROOT, Payload, descendants, free_port, is_loopback, listening_sockets, needs_data, running,
)
from tests import team_servers
from vae.export import ModelFileError
from vae.models import build_model

pytestmark = pytest.mark.usefixtures("prefect_server")

SECRET = "s3cret"
SMALL = {
    "data.train_subset": 300, "data.validation_size": 200, "model.hidden_dims": [32], "model.latent_dim": 2,
    "train.batch_size": 100, "train.device": "cpu", "train.epochs": 1, "eval.iwae_samples": 2, "eval.fid": False,
}
SMALL_ARGS = [arg for name, value in SMALL.items() for arg in ("--set", f"{name}={json.dumps(value)}")]


LOGS_SECONDS = 120  # for a run's last log records to reach the Prefect server on a loaded machine


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://alice:{SECRET}@")


def redacted(url: str) -> str:
    return url.replace("http://", "http://***@")


async def flow_run_records(
    flow_name: str, until: Callable[[list[str]], bool] | None = None
) -> tuple[list[str], list[str]]:
    """The log messages and the artifacts' data of the latest run of ``flow_name`` on the session's Prefect server.

    Logs reach the server in batches from a background worker: it is flushed first, and with ``until`` the logs are
    read again (for up to LOGS_SECONDS) until ``until(messages)`` holds.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowFilter, FlowFilterName
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.logging.handlers import APILogHandler

    await APILogHandler.aflush()
    deadline = time.monotonic() + LOGS_SECONDS
    async with get_client() as client:
        (run,) = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])), sort=FlowRunSort.START_TIME_DESC, limit=1
        )
        while True:
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            messages = [log.message for log in logs]
            if until is None or until(messages) or time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
        artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    return messages, [str(artifact.data) for artifact in artifacts]


def everything_recorded_about(client: MlflowClient, run_id: str, scratch: Path) -> str:
    """The run's tags, params and text artifacts (config.json, error.txt), as one text."""
    run = client.get_run(run_id)
    texts = [json.dumps(run.data.tags), json.dumps(run.data.params)]
    for info in client.list_artifacts(run_id):
        if info.path.endswith((".txt", ".json")):
            texts.append(Path(client.download_artifacts(run_id, info.path, str(scratch))).read_text())
    return "\n".join(texts)


# --- torch's own loader ---------------------------------------------------------------------------------------------


def test_the_torch_requirement_excludes_the_versions_whose_weights_only_loads_can_run_code():
    # CVE-2025-32434: before 2.6, torch.load(weights_only=True) could still run code from a crafted file; the engine's
    # checkpoints are loaded that way.
    dependencies = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_requirement,) = [requirement for requirement in map(Requirement, dependencies) if requirement.name == "torch"]

    assert not torch_requirement.specifier.contains("2.5.1") and torch_requirement.specifier.contains("2.6.0")
    assert Version(torch.__version__.split("+")[0]) >= Version("2.6")


# --- a tampered model runs no code ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_server(tmp_path_factory, mlflow_template) -> Iterator[tuple[str, Path]]:
    """One real `mlflow server` (on a copy of the session's template store, artifacts served by it) for this module's
    tampered models: starting one takes seconds. Its URL and artifacts destination."""
    directory = tmp_path_factory.mktemp("model-server")
    shutil.copy(mlflow_template, directory / "mlflow.db")
    with team_servers.mlflow_server(f"sqlite:///{directory / 'mlflow.db'}", directory) as url:
        yield url, directory / "artifacts"


NLL_OF_EACH_NEW_CHAMPION = itertools.count(90.0, -1.0)  # each test's model beats the one before, the pipeline's way


@pytest.fixture
def champion_on_a_server(model_server, mlflow_store, monkeypatch, tmp_path) -> tuple[Path, Path]:
    """A tiny model logged to the module's `mlflow server` and registered as models:/vae-mnist@champion, a version of
    its own for each test (the previous test's, tampered with, is champion no more).

    Returns the model's directory in the server's artifact store (what whoever can write to the store can change) and
    the path of the marker file a payload would create. The local default store (``mlflow_store``) is only there to
    show that nothing goes to it.
    """
    url, artifacts_destination = model_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    before = set(artifacts_destination.rglob("MLmodel"))
    config = load_config("default", {"model.hidden_dims": [16], "model.latent_dim": 2})
    with tracking.start_run(config, run_name="to-be-tampered-with") as run:
        uri = registry.log_model(build_model(config.model, seed=0), config.model, torch.rand(4, 1, 28, 28))
    metrics = {"test_nll_nats": next(NLL_OF_EACH_NEW_CHAMPION)}
    version = registry.register_version(uri, config, metrics, run.info.run_id)
    registry.assign_alias(config, metrics, version)
    assert MlflowClient().get_model_version_by_alias("vae-mnist", "champion").version == version
    (mlmodel,) = set(artifacts_destination.rglob("MLmodel")) - before
    return mlmodel.parent, tmp_path / "payload-ran"


def generate(output: Path) -> subprocess.CompletedProcess:
    """``python flows.py generate models:/vae-mnist@champion -o OUTPUT``, as a user runs it."""
    command = [sys.executable, "flows.py", "generate", "models:/vae-mnist@champion", "-n", "4", "-o", str(output)]
    return subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)


def test_a_pickle_in_place_of_a_registered_models_weights_is_refused_and_never_unpickled(champion_on_a_server, tmp_path):
    model, marker = champion_on_a_server
    # Whatever the weights file is called: every binary file of the model's data.
    weights = [path for path in (model / "data").rglob("*") if path.is_file() and path.suffix not in (".json", ".txt")]
    for path in weights:
        path.write_bytes(pickle.dumps(Payload(marker)))

    generated = generate(tmp_path / "samples.png")
    assert generated.returncode == 1
    assert generated.stderr.endswith("weights.safetensors: not a safetensors file (Error while deserializing header: header too large)\n")
    with pytest.raises(ModelFileError, match="weights.safetensors: not a safetensors file"):
        mlflow.pyfunc.load_model("models:/vae-mnist@champion")  # MLflow's own loader, through pipeline.serving
    with pytest.raises(ModelFileError, match="weights.safetensors: not a safetensors file"):
        registry.load_model("models:/vae-mnist@champion")

    assert [path.name for path in weights] == ["weights.safetensors"]
    assert not marker.exists() and not (tmp_path / "samples.png").exists()


def test_pickles_added_beside_a_registered_models_files_are_never_read(champion_on_a_server, tmp_path):
    model, marker = champion_on_a_server
    for name in ("data/vae/model.pkl", "data/model.pth", "model.pkl", "data/vae/pickle_module_info.txt"):
        (model / name).write_bytes(pickle.dumps(Payload(marker)))

    generated = generate(tmp_path / "samples.png")
    assert generated.returncode == 0, generated.stderr[-2000:]
    images = torch.rand(2, 1, 28, 28).numpy()
    expected = registry.load_model("models:/vae-mnist@champion").reconstruct(torch.as_tensor(images)).numpy()
    assert (mlflow.pyfunc.load_model("models:/vae-mnist@champion").predict(images) == expected).all()
    assert (registry.load_pyfunc("models:/vae-mnist@champion").predict(images) == expected).all()

    assert not marker.exists() and (tmp_path / "samples.png").is_file()


def tamper_mlmodel(model: Path, marker: Path, how: str) -> None:
    """Edit the model's MLmodel as a tamperer would, so that MLflow's pyfunc loader runs ``Payload(marker)``."""
    meta = yaml.safe_load((model / "MLmodel").read_text())
    pyfunc = meta["flavors"]["python_function"]
    if how == "unpickling-loader":  # mlflow.pytorch's loader torch.load()s the data file with weights_only=False
        (model / "data" / "model.pth").write_bytes(pickle.dumps(Payload(marker)))
        pyfunc.update(loader_module="mlflow.pytorch", data="data/model.pth")
    elif how == "code-directory":  # MLflow puts it first on sys.path before importing the loader module
        (model / "code" / "pipeline").mkdir(parents=True)
        (model / "code" / "pipeline" / "__init__.py").write_text(f"open({str(marker)!r}, 'w')\n")
        pyfunc["code"] = "code"
    else:  # a second flavor, for the loaders that pick a flavor by name
        (model / "data" / "model.pth").write_bytes(pickle.dumps(Payload(marker)))
        meta["flavors"]["pytorch"] = {"model_data": "data/model.pth", "pytorch_version": str(torch.__version__)}
    (model / "MLmodel").write_text(yaml.safe_dump(meta))


@pytest.mark.parametrize(
    ("how", "problem"),
    [
        ("unpickling-loader", "loader_module is 'mlflow.pytorch', not 'pipeline.serving'; data is 'data/model.pth', not 'data/vae'"),
        ("code-directory", "code is 'code', not None"),
        ("second-flavor", "flavors are ['python_function', 'pytorch'], not ['python_function']"),
    ],
)
def test_a_registered_models_mlmodel_edited_to_run_code_is_refused_by_every_loader_of_the_pipeline(
    champion_on_a_server, tmp_path, how, problem
):
    model, marker = champion_on_a_server
    tamper_mlmodel(model, marker, how)

    generated = generate(tmp_path / "samples.png")
    assert generated.returncode == 1
    refusal = (
        f"models:/vae-mnist@champion: its MLmodel was altered or is not this pipeline's ({problem}): refusing to load "
        "it, as MLflow would import and run what it names"
    )
    assert generated.stderr == f"error: {refusal}\n"
    for load in (registry.load_model, registry.load_pyfunc, registry.load):
        with pytest.raises(ModelFileError) as error:
            load("models:/vae-mnist@champion")
        assert str(error.value) == refusal

    assert not marker.exists() and not (tmp_path / "samples.png").exists()


def test_a_registered_models_config_with_bad_values_is_refused_naming_the_field(champion_on_a_server, tmp_path):
    model, _ = champion_on_a_server
    config_file = model / "data" / "vae" / "model_config.json"
    values = json.loads(config_file.read_text())
    values["model"]["hidden_dims"] = [10**9]  # a 784 x 10^9 layer: memory exhausted at load, were it built
    config_file.write_text(json.dumps(values))

    generated = generate(tmp_path / "samples.png")

    assert generated.returncode == 1
    assert generated.stderr.endswith(
        "model_config.json: invalid model config:\n  hidden_dims.0: Input should be less than or equal to 4096 "
        "(got 1000000000)\n"
    )


# --- the UI listens no wider than asked ----------------------------------------------------------------------------


def serve_ui(tmp_path: Path, *options: str) -> tuple[int, set[tuple[str, int]], str]:
    """``python flows.py ui --port PORT OPTIONS`` until it answers: its port, where its processes listen, its output."""
    port = free_port()
    command = [sys.executable, "flows.py", "ui", "--port", str(port), *options]
    with running(command, ready_url=f"http://127.0.0.1:{port}/health", log=tmp_path / "ui.log") as ui:
        sockets = listening_sockets(descendants(ui.pid))
    return port, sockets, (tmp_path / "ui.log").read_text()


def test_the_ui_listens_on_loopback_only(mlflow_store, tmp_path):
    port, sockets, _ = serve_ui(tmp_path)

    assert port in {found for _, found in sockets}
    assert [address for address, _ in sockets if not is_loopback(address)] == []


def test_the_ui_refuses_a_host_beyond_this_machine_unless_allowed(mlflow_store, monkeypatch, capsys):
    def started(*args):
        raise AssertionError(f"the UI was started: {args}")

    monkeypatch.setattr(cli.os, "execv", started)

    assert cli.main(["ui", "--host", "0.0.0.0"]) == 2
    assert capsys.readouterr().err == (
        "error: --host 0.0.0.0 would serve the UI beyond this machine, and MLflow's UI has no authentication: whoever "
        "reaches it can read every run and model, and change or delete them. Add --allow-remote to do it anyway, on a "
        "network you trust, or reach the UI through an SSH tunnel (ssh -L 5000:127.0.0.1:5000 <this host>).\n"
    )


def test_with_allow_remote_the_ui_listens_where_asked_and_says_it_has_no_authentication(mlflow_store, tmp_path):
    port, sockets, output = serve_ui(tmp_path, "--host", "0.0.0.0", "--allow-remote")

    assert ("0.0.0.0", port) in sockets
    assert output.startswith(
        "warning: serving the UI on 0.0.0.0 beyond this machine: MLflow's UI has no authentication: whoever reaches "
        "it can read every run and model, and change or delete them.\n"
    )


# --- credentials ----------------------------------------------------------------------------------------------------


@pytest.fixture
def private_mirror() -> Iterator[tuple[str, list[str]]]:
    """A data mirror on 127.0.0.1 that wants HTTP basic auth as alice and serves a tampered file for every path.

    Yields its URL (without credentials) and the Authorization headers it received.
    """
    expected = "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()
    received: list[str] = []
    tampered = gzip.compress(b"\x00\x00\x08\x01" + bytes(4))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            received.append(self.headers.get("Authorization", ""))
            body = tampered if received[-1] == expected else b""
            self.send_response(200 if body else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", received
    finally:
        server.shutdown()
        server.server_close()


def test_a_mirror_password_is_in_no_tag_file_log_or_output_of_the_run_its_download_failed(
    private_mirror, mlflow_store, tmp_path, monkeypatch, capfd
):
    url, received = private_mirror
    spec = data.DATASETS["mnist"]
    monkeypatch.setitem(data.DATASETS, "mnist", data.DatasetSpec(spec.name, ("http://127.0.0.1:9/",), spec.sha256, spec.class_names, spec.sizes))
    monkeypatch.setenv("VAE_DATA_MIRROR", with_credentials(url))
    monkeypatch.setattr(flows, "fetch_data", flows.fetch_data.with_options(retries=0))

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        code = cli.main(["train", *SMALL_ARGS, "--set", f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}"])

    assert code == 1
    assert set(received) == {"Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()}  # the password was used
    out, err = capfd.readouterr()
    source = f"{redacted(url)}/mnist/train-images-idx3-ubyte.gz"
    assert f"  {source}: train-images-idx3-ubyte from {source}: decompressed sha256 is" in err
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("vae-mnist").experiment_id])
    assert run.info.status == "FAILED" and source in run.data.tags["error"]
    recorded = everything_recorded_about(client, run.info.run_id, tmp_path / "artifacts")
    assert f"{source}: train-images-idx3-ubyte from {source}" in recorded  # error.txt, with the redacted source
    logs, artifacts = asyncio.run(flow_run_records("train-vae", until=lambda logs: any(source in m for m in logs)))
    assert any(source in message for message in logs)
    for place, text in {"stdout": out, "stderr": err, "MLflow": recorded, "Prefect logs": "\n".join(logs),
                        "warnings": "\n".join(str(w.message) for w in warned)}.items():
        assert SECRET not in text and "alice" not in text, place


@needs_data
def test_a_tracking_server_password_is_in_no_output_artifact_log_or_tag_of_a_run_nor_in_errors(
    mlflow_server, tmp_path, monkeypatch, capfd
):
    url, _ = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", with_credentials(url))

    assert cli.main(["train", *SMALL_ARGS]) == 0

    out, err = capfd.readouterr()
    assert f"store {redacted(url)})" in out
    logs, artifacts = asyncio.run(flow_run_records("train-vae"))
    (summary,) = artifacts
    assert f"of `{redacted(url)}`" in summary
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("vae-mnist").experiment_id])
    recorded = everything_recorded_about(client, run.info.run_id, tmp_path / "artifacts")
    version = client.get_model_version("vae-mnist", "1")
    registered = json.dumps([version.tags, version.source, version.description])

    missing = subprocess.run(
        [sys.executable, "flows.py", "evaluate", "models:/vae-mnist@nope"], cwd=PROJECT_ROOT,
        env={**os.environ, "MLFLOW_TRACKING_URI": with_credentials(url)}, capture_output=True, text=True, timeout=300,
    )
    assert missing.returncode == 1
    assert missing.stderr.startswith(f"error: no model 'models:/vae-mnist@nope' in {redacted(url)}: ")
    for place, text in {"stdout": out, "stderr": err, "Prefect artifact": summary, "Prefect logs": "\n".join(logs),
                        "MLflow run": recorded, "MLflow registry": registered,
                        "evaluate's output": missing.stdout + missing.stderr}.items():
        assert SECRET not in text and "alice" not in text, place
