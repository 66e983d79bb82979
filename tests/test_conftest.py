"""Specification of the test harness itself: where the real data comes from, when a missing part is an error, and
servers that start on a port nobody else has."""

import gzip
import hashlib
import http.server
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

import tests.conftest as harness
from pipeline import data

FILE = b"\x00\x00\x08\x01\x00\x00\x00\x01\x07"  # a tiny IDX file: one byte, 7


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({}, False),
        ({"CI": "true"}, True),
        ({"CI": "false"}, False),
        ({"VAE_REQUIRE_BROWSER": "1"}, True),
        ({"VAE_REQUIRE_BROWSER": "0"}, False),
        ({"VAE_REQUIRE_DATA": "1"}, False),  # another variable's business
    ],
)
def test_a_missing_part_is_required_in_ci_or_where_its_variable_says_so(environment, expected, monkeypatch):
    for name in ("CI", "VAE_REQUIRE_BROWSER", "VAE_REQUIRE_DATA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert harness.required("VAE_REQUIRE_BROWSER") is expected


@pytest.fixture
def public_host(tmp_path: Path) -> Iterator[str]:
    """An HTTP server publishing one gzipped file, ``tiny.gz``, as a data set's host does."""
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "tiny.gz").write_bytes(gzip.compress(FILE))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "host"))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield f"http://127.0.0.1:{server.server_address[1]}/"
        server.shutdown()


def publish_only(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    """Make the one data set a tiny one published at ``host``, with no mirror."""
    spec = data.DatasetSpec("tiny", (host,), {"tiny": hashlib.sha256(FILE).hexdigest()}, ("seven",), {"tiny": len(FILE)})
    monkeypatch.setattr(data, "DATASETS", {"tiny": spec})
    monkeypatch.delenv("VAE_DATA_MIRROR", raising=False)


def test_without_a_mirror_the_real_data_is_fetched_from_the_public_hosts(public_host, tmp_path, monkeypatch):
    publish_only(monkeypatch, public_host)
    monkeypatch.setenv("VAE_DATA_DIR", str(tmp_path / "cache"))
    assert harness.unavailable_data() is None
    assert (tmp_path / "cache" / "tiny" / "tiny").read_bytes() == FILE


def test_when_the_real_data_cannot_be_fetched_the_reason_names_the_data_set_and_what_failed(tmp_path, monkeypatch):
    with harness.refused_port() as port:
        publish_only(monkeypatch, f"http://127.0.0.1:{port}/")
        monkeypatch.setenv("VAE_DATA_DIR", str(tmp_path / "cache"))
        reason = harness.unavailable_data()
    assert reason.startswith(
        f"needs the tiny data set, which could not be fetched from the public hosts (http://127.0.0.1:{port}/tiny.gz: "
    )
    assert "Connection refused" in reason


def test_connections_to_a_refused_port_are_refused():
    with harness.refused_port() as port, pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10)


def test_a_server_whose_port_was_taken_before_it_bound_it_starts_again_on_another(tmp_path, monkeypatch):
    # Another session's server took the port that free_port chose, and it answers the ready URL too.
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as other:
        threading.Thread(target=other.serve_forever, daemon=True).start()
        taken = other.server_address[1]
        ports, free_port = iter([taken]), harness.free_port
        monkeypatch.setattr(harness, "free_port", lambda: next(ports, None) or free_port())
        command = lambda port: [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]  # noqa: E731
        with harness.serving(command, ready_path="/", log=tmp_path / "server.log") as server:
            assert server.port != taken and server.url == f"http://127.0.0.1:{server.port}"
            assert harness._listens_on(server.process, server.port)
        assert server.process.poll() is not None  # stopped with the block
        other.shutdown()



def test_a_test_that_hangs_fails_at_its_timeout_and_the_run_goes_on(tmp_path):
    (tmp_path / "test_hang.py").write_text(
        "import time\n\ndef test_hangs():\n    time.sleep(3600)\n\ndef test_after_it():\n    pass\n"
    )
    # The project's pytest settings, with the timeout cut to 2 s for the sake of time.
    command = [sys.executable, "-m", "pytest", "-c", str(harness.PROJECT_ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
               "-p", "no:cacheprovider", "-o", "timeout=2", str(tmp_path / "test_hang.py")]
    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 1
    assert "Failed: Timeout (>2.0s) from pytest-timeout." in finished.stdout
    assert "1 failed, 1 passed" in finished.stdout
