"""Specification of the run config: presets, overrides, and bad values rejected by name before any work."""

import json

import pytest

from pipeline.config import PRESETS, ConfigError, RunConfig, comparability_changes, comparable_on, load_config, parse_override


def test_default_config_is_the_pytorch_examples_mlp_on_dynamically_binarized_mnist():
    config = load_config()
    assert config.preset == "default"
    assert (config.data.dataset, config.data.binarization, config.data.validation_size) == ("mnist", "dynamic", 10_000)
    assert (config.model.architecture, config.model.hidden_dims, config.model.latent_dim) == ("mlp", (400,), 20)
    assert (config.train.optimizer, config.train.learning_rate, config.train.batch_size) == ("adam", 1e-3, 128)


@pytest.mark.parametrize(
    ("preset", "dataset", "binarization", "architecture", "latent", "optimizer", "lr", "batch", "likelihood", "kl"),
    [
        ("tf-fashion-mlp", "fashion-mnist", "none", "mlp", 10, "adam", 1e-3, 512, "bernoulli", "analytic"),
        ("vae-tutorial-mlp", "mnist", "none", "mlp", 100, "adam", 1e-3, 64, "bernoulli", "analytic"),
        ("keras-conv-fashion", "fashion-mnist", "none", "conv", 2, "rmsprop", 1e-3, 64, "bernoulli", "analytic"),
        ("tf-cvae-mnist", "mnist", "threshold", "conv", 50, "adam", 1e-4, 100, "bernoulli", "monte_carlo"),
        ("matlab-conv-mnist", "mnist", "none", "conv", 20, "adam", 1e-3, 512, "gaussian", "analytic"),
    ],
)
def test_each_seed_tutorial_has_a_preset_with_its_setup(preset, dataset, binarization, architecture, latent, optimizer, lr, batch, likelihood, kl):
    config = load_config(preset)
    assert (config.data.dataset, config.data.binarization) == (dataset, binarization)
    assert (config.model.architecture, config.model.latent_dim) == (architecture, latent)
    assert (config.train.optimizer, config.train.learning_rate, config.train.batch_size) == (optimizer, lr, batch)
    assert (config.objective.likelihood, config.objective.kl) == (likelihood, kl)


def test_overrides_use_dotted_names_and_typed_values():
    config = load_config("default", dict([parse_override("train.epochs=3"), parse_override("model.hidden_dims=[64, 32]"), parse_override("data.dataset=fashion-mnist")]))
    assert (config.train.epochs, config.model.hidden_dims, config.data.dataset) == (3, (64, 32), "fashion-mnist")


def test_a_config_file_is_applied_between_the_preset_and_the_overrides(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text('[train]\nepochs = 7\nlearning_rate = 0.01\n[model]\nlatent_dim = 2\n')
    config = load_config("default", {"train.epochs": 2}, file=file)
    assert (config.train.epochs, config.train.learning_rate, config.model.latent_dim, config.model.hidden_dims) == (2, 0.01, 2, (400,))
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"data": {"binarization": "static"}}))
    assert load_config("default", file=json_file).data.binarization == "static"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"data.dataset": "cifar10"}, "data.dataset: Input should be 'mnist' or 'fashion-mnist' (got 'cifar10')"),
        ({"model.latent_dim": 0}, "model.latent_dim: Input should be greater than 0 (got 0)"),
        ({"train.learning_rate": -0.1}, "train.learning_rate: Input should be greater than 0 (got -0.1)"),
        ({"data.binarization": "otsu"}, "data.binarization: Input should be 'dynamic', 'static', 'threshold' or 'none' (got 'otsu')"),
        ({"train.batch_size": "many"}, "train.batch_size: Input should be a valid integer"),
        ({"train.epochs": 0}, "train.epochs: Input should be greater than 0 (got 0)"),
        ({"train.device": "tpu"}, "device must be auto, cpu, cuda[:N] or mps, got 'tpu'"),
        ({"train.learnign_rate": 0.1}, "train.learnign_rate: Extra inputs are not permitted"),
        ({"model.hidden_dims": [400, 0]}, "hidden_dims must hold positive widths"),
        ({"data.validation_size": 60_000}, "data.validation_size: Input should be less than 60000"),
        ({"data.validation_size": 0, "train.early_stopping_patience": 2}, "early_stopping_patience needs a validation set"),
        ({"data.train_subset": 55_000}, "data.train_subset (55000) exceeds the 50000 training images"),
        ({"model.prior": "vamp"}, "objective.kl='analytic' has no closed form with model.prior='vamp': set objective.kl='monte_carlo' or objective.bound='iwae'"),
        ({"model.stochastic_layers": 2}, "objective.kl='analytic' has no closed form with model.stochastic_layers=2"),
        ({"objective.samples": 5}, "samples=5 needs bound='iwae'"),
        ({"model.prior": "mixture"}, "model.prior: Input should be 'standard_normal' or 'vamp' (got 'mixture')"),
        ({"train.lr_final_fraction": 2}, "train.lr_final_fraction: Input should be less than or equal to 1 (got 2)"),
        ({"train.max_minutes": 0}, "train.max_minutes: Input should be greater than 0 (got 0)"),
    ],
)
def test_a_bad_value_is_rejected_naming_the_field(override, named):
    with pytest.raises(ConfigError) as error:
        load_config("default", override)
    assert named in str(error.value)


