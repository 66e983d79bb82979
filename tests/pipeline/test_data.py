"""Tests of pipeline.data: fetching and verifying IDX files, parsing them, and splitting and binarizing the images."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import data
from pipeline.data import (
    DATASETS,
    FILE_NAMES,
    DataError,
    DatasetSpec,
    DownloadError,
    DownloadLimitError,
    IDXFormatError,
    RawDataset,
    default_cache_dir,
    fetch,
    load,
    mirrors_from_env,
    prepare,
    read_idx,
)
from tests.conftest import needs_data
from vae.data import ImageSet

UNREACHABLE = "http://127.0.0.1:9/"  # the discard port: connections are refused at once
NAME = "t10k-labels-idx1-ubyte"


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` encoded as an IDX file."""
    code = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}[array.dtype.str[1:]]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


LABELS = idx_bytes(np.arange(10, dtype=np.uint8))  # 8 header bytes and 10 labels


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def publish(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes], hosts: tuple[str, ...] = (UNREACHABLE,)
) -> DatasetSpec:
    """Register the data set "tiny" whose published files have the given contents."""
    spec = DatasetSpec(
        "tiny", hosts, {name: sha256(content) for name, content in files.items()}, tuple("0123456789"),
        sizes={name: len(content) for name, content in files.items()},
    )
    monkeypatch.setitem(DATASETS, "tiny", spec)
    return spec


def make_mirror(root: Path, files: dict[str, bytes], *, compress: bool = True) -> str:
    """A mirror directory holding ``files`` of the data set "tiny", gzipped or not."""
    (root / "tiny").mkdir(parents=True)
    for name, content in files.items():
        if compress:
            (root / "tiny" / f"{name}.gz").write_bytes(gzip.compress(content, mtime=0))
        else:
            (root / "tiny" / name).write_bytes(content)
    return str(root)


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> DatasetSpec:
    """The data set "tiny" with one file, ``NAME``, holding ``LABELS``."""
    return publish(monkeypatch, {NAME: LABELS})


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# A local HTTP server: each request is answered by a function of the handler, and its path is recorded.
Respond = Callable[[http.server.BaseHTTPRequestHandler], None]


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Respond], tuple[str, list[str]]]]:
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    servers = []

    def start(respond: Respond) -> tuple[str, list[str]]:
        requested: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requested.append(self.path)
                respond(self)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}", requested

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def reply(
    handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes = b"", length: int | None = None
) -> None:
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    handler.wfile.write(body)


def files_under(root: Path) -> Respond:
    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        file = root / handler.path.lstrip("/")
        if file.is_file():
            reply(handler, 200, file.read_bytes())
        else:
            reply(handler, 404)

    return respond


# fetch


def test_fetch_from_local_mirror_gives_the_decompressed_verified_file_and_nothing_else(tiny, cache, tmp_path):
    mirror = make_mirror(tmp_path / "mirror", {NAME: LABELS})

    paths = fetch("tiny", cache, [mirror])

    assert paths == {NAME: cache / "tiny" / NAME}
    assert paths[NAME].read_bytes() == LABELS
    assert [path.name for path in (cache / "tiny").iterdir()] == [NAME]


def test_fetch_reads_the_uncompressed_file_when_the_mirror_has_no_gz(tiny, cache, tmp_path):
    mirror = make_mirror(tmp_path / "mirror", {NAME: LABELS}, compress=False)

    assert fetch("tiny", cache, [mirror])[NAME].read_bytes() == LABELS


def test_fetch_accepts_a_file_url_mirror(tiny, cache, tmp_path):
    make_mirror(tmp_path / "mirror", {NAME: LABELS})

    assert fetch("tiny", cache, [(tmp_path / "mirror").as_uri()])[NAME].read_bytes() == LABELS


def test_fetch_uses_the_mirrors_in_VAE_DATA_MIRROR_when_mirrors_is_none(tiny, cache, tmp_path, monkeypatch):
    mirror = make_mirror(tmp_path / "mirror", {NAME: LABELS})
    monkeypatch.setenv("VAE_DATA_MIRROR", f"{tmp_path / 'missing'}  {mirror}")

    assert fetch("tiny", cache)[NAME].read_bytes() == LABELS


