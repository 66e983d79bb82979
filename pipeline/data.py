"""Fetch MNIST and Fashion-MNIST from a mirror or their public hosts, verify and parse them, and split them."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import io
import math
import os
import struct
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from pipeline.config import DataConfig
from pipeline.redaction import redact
from vae.data import Binarization, ImageSet, binarize
from vae.progress import progress as progress_of

FILE_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10

GZIP_MAGIC = b"\x1f\x8b"
CHUNK_SIZE = 1 << 20
DOWNLOAD_DEADLINE_SECONDS = 600.0  # per file and attempt, on top of the per-read socket timeout
# The decompressed size of each published file (the same for both data sets: 60,000 and 10,000 images of 28x28).
IDX_SIZES = {
    "train-images-idx3-ubyte": 16 + 60_000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60_000,
    "t10k-images-idx3-ubyte": 16 + 10_000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10_000,
}
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(Exception):
    """A data set could not be fetched or read; the message names the file or the data set."""


class ChecksumError(DataError):
    """A file's decompressed bytes do not have the published SHA-256."""


class DownloadError(DataError):
    """Every source of a file failed; the message lists each source tried and why it failed."""


class IDXFormatError(DataError):
    """A file is not a well-formed IDX file, or does not hold the array its data set should."""


class DownloadLimitError(DataError):
    """A source sent more bytes than its file can take, or did not finish in time; reading it was stopped."""


# What can go wrong while reading a source besides a ChecksumError; each sends fetch on to the next source.
SOURCE_ERRORS = (OSError, EOFError, zlib.error, http.client.HTTPException)


@dataclass(frozen=True)
class DatasetSpec:
    """Where a data set is published, the SHA-256 and size in bytes of each of its decompressed files, and its class
    names."""

    name: str
    hosts: tuple[str, ...]
    sha256: dict[str, str]
    class_names: tuple[str, ...]
    sizes: dict[str, int]

    @property
    def digest(self) -> str:
        """One SHA-256 over the file hashes: the data set's content digest."""
        listing = "".join(f"{name} {sha256}\n" for name, sha256 in sorted(self.sha256.items()))
        return hashlib.sha256(listing.encode()).hexdigest()


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        hosts=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        sha256={
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        class_names=tuple("0123456789"),
        sizes=IDX_SIZES,
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        hosts=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        sha256={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        sizes=IDX_SIZES,
    ),
}


@dataclass(frozen=True, eq=False)
class RawDataset:
    """A data set's images (uint8 [N, 28, 28]) and labels (int64 [N]) as published, with its content digest."""

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    digest: str
    class_names: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class PreparedData:
    """The training, validation (None when there is none) and test image sets a model is fitted and judged on."""

    train: ImageSet
    validation: ImageSet | None
    test: ImageSet
    class_names: tuple[str, ...]
    name: str  # the data set's
    digest: str  # the published files' content digest (see RawDataset)


def default_cache_dir() -> Path:
    """$VAE_DATA_DIR if set, else $XDG_CACHE_HOME/vae-pipeline, else ~/.cache/vae-pipeline."""
    if directory := os.environ.get("VAE_DATA_DIR"):
        return Path(directory)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vae-pipeline"


def mirrors_from_env() -> list[str]:
    """The mirrors in $VAE_DATA_MIRROR (whitespace-separated local directories or http(s)/file URLs)."""
    return os.environ.get("VAE_DATA_MIRROR", "").split()


