"""Specification of the run config: presets, overrides, and bad values rejected by name before any work."""

import json
import typing

import pytest
from pydantic import BaseModel

from pipeline.config import (
    PRESETS, ConfigError, RunConfig, classifier_name, comparability_changes, comparable_on, load_config, parse_override,
    training_image_count,
)
from vae.engine import steps_per_epoch


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


@pytest.mark.parametrize(
    ("preset", "images", "steps", "shuffle", "epochs", "padding"),
    [
        ("tf-fashion-mlp", 60_000, 118, True, 100, "pytorch"),  # tf.data keeps the last partial batch
        ("vae-tutorial-mlp", 55_000, 859, True, 117, "pytorch"),  # the TF loader's 55k, full batches: 100,503 steps
        ("keras-conv-fashion", 70_000, 1094, True, 100, "tensorflow"),  # train + test, as the Keras example prints
        ("tf-cvae-mnist", 60_000, 600, True, 100, "tensorflow"),
        ("matlab-conv-mnist", 60_000, 117, False, 50, "matlab"),  # floor(60000 / 512), the same batches every epoch
    ],
)
def test_tutorial_presets_take_their_tutorials_images_steps_per_epoch_and_length(preset, images, steps, shuffle, epochs, padding):
    config = load_config(preset)
    assert training_image_count(config.data) == images
    assert steps_per_epoch(images, config.train) == steps
    assert (config.train.shuffle, config.train.epochs, config.model.padding_convention) == (shuffle, epochs, padding)


def test_the_keras_preset_weighs_its_kl_by_one_over_its_latent_dimensions_as_the_examples_mean_over_them_does():
    config = load_config("keras-conv-fashion")
    assert (config.objective.beta, config.model.latent_dim) == (0.5, 2)
    assert {preset for preset in PRESETS if load_config(preset).objective.beta != 1.0} == {"keras-conv-fashion"}


def test_each_preset_sizes_its_pictures_as_its_tutorial_shows_them():
    sizes = {preset: load_config(preset).pictures for preset in PRESETS}
    # (samples, manifold n, first reconstructions): A a 10x10 sample grid and 50 test images above their 50
    # reconstructions, B and D a 4x4 grid, C a 10x10 manifold, E a grid of 25
    assert {preset: (p.samples, p.manifold_size, p.first_reconstructions) for preset, p in sizes.items()} == {
        "default": (16, 15, 0), "tf-fashion-mlp": (100, 15, 50), "vae-tutorial-mlp": (16, 15, 0),
        "keras-conv-fashion": (16, 10, 0), "tf-cvae-mnist": (16, 15, 0), "matlab-conv-mnist": (25, 15, 0),
        "hvae-vampprior": (16, 15, 0),
    }


def test_tensorflow_and_keras_presets_use_keras_epsilon_and_the_others_their_frameworks_default():
    epsilons = {preset: load_config(preset).train.epsilon for preset in PRESETS}
    assert epsilons == {
        "default": None, "tf-fashion-mlp": 1e-7, "vae-tutorial-mlp": None, "keras-conv-fashion": None,
        "tf-cvae-mnist": 1e-7, "matlab-conv-mnist": None, "hvae-vampprior": None,
    }  # None: Adam's 1e-8 (TF1 and MATLAB use it too), Keras RMSprop's 1e-7


def test_training_on_the_test_images_adds_them_to_the_count_and_to_the_subset_limit():
    config = load_config("default", {"data.training_images": "train+test", "data.train_subset": 55_000})
    assert training_image_count(config.data) == 55_000
    assert training_image_count(load_config("keras-conv-fashion").data) == 70_000
    with pytest.raises(ConfigError, match=r"data.train_subset \(65000\) exceeds the 60000 training images"):
        load_config("default", {"data.training_images": "train+test", "data.train_subset": 65_000})


def test_dropping_the_last_batch_with_fewer_images_than_a_batch_is_refused_before_any_work():
    with pytest.raises(ConfigError, match=r"train.drop_last leaves no step: 256 training images are fewer than train.batch_size \(512\)"):
        load_config("matlab-conv-mnist", {"data.train_subset": 256})


@pytest.mark.parametrize(("field", "value"), [("pictures.samples", 0), ("pictures.manifold_size", 1), ("tutorial.metric", "keras"), ("data.training_images", "test"), ("model.padding_convention", "keras"), ("train.epsilon", 0), ("train.optimizer", "sgd")])
def test_new_tutorial_settings_reject_bad_values_by_name(field, value):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("default", {field: value})


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
        ({"model.hidden_dims": [400, 0]}, "model.hidden_dims.1: Input should be greater than 0 (got 0)"),
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


FLOAT_FIELDS = [
    "objective.gaussian_std", "objective.beta", "objective.kl_warmup_epochs", "train.learning_rate", "train.epsilon",
    "train.grad_clip_norm", "train.lr_warmup_epochs", "train.lr_final_fraction", "train.max_minutes",
    "classifier.dropout", "classifier.learning_rate", "registry.promotion_margin_nats",
]