def test_corrupt_mirror_file_is_rejected_with_its_hashes_and_the_next_mirror_is_used(tiny, cache, tmp_path):
    wrong = idx_bytes(np.zeros(10, dtype=np.uint8))
    corrupt = make_mirror(tmp_path / "corrupt", {NAME: wrong})
    good = make_mirror(tmp_path / "good", {NAME: LABELS})

    with pytest.warns(UserWarning) as record:
        paths = fetch("tiny", cache, [corrupt, good])

    assert [str(warning.message) for warning in record] == [
        f"{NAME} from {corrupt}/tiny/{NAME}.gz: decompressed sha256 is {sha256(wrong)}, expected {sha256(LABELS)}"
    ]
    assert paths[NAME].read_bytes() == LABELS


def test_all_sources_failing_raises_download_error_listing_every_attempt_and_leaves_no_file(tiny, cache, tmp_path):
    missing = str(tmp_path / "missing")
    wrong = idx_bytes(np.zeros(10, dtype=np.uint8))
    corrupt = make_mirror(tmp_path / "corrupt", {NAME: wrong})

    with pytest.raises(DownloadError) as error, warnings.catch_warnings():
        warnings.simplefilter("error")  # the corrupt mirror is named once, in the error, not also in a warning
        fetch("tiny", cache, [missing, corrupt], retries=2, backoff=0)

    header, *attempts, advice = str(error.value).splitlines()
    assert header == f"could not fetch {NAME} into {cache / 'tiny'} from any of 5 sources:"
    assert [line.split(": ", 1)[0] for line in attempts] == [
        f"  {missing}/tiny/{NAME}.gz",
        f"  {missing}/tiny/{NAME}",
        f"  {corrupt}/tiny/{NAME}.gz",
        f"  {corrupt}/tiny/{NAME}",
        f"  {UNREACHABLE}{NAME}.gz",
    ]
    assert attempts[0].endswith(f"FileNotFoundError: [Errno 2] No such file or directory: '{missing}/tiny/{NAME}.gz'")
    assert attempts[2].endswith(f"decompressed sha256 is {sha256(wrong)}, expected {sha256(LABELS)}")
    assert attempts[4].endswith("Connection refused> (2 attempts)")
    assert advice.startswith("Set VAE_DATA_MIRROR")
    assert list((cache / "tiny").iterdir()) == []


def test_truncated_gzip_leaves_no_file_in_the_cache(tiny, cache, tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "tiny").mkdir(parents=True)
    (mirror / "tiny" / f"{NAME}.gz").write_bytes(gzip.compress(LABELS)[:-10])

    with pytest.raises(DownloadError, match="EOFError: Compressed file ended before the end-of-stream marker"):
        fetch("tiny", cache, [str(mirror)], retries=1)

    assert list((cache / "tiny").iterdir()) == []


def test_download_cut_off_midway_is_retried_and_leaves_no_file_in_the_cache(tiny, cache, serve):
    body = gzip.compress(LABELS)
    url, requested = serve(lambda handler: reply(handler, 200, body[:20], length=len(body)))

    with pytest.raises(DownloadError, match=r"EOFError: Compressed file ended .* \(2 attempts\)"):
        fetch("tiny", cache, [url], retries=2, backoff=0)

    assert requested == [f"/tiny/{NAME}.gz"] * 2 + [f"/tiny/{NAME}"] * 2
    assert list((cache / "tiny").iterdir()) == []


def test_verified_cached_file_is_used_without_any_source(tiny, cache, tmp_path):
    fetch("tiny", cache, [make_mirror(tmp_path / "mirror", {NAME: LABELS})])

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fetch("tiny", cache, [], retries=1)[NAME].read_bytes() == LABELS


def test_cached_file_corrupted_later_is_fetched_again_with_a_warning(tiny, cache, tmp_path):
    mirror = make_mirror(tmp_path / "mirror", {NAME: LABELS})
    path = fetch("tiny", cache, [mirror])[NAME]
    path.write_bytes(b"garbage")

    with pytest.warns(UserWarning) as record:
        fetch("tiny", cache, [mirror])

    assert [str(warning.message) for warning in record] == [
        f"cached {path} has sha256 {sha256(b'garbage')}, expected {sha256(LABELS)}; fetching it again"
    ]
    assert path.read_bytes() == LABELS


def test_fetch_over_http_mirror(tiny, cache, tmp_path, serve):
    make_mirror(tmp_path / "mirror", {NAME: LABELS})
    url, requested = serve(files_under(tmp_path / "mirror"))

    assert fetch("tiny", cache, [url])[NAME].read_bytes() == LABELS
    assert requested == [f"/tiny/{NAME}.gz"]