def fetch(
    dataset: str,
    cache_dir: Path | None = None,
    mirrors: Sequence[str] | None = None,
    *,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 0.5,
    deadline: float = DOWNLOAD_DEADLINE_SECONDS,
    progress: bool | None = None,
) -> dict[str, Path]:
    """Paths to the files of ``dataset``, decompressed and verified in ``<cache_dir>/<dataset>/``, fetched if need be.

    A cached file is re-hashed and fetched again (with a warning) if it has changed. Sources are tried in order: each
    mirror (``mirrors``, or $VAE_DATA_MIRROR when None), then the public hosts. HTTP(S) sources get ``retries`` attempts
    against network trouble and server errors, waiting ``backoff`` seconds, then twice that, and so on, in between.
    A mirror URL's user-info (``https://user:token@mirror/``) is sent as HTTP basic auth, and redacted in every message.

    Reading a source stops, and the next source is tried, as soon as it decompresses past the file's published size
    (a gzip bomb), sends more bytes than the file could take even stored uncompressed, or takes longer than
    ``deadline`` seconds; ``timeout`` bounds each network read. Nothing partial is left in the cache.

    Each file read from a source reports its decompressed bytes against the published size, under its name and the
    source's redacted address; ``progress`` as in :func:`vae.progress.progress` (a bar on a terminal, else a line
    every so often; False, as in a process of rank > 0, for nothing).
    """
    if retries < 1:
        raise ValueError(f"retries must be at least 1, got {retries}")
    spec = _spec(dataset)
    directory = Path(cache_dir or default_cache_dir()) / spec.name
    directory.mkdir(parents=True, exist_ok=True)
    mirrors = mirrors_from_env() if mirrors is None else list(mirrors)
    paths = {}
    for name, expected in spec.sha256.items():
        path = paths[name] = directory / name
        if path.exists():
            actual = _sha256_of(path)
            if actual == expected:
                continue
            warnings.warn(f"cached {path} has sha256 {actual}, expected {expected}; fetching it again", stacklevel=2)
        sources = [f"{mirror.rstrip('/')}/{spec.name}/{name}{suffix}" for mirror in mirrors for suffix in (".gz", "")]
        sources += [f"{host.rstrip('/')}/{name}.gz" for host in spec.hosts]
        limits = {"timeout": timeout, "retries": retries, "backoff": backoff, "deadline": deadline}
        _fetch_file(path, expected, spec.sizes[name], sources, **limits, progress=progress)
    return paths


