"""Specification of the model files: safetensors weights and a JSON config load back exactly, and nothing else loads."""

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import Payload
from vae.config import ModelConfig
from vae.export import CONFIG_FILE, FORMAT, MAX_CONFIG_BYTES, WEIGHTS_FILE, ModelFileError, load, read_config, save
from vae.models import build_model

MLP = ModelConfig(hidden_dims=(32, 16), latent_dim=3)
CONV = ModelConfig(architecture="conv", latent_dim=2, conv_dense_dim=16, decoder_projection="transposed_conv")


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    save(build_model(MLP, seed=0), MLP, tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("config", [MLP, CONV], ids=["mlp", "conv"])
def test_a_saved_model_loads_back_with_the_same_weights_in_eval_mode(config, tmp_path):
    model = build_model(config, seed=0)

    save(model, config, tmp_path)
    loaded = load(tmp_path)

    assert sorted(path.name for path in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert not loaded.training and (loaded.latent_dim, loaded.image_shape) == (config.latent_dim, (1, 28, 28))
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    z = torch.randn(2, config.latent_dim, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.decode(z), model.decode(z))


def test_the_config_file_is_the_model_config_as_json_with_the_format(saved):
    assert json.loads((saved / CONFIG_FILE).read_text()) == {"format": FORMAT, "model": MLP.model_dump(mode="json")}
    assert read_config(saved / CONFIG_FILE) == MLP


def test_saving_a_model_with_another_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^the model does not match its config: missing tensors \[\], unexpected"):
        save(build_model(MLP), ModelConfig(hidden_dims=(32,), latent_dim=3), tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "problem"), [(WEIGHTS_FILE, r"not a safetensors file \(.*header"), (CONFIG_FILE, "not JSON ")], ids=["weights", "config"]
)
def test_a_pickle_in_place_of_either_file_is_refused_and_never_unpickled(saved, tmp_path, name, problem):
    marker = tmp_path / "payload-ran"
    (saved / name).write_bytes(pickle.dumps(Payload(marker)))

    with pytest.raises(ModelFileError, match=rf"^{saved / name}: {problem}"):
        load(saved)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ({**MLP.model_dump(mode="json"), "latent_dim": 1_000_000}, "latent_dim: Input should be less than or equal to 1024 (got 1000000)"),
        ({**MLP.model_dump(mode="json"), "hidden_dims": [32, -1]}, "hidden_dims.1: Input should be greater than 0 (got -1)"),
        ({**MLP.model_dump(mode="json"), "architecture": "transformer"}, "architecture: Input should be 'mlp' or 'conv'"),
        ({**MLP.model_dump(mode="json"), "loader": "os.system"}, "loader: Extra inputs are not permitted"),
    ],
    ids=["huge", "negative", "unknown-architecture", "extra-field"],
)
def test_a_config_with_bad_values_is_refused_naming_the_field_before_anything_is_built(saved, model, problem):
    (saved / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "model": model}))

    with pytest.raises(ModelFileError) as error:
        load(saved)

    assert str(error.value).startswith(f"{saved / CONFIG_FILE}: invalid model config:\n  {problem}")


@pytest.mark.parametrize(
    "content",
    [json.dumps({"model": MLP.model_dump(mode="json")}), json.dumps([1, 2]), json.dumps({"format": FORMAT, "model": 3})],
    ids=["no-format", "not-an-object", "model-not-an-object"],
)
def test_a_config_not_of_the_format_is_refused(saved, content):
    (saved / CONFIG_FILE).write_text(content)

    with pytest.raises(ModelFileError, match=rf"^{saved / CONFIG_FILE}: not a model config of format 'vae-pipeline/1'"):
        load(saved)


def test_an_oversized_config_is_refused_unread(saved):
    (saved / CONFIG_FILE).write_text(" " * MAX_CONFIG_BYTES + "{}")

    with pytest.raises(ModelFileError, match=rf"^{saved / CONFIG_FILE}: 65,538 bytes, more than a model config's 65,536$"):
        load(saved)


def test_weights_larger_than_the_configs_network_can_take_are_refused_unread(saved):
    weights = saved / WEIGHTS_FILE
    size = weights.stat().st_size
    with open(weights, "ab") as file:
        file.write(bytes(1 << 20))

    with pytest.raises(ModelFileError, match=rf"^{weights}: {size + (1 << 20):,} bytes, more than the .* its config's network can take$"):
        load(saved)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda w: w.pop("decoder.0.bias"), r"missing tensors \['decoder.0.bias'\], unexpected tensors \[\]"),
        (lambda w: w.update(extra=torch.zeros(1)), r"missing tensors \[\], unexpected tensors \['extra'\]"),
        (lambda w: w.update({"encoder.1.bias": torch.zeros(33)}), r"encoder.1.bias is torch.float32 \[33\], expected torch.float32 \[32\]"),
        (lambda w: w.update({"encoder.1.bias": torch.zeros(32, dtype=torch.float64)}), r"encoder.1.bias is torch.float64 \[32\], expected torch.float32 \[32\]"),
    ],
    ids=["missing", "unexpected", "shape", "dtype"],
)
def test_weights_that_do_not_fit_the_configs_network_are_refused_naming_the_tensor(saved, change, problem):
    weights = build_model(MLP).state_dict()
    change(weights)
    save_file(weights, saved / WEIGHTS_FILE)

    with pytest.raises(ModelFileError, match=rf"^{saved / WEIGHTS_FILE}: the weights do not fit the network of {CONFIG_FILE}: {problem}$"):
        load(saved)


def test_a_safetensors_header_claiming_more_bytes_than_the_file_has_is_refused(saved):
    (saved / WEIGHTS_FILE).write_bytes(struct.pack("<Q", 1 << 40) + b"{}")

    with pytest.raises(ModelFileError, match=rf"^{saved / WEIGHTS_FILE}: not a safetensors file"):
        load(saved)


def test_missing_files_are_named(saved):
    (saved / WEIGHTS_FILE).unlink()

    with pytest.raises(ModelFileError, match=rf"^{saved / WEIGHTS_FILE}: missing$"):
        load(saved)