def test_every_bad_field_is_named_at_once():
    with pytest.raises(ConfigError) as error:
        load_config("default", {"model.latent_dim": -1, "train.learning_rate": 0})
    assert "model.latent_dim" in str(error.value) and "train.learning_rate" in str(error.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; choose one of: default, tf-fashion-mlp"):
        load_config("nope")


def test_malformed_override_and_unreadable_file_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="not of the form section.field=value"):
        parse_override("epochs")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="bad.toml: cannot read config file"):
        load_config(file=bad)


def test_config_round_trips_through_json():
    for preset in PRESETS:
        config = load_config(preset)
        assert RunConfig.model_validate_json(config.model_dump_json()) == config


def test_each_data_set_has_one_experiment():
    assert load_config("default").experiment_name == "vae-mnist"
    assert load_config("tf-fashion-mlp").experiment_name == "vae-fashion-mnist"


def test_registered_models_are_one_per_comparable_family_of_data_set_binarization_and_likelihood():
    assert {preset: load_config(preset).model_name for preset in PRESETS} == {
        "default": "vae-mnist",
        "tf-fashion-mlp": "vae-fashion-mnist-grayscale",
        "vae-tutorial-mlp": "vae-mnist-grayscale",
        "keras-conv-fashion": "vae-fashion-mnist-grayscale",
        "tf-cvae-mnist": "vae-mnist-threshold",
        "matlab-conv-mnist": "vae-mnist-grayscale-gaussian",
    }
    assert load_config("default", {"data.dataset": "fashion-mnist"}).model_name == "vae-fashion-mnist"
    assert load_config("default", {"data.binarization": "static"}).model_name == "vae-mnist-static"


def test_test_numbers_compare_on_the_test_images_the_likelihood_and_the_iwae_samples():
    assert comparable_on(load_config("default")) == {
        "data.dataset": "mnist", "data.binarization": "dynamic", "data.binarization_seed": 0,
        "objective.likelihood": "bernoulli", "objective.gaussian_std": 1.0, "eval.iwae_samples": 1000, "eval.seed": 0,
    }
    # what training does is not what the score measures
    assert comparable_on(load_config("default", {"train.epochs": 3, "model.latent_dim": 2})) == comparable_on(load_config("default"))


def test_what_makes_two_runs_incomparable_is_named_field_by_field():
    ours = comparable_on(load_config("default", {"eval.iwae_samples": 5000, "data.binarization_seed": 1}))
    assert comparability_changes(ours, comparable_on(load_config("default"))) == [
        "data.binarization_seed: 0 -> 1", "eval.iwae_samples: 1000 -> 5000",
    ]
    assert comparability_changes(ours, ours) == []