def read_idx(path: Path) -> Tensor:
    """The array in an (uncompressed) IDX file, as a tensor of the file's data type and dimensions."""
    data = Path(path).read_bytes()
    if len(data) < 4:
        raise IDXFormatError(f"{path}: {len(data)} bytes, too short for the 4-byte IDX magic number")
    if data[:2] != b"\x00\x00":
        raise IDXFormatError(f"{path}: bad IDX magic number {data[:4].hex()}, must start with 0000 (still compressed?)")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{known:02X}" for known in IDX_DTYPES)
        raise IDXFormatError(f"{path}: unknown IDX data type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise IDXFormatError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(f"{path}: {len(data)} bytes, too short for the {header}-byte header of {ndim} dimensions")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[code]
    expected = header + math.prod(dims) * dtype.itemsize
    size = f"{len(data)} bytes, but dimensions {dims} of {dtype.name} need {expected}"
    if len(data) < expected:
        raise IDXFormatError(f"{path}: truncated: {size}")
    if len(data) > expected:
        raise IDXFormatError(f"{path}: {len(data) - expected} trailing bytes: {size}")
    array = np.frombuffer(data, dtype=dtype, offset=header).astype(dtype.newbyteorder("="))
    return torch.from_numpy(array.reshape(dims))


def load(dataset: str, cache_dir: Path | None = None, mirrors: Sequence[str] | None = None) -> RawDataset:
    """Fetch ``dataset`` (see :func:`fetch`) and read its training and test images and labels."""
    return read(dataset, fetch(dataset, cache_dir, mirrors))


def read(dataset: str, files: Mapping[str, Path]) -> RawDataset:
    """The data set in ``files`` (as :func:`fetch` returns them): training and test images and labels, validated."""
    spec = _spec(dataset)
    train_images, train_labels = _read_images_and_labels(files[FILE_NAMES[0]], files[FILE_NAMES[1]])
    test_images, test_labels = _read_images_and_labels(files[FILE_NAMES[2]], files[FILE_NAMES[3]])
    return RawDataset(spec.name, train_images, train_labels, test_images, test_labels, spec.digest, spec.class_names)


def prepare(
    raw: RawDataset,
    *,
    validation_size: int = 10_000,
    split_seed: int = 0,
    binarization: Binarization = "dynamic",
    binarization_seed: int = 0,
    train_subset: int | None = None,
    train_on_test: bool = False,
) -> PreparedData:
    """Split a validation set off the training set at random (with ``split_seed``) and binarize every set.

    With ``train_on_test`` the test images follow the remaining training images in the training set (the test set
    stays the test images, no longer held out). ``train_subset`` keeps the first images of that training set, whose
    training images are in random order. The training set is binarized with ``binarization_seed``; the validation and
    test sets with seeds one and two above it, and under "dynamic" binarization once and for all, so that their
    metrics compare across runs.
    """
    count = len(raw.train_images)
    if not 0 <= validation_size < count:
        raise ValueError(f"validation_size must be in [0, {count}) for {raw.name}, got {validation_size}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(split_seed))
    validation_index, train_index = order[:validation_size], order[validation_size:]
    train_images, train_labels = raw.train_images[train_index], raw.train_labels[train_index]
    if train_on_test:
        train_images, train_labels = torch.cat((train_images, raw.test_images)), torch.cat((train_labels, raw.test_labels))
    if train_subset is not None:
        if not 0 < train_subset <= len(train_images):
            test = " and the test images" if train_on_test else ""
            limit = f"[1, {len(train_images)}] for {raw.name} with validation_size={validation_size}{test}"
            raise ValueError(f"train_subset must be in {limit}, got {train_subset}")
        train_images, train_labels = train_images[:train_subset], train_labels[:train_subset]
    train = binarize(train_images, train_labels, binarization, binarization_seed)
    validation = None
    if validation_size:
        images, labels = raw.train_images[validation_index], raw.train_labels[validation_index]
        validation = binarize(images, labels, binarization, binarization_seed + 1).fixed(binarization_seed + 1)
    test = binarize(raw.test_images, raw.test_labels, binarization, binarization_seed + 2).fixed(binarization_seed + 2)
    return PreparedData(train, validation, test, raw.class_names, raw.name, raw.digest)


def prepare_configured(config: DataConfig, files: Mapping[str, Path]) -> PreparedData:
    """Read the fetched ``files`` of ``config.dataset`` and :func:`prepare` them as ``config`` says."""
    return prepare(
        read(config.dataset, files),
        validation_size=config.validation_size,
        split_seed=config.split_seed,
        binarization=config.binarization,
        binarization_seed=config.binarization_seed,
        train_subset=config.train_subset,
        train_on_test=config.training_images == "train+test",
    )


def _spec(dataset: str) -> DatasetSpec:
    try:
        return DATASETS[dataset]
    except KeyError:
        raise DataError(f"unknown data set {dataset!r}; expected one of: {', '.join(DATASETS)}") from None


def _sha256_of(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _fetch_file(
    path: Path,
    expected: str,
    size: int,
    sources: list[str],
    *,
    timeout: float,
    retries: int,
    backoff: float,
    deadline: float,
    progress: bool | None,
) -> None:
    """Put the first source whose decompressed bytes (``size`` of them) have sha256 ``expected`` at ``path``, else raise
    DownloadError.

    A source whose file has another hash is warned about when a later one serves the right file (the only sign of a
    tampered mirror then); when none does, the DownloadError says it, once.
    """
    failures = []
    mismatches = []
    for source in sources:
        attempts = retries if source.startswith(("http://", "https://")) else 1
        try:
            _copy_with_retries(
                source, path, expected, size,
                timeout=timeout, attempts=attempts, backoff=backoff, deadline=deadline, progress=progress,
            )
            for mismatch in mismatches:
                warnings.warn(redact(str(mismatch)), stacklevel=3)
            return
        except ChecksumError as error:
            mismatches.append(error)
            failures.append(f"  {redact(source)}: {redact(str(error))}")
        except DownloadLimitError as error:
            failures.append(f"  {redact(source)}: {redact(str(error))}")
        except SOURCE_ERRORS as error:
            tries = f" ({attempts} attempts)" if attempts > 1 and _is_transient(error) else ""
            failures.append(redact(f"  {source}: {type(error).__name__}: {error}{tries}"))
    listing = "\n".join(failures)
    raise DownloadError(
        f"could not fetch {path.name} into {path.parent} from any of {len(sources)} sources:\n{listing}\n"
        "Set VAE_DATA_MIRROR to a directory or URL holding <dataset>/<file>.gz, or check the network."
    )


def _copy_with_retries(
    source: str,
    path: Path,
    expected: str,
    size: int,
    *,
    timeout: float,
    attempts: int,
    backoff: float,
    deadline: float,
    progress: bool | None,
) -> None:
    """:func:`_copy_verified`, tried up to ``attempts`` times with exponential backoff while failures look transient."""
    for attempt in range(attempts):
        try:
            return _copy_verified(source, path, expected, size, timeout, deadline, progress)
        except (OSError, EOFError, http.client.HTTPException) as error:
            if attempt + 1 == attempts or not _is_transient(error):
                raise
            time.sleep(backoff * 2**attempt)


def _is_transient(error: Exception) -> bool:
    """Whether trying the same source again may help.

    Yes for network and server trouble and for a gzip stream cut off early; no for an HTTP 4xx other than 408 and 429.
    """
    if isinstance(error, urllib.error.HTTPError):
        return error.code in (408, 429) or error.code >= 500
    return isinstance(error, (OSError, EOFError, http.client.HTTPException))


def _copy_verified(
    source: str, path: Path, expected: str, size: int, timeout: float, deadline: float, progress: bool | None
) -> None:
    """Stream ``source`` (gzip or raw) to ``path`` through a temporary file, kept only if its sha256 is ``expected``.

    At most ``size`` + 1 decompressed bytes are read: one more than the file has is enough to refuse the source. The
    decompressed bytes are reported, a chunk at a time, as "<file> from <redacted source>" (see ``progress``).
    """
    described = f"{path.name} from {redact(source)}"
    report = progress_of(size, described, "B", enabled=progress, unit_scale=True)
    with _open(source, timeout) as raw, report as done:
        limited = _LimitedSource(raw, max_bytes=_source_byte_limit(size), seconds=deadline, described=described)
        stream = _gunzipped(io.BufferedReader(limited, buffer_size=64 << 10))
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            digest = hashlib.sha256()
            written = 0
            with os.fdopen(descriptor, "wb") as file:
                while chunk := stream.read(min(CHUNK_SIZE, size + 1 - written)):
                    written += len(chunk)
                    if written > size:
                        raise DownloadLimitError(
                            f"{described}: longer than the file's published {size:,} bytes once decompressed; "
                            "stopped reading there (a gzip bomb, or not this file)"
                        )
                    digest.update(chunk)
                    file.write(chunk)
                    done.update(len(chunk))
            actual = digest.hexdigest()
            if actual != expected:
                raise ChecksumError(f"{described}: decompressed sha256 is {actual}, expected {expected}")
            os.chmod(temporary, 0o644)  # mkstemp makes it private; a data cache may be shared
            os.replace(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)


def _source_byte_limit(size: int) -> int:
    """The most bytes a source of a ``size``-byte file may send: the file stored raw, or gzipped at worst (stored
    blocks add 5 bytes per 64 KiB; the header may hold a name and a comment)."""
    return size + size // 100 + (64 << 10)


class _LimitedSource(io.RawIOBase):
    """A source's bytes, each read at most one network read long, stopped past ``max_bytes`` or ``seconds`` after
    it was opened: a server that trickles a byte every few seconds never trips the socket timeout on its own."""

    def __init__(self, stream: BinaryIO, *, max_bytes: int, seconds: float, described: str):
        self._read = getattr(stream, "read1", stream.read)
        self.max_bytes, self.seconds, self.described = max_bytes, seconds, described
        self.deadline = time.monotonic() + seconds
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if time.monotonic() > self.deadline:
            raise DownloadLimitError(
                f"{self.described}: not done within the deadline of {self.seconds:g} s ({self.count:,} bytes read); "
                "stopped reading (a stalled or trickling source)"
            )
        data = self._read(min(len(buffer), self.max_bytes + 1 - self.count))
        self.count += len(data)
        if self.count > self.max_bytes:
            raise DownloadLimitError(
                f"{self.described}: sent more than {self.max_bytes:,} bytes, more than the file takes even stored "
                "uncompressed; stopped reading there"
            )
        buffer[: len(data)] = data
        return len(data)


def _open(source: str, timeout: float) -> BinaryIO:
    """The bytes at ``source``: a local path, or a URL read with ``timeout`` seconds per network operation."""
    return urllib.request.urlopen(_request(source), timeout=timeout) if "://" in source else open(source, "rb")


def _gunzipped(stream: io.BufferedReader) -> BinaryIO:
    """``stream`` gunzipped on the fly when it starts with the gzip magic, else as it is."""
    return gzip.GzipFile(fileobj=stream) if stream.peek(len(GZIP_MAGIC)).startswith(GZIP_MAGIC) else stream


def _request(url: str) -> urllib.request.Request:
    """A GET of ``url``, whose user-info, if any, goes as HTTP basic auth (urllib would take it for part of the host).

    The header is not redirected: a redirect to another host must not receive the credentials.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return urllib.request.Request(url)
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])))
    credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    request.add_unredirected_header("Authorization", f"Basic {base64.b64encode(credentials.encode()).decode()}")
    return request


def _read_images_and_labels(images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
    """Images (uint8 [N, 28, 28]) and labels (int64 [N], each below 10) read from a matching pair of IDX files."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        found = f"{images.dtype} {list(images.shape)}"
        raise IDXFormatError(f"{images_path}: expected uint8 [N, 28, 28] images, not {found}")
    if labels.dtype != torch.uint8 or labels.ndim != 1:
        raise IDXFormatError(f"{labels_path}: expected uint8 [N] labels, not {labels.dtype} {list(labels.shape)}")
    if len(images) != len(labels):
        raise IDXFormatError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise IDXFormatError(f"{labels_path}: label {labels.max().item()} out of range, must be below {NUM_CLASSES}")
    return images, labels.long()