@pytest.mark.parametrize("text", ["Infinity", "-Infinity", "NaN"])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_infinity_and_nan_are_refused_in_every_float_field_by_name(field, text):
    override = dict([parse_override(f"{field}={text}")])  # as --set types it: JSON reads these three as floats

    with pytest.raises(ConfigError) as error:
        load_config("default", override)

    got = {"Infinity": "inf", "-Infinity": "-inf", "NaN": "nan"}[text]
    assert str(error.value) == f"invalid config:\n  {field}: Input should be a finite number (got {got})"


def test_every_float_field_of_the_config_is_in_the_list_of_float_fields():
    def floats(model, prefix=""):
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                yield from floats(annotation, f"{prefix}{name}.")
            elif float in (annotation, *typing.get_args(annotation)):
                yield f"{prefix}{name}"

    assert sorted(floats(RunConfig)) == sorted(FLOAT_FIELDS)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model.latent_dim", 1025, "Input should be less than or equal to 1024"),
        ("model.hidden_dims", [400, 4097], "Input should be less than or equal to 4096"),
        ("model.hidden_dims", [64] * 9, "Tuple should have at most 8 items after validation, not 9"),
        ("model.image_shape", [1, 28, 65], "Input should be less than or equal to 64"),
        ("model.conv_channels", [32, 1025], "Input should be less than or equal to 1024"),
        ("model.conv_dense_dim", 4097, "Input should be less than or equal to 4096"),
        ("model.decoder_start_channels", 1025, "Input should be less than or equal to 1024"),
        ("objective.beta", 1000.5, "Input should be less than or equal to 1000"),
        ("objective.kl_warmup_epochs", 10_001, "Input should be less than or equal to 10000"),
        ("train.epochs", 10_001, "Input should be less than or equal to 10000"),
        ("train.batch_size", 65_537, "Input should be less than or equal to 65536"),
        ("train.early_stopping_patience", 10_001, "Input should be less than or equal to 10000"),
        ("train.seed", 2**32, "Input should be less than 4294967296"),
        ("train.seed", -1, "Input should be greater than or equal to 0"),
        ("eval.iwae_samples", 100_001, "Input should be less than or equal to 100000"),
        ("eval.batch_size", 65_537, "Input should be less than or equal to 65536"),
        ("data.split_seed", 2**32, "Input should be less than 4294967296"),
        ("registry.promotion_margin_nats", 1e7, "Input should be less than or equal to 1000000"),
    ],
)
def test_sizes_and_counts_have_upper_bounds_and_a_value_past_one_is_refused_by_name(field, value, message):
    with pytest.raises(ConfigError) as error:
        load_config("default", {field: value})

    (problem,) = str(error.value).splitlines()[1:]
    assert problem.strip().startswith(field) and message in problem, problem


def test_every_preset_is_within_the_bounds():
    for preset in PRESETS:
        assert load_config(preset).preset == preset


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


def test_registered_models_are_one_per_comparable_family_of_data_set_binarization_likelihood_and_held_out_test():
    assert {preset: load_config(preset).model_name for preset in PRESETS} == {
        "default": "vae-mnist",
        "tf-fashion-mlp": "vae-fashion-mnist-grayscale",
        "vae-tutorial-mlp": "vae-mnist-grayscale",
        "keras-conv-fashion": "vae-fashion-mnist-grayscale-train-test",  # trained on the test images
        "tf-cvae-mnist": "vae-mnist-threshold",
        "matlab-conv-mnist": "vae-mnist-grayscale-gaussian", "hvae-vampprior": "vae-mnist",
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


def test_training_on_the_test_images_makes_test_numbers_incomparable_with_held_out_ones():
    held_out, trained_on = load_config("tf-fashion-mlp"), load_config("tf-fashion-mlp", {"data.training_images": "train+test"})
    assert "data.training_images" not in comparable_on(held_out)  # as records made before the setting existed
    assert comparability_changes(comparable_on(trained_on), comparable_on(held_out)) == [
        "data.training_images: 'train' -> 'train+test'",
    ]


def test_what_makes_two_runs_incomparable_is_named_field_by_field():
    ours = comparable_on(load_config("default", {"eval.iwae_samples": 5000, "data.binarization_seed": 1}))
    assert comparability_changes(ours, comparable_on(load_config("default"))) == [
        "data.binarization_seed: 0 -> 1", "eval.iwae_samples: 1000 -> 5000",
    ]
    assert comparability_changes(ours, ours) == []


def test_the_classifier_of_a_data_set_has_one_name_for_its_registered_model_and_its_runs():
    assert classifier_name("mnist") == "classifier-mnist"
    assert classifier_name("fashion-mnist") == "classifier-fashion-mnist"


def test_fid_is_on_by_default_with_ten_thousand_samples_and_a_bad_classifier_recipe_is_named():
    config = load_config("default")
    assert (config.eval.fid, config.eval.fid_samples) == (True, 10_000)
    with pytest.raises(ConfigError, match=r"classifier.conv_channels.0: Input should be greater than 0 \(got 0\)"):
        load_config("default", {"classifier.conv_channels": [0, 8]})
    with pytest.raises(ConfigError, match=r"eval.fid_samples: Input should be greater than or equal to 2 \(got 1\)"):
        load_config("default", {"eval.fid_samples": 1})