def test_http_404_is_not_retried_and_falls_back_to_the_uncompressed_file(tiny, cache, tmp_path, serve):
    make_mirror(tmp_path / "mirror", {NAME: LABELS}, compress=False)
    url, requested = serve(files_under(tmp_path / "mirror"))

    assert fetch("tiny", cache, [url], retries=3, backoff=0)[NAME].read_bytes() == LABELS
    assert requested == [f"/tiny/{NAME}.gz", f"/tiny/{NAME}"]


def test_http_server_error_is_retried_retries_times_with_doubling_backoff_then_next_source_used(
    tiny, cache, tmp_path, serve, monkeypatch
):
    url, requested = serve(lambda handler: reply(handler, 500))
    good = make_mirror(tmp_path / "good", {NAME: LABELS})
    sleeps: list[float] = []
    monkeypatch.setattr(data.time, "sleep", sleeps.append)

    paths = fetch("tiny", cache, [url, good], retries=3, backoff=0.25)

    assert requested == [f"/tiny/{NAME}.gz"] * 3 + [f"/tiny/{NAME}"] * 3
    assert sleeps == [0.25, 0.5] * 2
    assert paths[NAME].read_bytes() == LABELS


def test_http_timeout_is_retried_and_reported(tiny, cache, serve):
    release = threading.Event()
    url, requested = serve(lambda handler: release.wait(10))
    try:
        with pytest.raises(DownloadError, match=r"timed out \(2 attempts\)"):
            fetch("tiny", cache, [url], timeout=0.1, retries=2, backoff=0)
    finally:
        release.set()

    # The client gave up on each request before the server answered, perhaps before the server's thread for it read
    # it: on loaded cores the last ones may be recorded after fetch returns, and not in order.
    deadline = time.monotonic() + 60
    while len(requested) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(requested) == [f"/tiny/{NAME}"] * 2 + [f"/tiny/{NAME}.gz"] * 2


# limits: a source is read no further than its file's size, and no longer than the deadline


