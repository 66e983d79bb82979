"""Specification of the pipeline under attack, with real servers and processes: credentials never leak."""

import asyncio
import base64
import gzip
import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

import flows
from pipeline import data
from tests.conftest import PROJECT_ROOT, needs_mirror

pytestmark = pytest.mark.usefixtures("prefect_server")

SECRET = "s3cret"
SMALL = {
    "data.train_subset": 300, "data.validation_size": 200, "model.hidden_dims": [32], "model.latent_dim": 2,
    "train.batch_size": 100, "train.device": "cpu", "train.epochs": 1, "eval.iwae_samples": 2,
}
SMALL_ARGS = [arg for name, value in SMALL.items() for arg in ("--set", f"{name}={json.dumps(value)}")]


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://alice:{SECRET}@")


def redacted(url: str) -> str:
    return url.replace("http://", "http://***@")


async def flow_run_records(flow_name: str) -> tuple[list[str], list[str]]:
    """The log messages and the artifacts' data of the latest run of ``flow_name`` on the session's Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowFilter, FlowFilterName
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        (run,) = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])), sort=FlowRunSort.START_TIME_DESC, limit=1
        )
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    return [log.message for log in logs], [str(artifact.data) for artifact in artifacts]


def everything_recorded_about(client: MlflowClient, run_id: str, scratch: Path) -> str:
    """The run's tags, params and text artifacts (config.json, error.txt), as one text."""
    run = client.get_run(run_id)
    texts = [json.dumps(run.data.tags), json.dumps(run.data.params)]
    for info in client.list_artifacts(run_id):
        if info.path.endswith((".txt", ".json")):
            texts.append(Path(client.download_artifacts(run_id, info.path, str(scratch))).read_text())
    return "\n".join(texts)


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

    with pytest.warns(UserWarning) as warned:
        code = flows.main(["train", *SMALL_ARGS, "--set", f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}"])

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
    logs, artifacts = asyncio.run(flow_run_records("train-vae"))
    assert any(source in message for message in logs)
    for place, text in {"stdout": out, "stderr": err, "MLflow": recorded, "Prefect logs": "\n".join(logs),
                        "warnings": "\n".join(str(w.message) for w in warned)}.items():
        assert SECRET not in text and "alice" not in text, place


@needs_mirror
def test_a_tracking_server_password_is_in_no_output_artifact_log_or_tag_of_a_run_nor_in_errors(
    mlflow_server, tmp_path, monkeypatch, capfd
):
    url, _ = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", with_credentials(url))

    assert flows.main(["train", *SMALL_ARGS]) == 0

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
        env={**flows.os.environ, "MLFLOW_TRACKING_URI": with_credentials(url)}, capture_output=True, text=True, timeout=300,
    )
    assert missing.returncode == 1
    assert missing.stderr.startswith(f"error: no model 'models:/vae-mnist@nope' in {redacted(url)}: ")
    for place, text in {"stdout": out, "stderr": err, "Prefect artifact": summary, "Prefect logs": "\n".join(logs),
                        "MLflow run": recorded, "MLflow registry": registered,
                        "evaluate's output": missing.stdout + missing.stderr}.items():
        assert SECRET not in text and "alice" not in text, place
