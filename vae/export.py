"""A trained VAE as two plain files, its weights in safetensors and its ModelConfig in JSON; loading rebuilds the
network from this library's code and never unpickles anything, so a model file cannot carry code."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from vae.config import ModelConfig, field_errors
from vae.models import VAE, HierarchicalVAE, build_model

FORMAT = "vae-pipeline/1"
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "model_config.json"
MAX_CONFIG_BYTES = 64 << 10
# Beyond the tensors' own bytes, a safetensors file holds a JSON header: names, shapes and offsets, a few KB here.
MAX_HEADER_BYTES = 1 << 20


class ModelFileError(ValueError):
    """Files that are not a model this library saved, or were altered; the message names the file and the problem."""


def save(model: VAE | HierarchicalVAE, config: ModelConfig, directory: Path | str) -> None:
    """Write ``model``'s weights (``weights.safetensors``) and ``config`` (``model_config.json``) into ``directory``.

    ``config`` must be the one ``model`` was built from: :func:`load` rebuilds the network from it.
    """
    directory = Path(directory)
    weights = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    problem = _mismatch(weights, _skeleton(config).state_dict())
    if problem:
        raise ValueError(f"the model does not match its config: {problem}")
    directory.mkdir(parents=True, exist_ok=True)
    save_file(weights, directory / WEIGHTS_FILE, metadata={"format": FORMAT})
    described = {"format": FORMAT, "model": config.model_dump(mode="json")}
    (directory / CONFIG_FILE).write_text(json.dumps(described, indent=2))


def load(directory: Path | str, *, device: torch.device | str = "cpu") -> VAE | HierarchicalVAE:
    """The VAE saved in ``directory`` by :func:`save`, in eval mode on ``device``.

    The config is validated (bounds included) before anything is built; the weights file may hold only the tensors
    the config's network has, with their exact names, shapes and dtypes. Anything else is a :class:`ModelFileError`
    that names the file.
    """
    directory = Path(directory)
    config = read_config(directory / CONFIG_FILE)
    model = _skeleton(config)
    expected = model.state_dict()
    path = directory / WEIGHTS_FILE
    limit = sum(tensor.numel() * tensor.element_size() for tensor in expected.values()) + MAX_HEADER_BYTES
    size = _size(path)
    if size > limit:
        raise ModelFileError(f"{path}: {size:,} bytes, more than the {limit:,} its config's network can take")
    try:
        weights = load_file(path, device="cpu")
    except SafetensorError as error:
        raise ModelFileError(f"{path}: not a safetensors file ({error})") from None
    problem = _mismatch(weights, expected)
    if problem:
        raise ModelFileError(f"{path}: the weights do not fit the network of {CONFIG_FILE}: {problem}")
    model.load_state_dict(weights, strict=True, assign=True)  # the loaded tensors replace the skeleton's
    return model.to(device).eval()


def read_config(path: Path | str) -> ModelConfig:
    """The validated :class:`ModelConfig` in a ``model_config.json`` written by :func:`save`."""
    path = Path(path)
    size = _size(path)
    if size > MAX_CONFIG_BYTES:
        raise ModelFileError(f"{path}: {size:,} bytes, more than a model config's {MAX_CONFIG_BYTES:,}")
    try:
        values = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path}: not JSON ({error})") from None
    if not isinstance(values, dict) or values.get("format") != FORMAT or not isinstance(values.get("model"), dict):
        raise ModelFileError(f'{path}: not a model config of format {FORMAT!r} ({{"format": ..., "model": {{...}}}})')
    try:
        return ModelConfig.model_validate(values["model"])
    except ValidationError as error:
        raise ModelFileError(f"{path}: invalid model config:\n  " + "\n  ".join(field_errors(error))) from None


def _skeleton(config: ModelConfig) -> VAE | HierarchicalVAE:
    """The network ``config`` describes, its tensors on the meta device: shapes and dtypes, no memory, no init."""
    with torch.device("meta"):
        return build_model(config)


def _mismatch(weights: dict[str, Tensor], expected: dict[str, Tensor]) -> str:
    """What differs between two sets of named tensors in names, shapes or dtypes ("" when nothing does)."""
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        return f"missing tensors {missing}, unexpected tensors {unexpected}"
    for name, tensor in expected.items():
        got = weights[name]
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            return f"{name} is {got.dtype} {list(got.shape)}, expected {tensor.dtype} {list(tensor.shape)}"
    return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise ModelFileError(f"{path}: missing") from None