def gzip_bomb(decompressed_mib: int) -> bytes:
    """A gzip file of ``decompressed_mib`` MiB of zeros, about a thousandth of that compressed: 32 MiB members, one
    after another (a valid gzip file, which gunzip and Python decompress whole)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip container
    member = b"".join([compressor.compress(bytes(1 << 20)) for _ in range(32)] + [compressor.flush()])
    return member * (decompressed_mib // 32)


def test_a_gzip_bomb_in_a_mirror_directory_is_stopped_past_the_files_published_size_and_leaves_nothing(
    tiny, cache, tmp_path
):
    mirror = tmp_path / "mirror"
    (mirror / "tiny").mkdir(parents=True)
    (mirror / "tiny" / f"{NAME}.gz").write_bytes(gzip_bomb(32))  # 32 MiB of zeros for an 18-byte file

    with pytest.raises(DownloadError) as error:
        fetch("tiny", cache, [str(mirror)])

    source = f"{mirror}/tiny/{NAME}.gz"
    assert str(error.value).splitlines()[1] == (
        f"  {source}: {NAME} from {source}: longer than the file's published 18 bytes once decompressed; stopped "
        "reading there (a gzip bomb, or not this file)"
    )
    assert list((cache / "tiny").iterdir()) == []


def test_a_gzip_bomb_over_http_for_the_mnist_training_images_stops_at_their_published_size(
    monkeypatch, cache, serve
):
    name = "train-images-idx3-ubyte"
    publish(monkeypatch, {name: b""})
    monkeypatch.setitem(DATASETS["tiny"].sizes, name, DATASETS["mnist"].sizes[name])  # 47,040,016 bytes
    bomb = gzip_bomb(1024)  # 1 GiB of zeros in about 1 MB
    url, requested = serve(lambda handler: reply(handler, 200, bomb))

    with pytest.raises(DownloadError) as error:
        fetch("tiny", cache, [url], retries=3, backoff=0)

    source = f"{url}/tiny/{name}.gz"
    assert str(error.value).splitlines()[1] == (
        f"  {source}: {name} from {source}: longer than the file's published 47,040,016 bytes once decompressed; "
        "stopped reading there (a gzip bomb, or not this file)"
    )
    assert requested == [f"/tiny/{name}.gz", f"/tiny/{name}"]  # the same source again would send the same bomb
    assert list((cache / "tiny").iterdir()) == []


def test_a_source_sending_more_than_the_file_takes_even_uncompressed_is_stopped_there(tiny, cache, tmp_path):
    # Gzip allows zero padding after the stream: this decompresses to the right bytes after 1 MiB of zeros.
    mirror = tmp_path / "mirror"
    (mirror / "tiny").mkdir(parents=True)
    (mirror / "tiny" / f"{NAME}.gz").write_bytes(gzip.compress(LABELS) + bytes(1 << 20))

    with pytest.raises(DownloadError) as error:
        fetch("tiny", cache, [str(mirror)])

    source = f"{mirror}/tiny/{NAME}.gz"
    limit = 18 + 18 // 100 + 65536
    assert str(error.value).splitlines()[1] == (
        f"  {source}: {NAME} from {source}: sent more than {limit:,} bytes, more than the file takes even stored "
        "uncompressed; stopped reading there"
    )
    assert list((cache / "tiny").iterdir()) == []


def test_a_source_that_trickles_bytes_is_stopped_at_the_deadline_though_no_read_times_out(
    tiny, cache, serve, monkeypatch
):
    monkeypatch.setitem(tiny.sizes, NAME, 100_000)  # a file the trickle would take 80 minutes to send

    def trickle(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        try:
            for _ in range(100_000):  # a byte every 50 ms: each read returns long before the 5-second socket timeout
                handler.wfile.write(b"\0")
                handler.wfile.flush()
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading, as it should
            pass

    url, requested = serve(trickle)
    started = time.monotonic()

    with pytest.raises(DownloadError) as error:
        fetch("tiny", cache, [url], timeout=5, retries=3, backoff=0, deadline=1)

    attempts = str(error.value).splitlines()[1:3]
    for attempt, suffix in zip(attempts, (".gz", "")):
        source = f"{url}/tiny/{NAME}{suffix}"
        assert attempt.startswith(f"  {source}: {NAME} from {source}: not done within the deadline of 1 s ("), attempt
        assert attempt.endswith(" bytes read); stopped reading (a stalled or trickling source)"), attempt
    assert requested == [f"/tiny/{NAME}.gz", f"/tiny/{NAME}"]  # not retried: the same source would trickle again
    # Two sources, each stopped at most one socket timeout (5 s) after its 1-second deadline.
    assert time.monotonic() - started < 2 * (1 + 5) + 10
    assert list((cache / "tiny").iterdir()) == []


def test_download_limit_errors_are_data_errors():
    assert issubclass(DownloadLimitError, DataError)


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_a_mirror_url_with_credentials_sends_them_as_basic_auth(tiny, cache, tmp_path, serve):
    make_mirror(tmp_path / "mirror", {NAME: LABELS})
    serve_files = files_under(tmp_path / "mirror")
    authorizations = []

    def private(handler: http.server.BaseHTTPRequestHandler) -> None:
        authorizations.append(handler.headers.get("Authorization"))
        if handler.headers.get("Authorization") == basic_auth("alice", "s3cret@x"):
            serve_files(handler)
        else:
            reply(handler, 401)

    url, requested = serve(private)
    with_credentials = url.replace("http://", "http://alice:s3cret%40x@")

    assert fetch("tiny", cache, [with_credentials])[NAME].read_bytes() == LABELS
    assert (requested, authorizations) == ([f"/tiny/{NAME}.gz"], [basic_auth("alice", "s3cret@x")])


def test_a_failing_mirror_url_with_credentials_is_named_without_them(tiny, cache, tmp_path, serve):
    wrong = idx_bytes(np.zeros(10, dtype=np.uint8))
    make_mirror(tmp_path / "mirror", {NAME: wrong})
    url, _ = serve(files_under(tmp_path / "mirror"))
    with_credentials = url.replace("http://", "http://alice:s3cret@")

    with pytest.raises(DownloadError) as error, warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fetch("tiny", cache, [with_credentials], retries=1)

    redacted = url.replace("http://", "http://***@")
    assert str(error.value).splitlines()[1:3] == [
        f"  {redacted}/tiny/{NAME}.gz: {NAME} from {redacted}/tiny/{NAME}.gz: decompressed sha256 is {sha256(wrong)}, "
        f"expected {sha256(LABELS)}",
        f"  {redacted}/tiny/{NAME}: HTTPError: HTTP Error 404: Not Found",
    ]
    assert record == []  # said once, by the error


def test_a_tampered_mirror_with_credentials_is_warned_about_without_them_when_a_later_source_serves_the_file(
    tiny, cache, tmp_path, serve
):
    make_mirror(tmp_path / "bad", {NAME: idx_bytes(np.zeros(10, dtype=np.uint8))})
    make_mirror(tmp_path / "good", {NAME: LABELS})
    bad, _ = serve(files_under(tmp_path / "bad"))
    good, _ = serve(files_under(tmp_path / "good"))

    with pytest.warns(UserWarning) as record:
        fetch("tiny", cache, [bad.replace("http://", "http://alice:s3cret@"), good], retries=1)

    redacted = bad.replace("http://", "http://***@")
    assert [str(warning.message).split(": decompressed")[0] for warning in record] == [
        f"{NAME} from {redacted}/tiny/{NAME}.gz"
    ]


LONG_LABELS = idx_bytes(np.arange(10_000, dtype=np.uint8) % 10)  # 10,008 bytes: three chunks of 4096 bytes at most


def test_without_a_terminal_a_download_reports_its_bytes_chunk_by_chunk_and_a_cached_file_nothing(
    cache, tmp_path, monkeypatch, progress_at_every_update, capsys
):
    publish(monkeypatch, {NAME: LONG_LABELS})
    mirror = make_mirror(tmp_path / "mirror", {NAME: LONG_LABELS})
    monkeypatch.setattr(data, "CHUNK_SIZE", 4096)

    fetch("tiny", cache, [mirror])
    assert capsys.readouterr().out.splitlines() == [
        f"{NAME} from {mirror}/tiny/{NAME}.gz: {done}/10.0kB ({share}%), 0 s"
        for done, share in [("4.10kB", 41), ("8.19kB", 82), ("10.0kB", 100)]
    ]
    fetch("tiny", cache, [mirror])
    assert capsys.readouterr() == ("", "")


def test_a_download_from_a_mirror_url_with_credentials_is_reported_without_them(
    cache, tmp_path, monkeypatch, serve, progress_at_every_update, capsys
):
    publish(monkeypatch, {NAME: LONG_LABELS})
    make_mirror(tmp_path / "mirror", {NAME: LONG_LABELS})
    url, _ = serve(files_under(tmp_path / "mirror"))
    monkeypatch.setattr(data, "CHUNK_SIZE", 8192)

    fetch("tiny", cache, [url.replace("http://", "http://alice:s3cret@")])
    redacted = url.replace("http://", "http://***@")
    assert capsys.readouterr().out.splitlines() == [
        f"{NAME} from {redacted}/tiny/{NAME}.gz: 8.19kB/10.0kB (82%), 0 s",
        f"{NAME} from {redacted}/tiny/{NAME}.gz: 10.0kB/10.0kB (100%), 0 s",
    ]


def test_a_download_with_progress_false_reports_nothing(cache, tmp_path, monkeypatch, progress_at_every_update, capsys):
    publish(monkeypatch, {NAME: LONG_LABELS})
    fetch("tiny", cache, [make_mirror(tmp_path / "mirror", {NAME: LONG_LABELS})], progress=False)
    assert capsys.readouterr() == ("", "")


def test_fetch_rejects_an_unknown_data_set(cache):
    with pytest.raises(DataError, match="unknown data set 'nope'; expected one of: mnist, fashion-mnist"):
        fetch("nope", cache, [])


def test_mirrors_from_env_splits_VAE_DATA_MIRROR_on_whitespace(monkeypatch):
    monkeypatch.setenv("VAE_DATA_MIRROR", " ../shared/data\thttp://host/data \n file:///srv/data ")
    assert mirrors_from_env() == ["../shared/data", "http://host/data", "file:///srv/data"]
    monkeypatch.delenv("VAE_DATA_MIRROR")
    assert mirrors_from_env() == []


def test_default_cache_dir_is_VAE_DATA_DIR_else_under_XDG_CACHE_HOME_else_under_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("VAE_DATA_DIR", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "vae-pipeline"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "vae-pipeline"
    monkeypatch.setenv("VAE_DATA_DIR", str(tmp_path / "data"))
    assert default_cache_dir() == tmp_path / "data"


def test_dataset_specs_publish_the_four_files_and_ten_class_names():
    assert set(DATASETS) == {"mnist", "fashion-mnist"}
    for spec in DATASETS.values():
        assert tuple(spec.sha256) == FILE_NAMES
        assert spec.sizes == {
            "train-images-idx3-ubyte": 47_040_016, "train-labels-idx1-ubyte": 60_008,
            "t10k-images-idx3-ubyte": 7_840_016, "t10k-labels-idx1-ubyte": 10_008,
        }
        assert len(spec.class_names) == 10
    assert DATASETS["mnist"].class_names == ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
    assert DATASETS["fashion-mnist"].class_names[0] == "T-shirt/top"
    assert DATASETS["fashion-mnist"].class_names[9] == "Ankle boot"


# read_idx


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-128, -1, 0, 127], dtype=np.int8),
        np.array([[-30000, 1], [256, 30000]], dtype=np.int16),
        np.array([-(2**31), 0, 2**31 - 1], dtype=np.int32),
        np.array([[0.5, -1.25e-3, 3.0e38]], dtype=np.float32),
        np.array([np.pi, -1e300], dtype=np.float64),
    ],
    ids=lambda array: f"{array.dtype}-{array.ndim}d",
)
def test_read_idx_round_trips_each_data_type(array, tmp_path):
    path = tmp_path / "array.idx"
    path.write_bytes(idx_bytes(array))

    tensor = read_idx(path)

    assert tensor.dtype == torch.from_numpy(array).dtype
    assert torch.equal(tensor, torch.from_numpy(array))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x00\x00\x08", "3 bytes, too short for the 4-byte IDX magic number"),
        (gzip.compress(LABELS, mtime=0), "bad IDX magic number 1f8b0800, must start with 0000 (still compressed?)"),
        (
            b"\x00\x00\x07\x01" + LABELS[4:],
            "unknown IDX data type code 0x07 (known: 0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E)",
        ),
        (b"\x00\x00\x08\x00", "IDX header declares 0 dimensions"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "8 bytes, too short for the 16-byte header of 3 dimensions"),
        (LABELS[:-1], "truncated: 17 bytes, but dimensions (10,) of uint8 need 18"),
        (LABELS + b"\x00\x00", "2 trailing bytes: 20 bytes, but dimensions (10,) of uint8 need 18"),
    ],
    ids=["too-short", "bad-magic", "unknown-dtype", "no-dimensions", "header-too-short", "truncated", "trailing-bytes"],
)
def test_read_idx_rejects_malformed_file_naming_file_and_problem(content, problem, tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(content)

    with pytest.raises(IDXFormatError) as error:
        read_idx(path)

    assert str(error.value) == f"{path}: {problem}"


# load


PIXELS = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)


def tiny_files(train_labels: list[int], train_shape: tuple[int, ...] = (3, 28, 28)) -> dict[str, bytes]:
    """The four IDX files of a tiny data set: training images of ``train_shape`` from ``PIXELS``, the last two its test
    images."""
    return {
        "train-images-idx3-ubyte": idx_bytes(np.resize(PIXELS, train_shape)),
        "train-labels-idx1-ubyte": idx_bytes(np.array(train_labels, dtype=np.uint8)),
        "t10k-images-idx3-ubyte": idx_bytes(PIXELS[3:]),
        "t10k-labels-idx1-ubyte": idx_bytes(np.array([5, 3], dtype=np.uint8)),
    }


def test_load_reads_images_and_int64_labels_with_the_data_set_digest(monkeypatch, cache, tmp_path):
    files = tiny_files([0, 1, 9])
    spec = publish(monkeypatch, files)

    raw = load("tiny", cache, [make_mirror(tmp_path / "mirror", files)])

    assert torch.equal(raw.train_images, torch.from_numpy(PIXELS[:3]))
    assert torch.equal(raw.test_images, torch.from_numpy(PIXELS[3:]))
    assert torch.equal(raw.train_labels, torch.tensor([0, 1, 9]))
    assert torch.equal(raw.test_labels, torch.tensor([5, 3]))
    assert (raw.name, raw.digest, raw.class_names) == ("tiny", spec.digest, spec.class_names)


@pytest.mark.parametrize(
    ("train_labels", "train_shape", "problem"),
    [
        ([0, 1], (3, 28, 28), "{images} holds 3 images but {labels} holds 2 labels"),
        ([0, 1, 10], (3, 28, 28), "{labels}: label 10 out of range, must be below 10"),
        ([0, 1, 2], (3, 28, 27), "{images}: expected uint8 [N, 28, 28] images, not torch.uint8 [3, 28, 27]"),
    ],
    ids=["count-mismatch", "label-out-of-range", "wrong-image-shape"],
)
def test_load_rejects_files_that_are_not_a_data_set(train_labels, train_shape, problem, monkeypatch, cache, tmp_path):
    files = tiny_files(train_labels, train_shape)
    publish(monkeypatch, files)

    with pytest.raises(IDXFormatError) as error:
        load("tiny", cache, [make_mirror(tmp_path / "mirror", files)])

    images, labels = cache / "tiny" / "train-images-idx3-ubyte", cache / "tiny" / "train-labels-idx1-ubyte"
    assert str(error.value) == problem.format(images=images, labels=labels)


# prepare


def synthetic(train: int = 100, test: int = 20) -> RawDataset:
    """Image i holds (i + k) % 256 at pixel k: its first pixel tells which image it is, and all grey levels occur."""

    def images(count: int) -> torch.Tensor:
        return ((torch.arange(count)[:, None] + torch.arange(784)) % 256).to(torch.uint8).reshape(count, 28, 28)

    return RawDataset(
        name="tiny",
        train_images=images(train),
        train_labels=torch.arange(train) % 10,
        test_images=images(test),
        test_labels=torch.arange(test) % 10,
        digest="0" * 64,
        class_names=tuple("0123456789"),
    )


def image_ids(images: ImageSet) -> list[int]:
    """Which images of :func:`synthetic` a set prepared with binarization "none" holds, in order."""
    return (images.pixels[:, 0, 0, 0] * 255).round().long().tolist()


def is_binary(pixels: torch.Tensor) -> bool:
    return bool(((pixels == 0) | (pixels == 1)).all())


def test_prepare_splits_a_validation_set_off_the_training_set():
    prepared = prepare(synthetic(), validation_size=30, binarization="none")

    train, validation = image_ids(prepared.train), image_ids(prepared.validation)
    assert (len(train), len(validation), len(prepared.test)) == (70, 30, 20)
    assert sorted(train + validation) == list(range(100))
    assert prepared.train.labels.tolist() == [i % 10 for i in train]
    assert image_ids(prepared.test) == list(range(20))
    assert prepared.class_names == tuple("0123456789")


def test_split_is_the_same_for_a_seed_and_differs_for_another():
    def validation_ids(seed: int) -> list[int]:
        return image_ids(prepare(synthetic(), validation_size=30, split_seed=seed, binarization="none").validation)

    assert validation_ids(0) == validation_ids(0)
    assert validation_ids(0) != validation_ids(1)


def test_validation_size_zero_gives_no_validation_set_and_every_training_image():
    prepared = prepare(synthetic(), validation_size=0, binarization="none")

    assert prepared.validation is None
    assert sorted(image_ids(prepared.train)) == list(range(100))


@pytest.mark.parametrize("validation_size", [-1, 100])
def test_validation_size_outside_the_training_set_is_rejected(validation_size):
    with pytest.raises(ValueError) as error:
        prepare(synthetic(), validation_size=validation_size)

    assert str(error.value) == f"validation_size must be in [0, 100) for tiny, got {validation_size}"


def test_train_subset_keeps_the_first_images_of_the_split_training_set():
    full = prepare(synthetic(), validation_size=30, binarization="none")
    subset = prepare(synthetic(), validation_size=30, binarization="none", train_subset=10)

    assert image_ids(subset.train) == image_ids(full.train)[:10]
    assert image_ids(subset.validation) == image_ids(full.validation)


@pytest.mark.parametrize("train_subset", [0, 71])
def test_train_subset_outside_the_training_set_is_rejected(train_subset):
    with pytest.raises(ValueError) as error:
        prepare(synthetic(), validation_size=30, train_subset=train_subset)

    assert str(error.value) == f"train_subset must be in [1, 70] for tiny with validation_size=30, got {train_subset}"


def test_training_on_the_test_images_appends_them_after_the_training_images_and_keeps_the_test_set():
    held_out = prepare(synthetic(), validation_size=30, binarization="none")
    both = prepare(synthetic(), validation_size=30, binarization="none", train_on_test=True)

    assert image_ids(both.train) == image_ids(held_out.train) + list(range(20))  # the 20 test images, in file order
    assert torch.equal(both.train.labels[70:], synthetic().test_labels)
    assert torch.equal(both.test.pixels, held_out.test.pixels)
    assert image_ids(both.validation) == image_ids(held_out.validation)


def test_train_subset_with_the_test_images_may_reach_into_them_and_names_its_limit():
    assert len(prepare(synthetic(), validation_size=30, train_on_test=True, train_subset=80).train) == 80
    with pytest.raises(ValueError) as error:
        prepare(synthetic(), validation_size=30, train_on_test=True, train_subset=91)

    assert str(error.value) == "train_subset must be in [1, 90] for tiny with validation_size=30 and the test images, got 91"


def test_no_binarization_keeps_grey_levels_in_0_1():
    prepared = prepare(synthetic(), validation_size=0, binarization="none")

    assert torch.equal(prepared.test.pixels, synthetic().test_images.float().unsqueeze(1) / 255)
    assert not prepared.train.resample


def test_threshold_binarization_keeps_pixels_at_or_above_one_half():
    grey = prepare(synthetic(), validation_size=30, binarization="none")
    binary = prepare(synthetic(), validation_size=30, binarization="threshold")

    for name in ("train", "validation", "test"):
        assert torch.equal(getattr(binary, name).pixels, (getattr(grey, name).pixels >= 0.5).float())
    assert binary.test.pixels[0].flatten()[127:129].tolist() == [0.0, 1.0]  # grey levels 127 and 128 of 255


def test_static_binarization_draws_binary_pixels_once_and_the_same_every_time():
    first = prepare(synthetic(), validation_size=30, binarization="static")
    second = prepare(synthetic(), validation_size=30, binarization="static")
    other_seed = prepare(synthetic(), validation_size=30, binarization="static", binarization_seed=1)

    for name in ("train", "validation", "test"):
        images = getattr(first, name)
        assert is_binary(images.pixels) and not images.resample
        assert torch.equal(images.pixels, getattr(second, name).pixels)
        assert not torch.equal(images.pixels, getattr(other_seed, name).pixels)


def test_dynamic_binarization_resamples_training_batches_but_fixes_validation_and_test():
    first = prepare(synthetic(), validation_size=30, binarization="dynamic")
    second = prepare(synthetic(), validation_size=30, binarization="dynamic")
    grey = prepare(synthetic(), validation_size=30, binarization="none")

    assert first.train.resample and torch.equal(first.train.pixels, grey.train.pixels)
    batch_1, batch_2 = first.train.batch(slice(None)), first.train.batch(slice(None))
    assert is_binary(batch_1) and not torch.equal(batch_1, batch_2)
    for name in ("validation", "test"):
        images = getattr(first, name)
        assert is_binary(images.pixels) and not images.resample
        assert torch.equal(images.pixels, getattr(second, name).pixels)


# The real data sets, from the offline mirror

REAL = {
    "mnist": (
        "09d9c50106a93c14b1c99b45352fb39f965a05109c94a632c226bc377bfa50e7",
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
    ),
    "fashion-mnist": ("daf9de4cf12669ecda2c289b235db8654ca1a41e08fab265b0fc64c56f960be8", [6000] * 10, [1000] * 10),
}


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@needs_data
@pytest.mark.parametrize("dataset", list(REAL))
def test_load_real_data_set_from_its_sources_then_from_the_cache(dataset, real_cache):
    digest, train_counts, test_counts = REAL[dataset]

    raw = load(dataset, real_cache)

    assert (raw.train_images.shape, raw.train_images.dtype) == ((60000, 28, 28), torch.uint8)
    assert (raw.test_images.shape, raw.test_images.dtype) == ((10000, 28, 28), torch.uint8)
    assert raw.train_labels.dtype == raw.test_labels.dtype == torch.int64
    assert raw.train_labels.bincount().tolist() == train_counts
    assert raw.test_labels.bincount().tolist() == test_counts
    assert (raw.digest, raw.class_names) == (digest, DATASETS[dataset].class_names)
    cached = load(dataset, real_cache, mirrors=[])
    assert cached.digest == digest and torch.equal(cached.train_images, raw.train_images)
    files = fetch(dataset, real_cache, mirrors=[])
    assert {name: path.stat().st_size for name, path in files.items()} == DATASETS[dataset].sizes
