"""The run's one validated config (data, model, objective, training, evaluation), its presets and overrides."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vae.config import ClassifierConfig, EvalConfig, ModelConfig, ObjectiveConfig, Seed, TrainConfig, field_errors

TRAIN_IMAGES = 60_000  # both data sets
MAX_PROMOTION_MARGIN_NATS = 1e6
TEST_IMAGES = 10_000
MAX_GRID_PICTURES = 400  # a 20x20 grid
MAX_MANIFOLD_SIZE = 50
LOCAL_WORKERS = 2  # `flows.py sweep`: processes of the local Dask cluster, one trial at a time each
DEFAULT_RETRAINING_CRON = "0 3 * * 1"  # `flows.py serve`: Mondays at 03:00


class ConfigError(ValueError):
    """A config value is wrong; the message names each bad field."""


class DataConfig(BaseModel):
    """Which data set, how it is split and binarized, and where it is cached."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    dataset: Literal["mnist", "fashion-mnist"] = "mnist"
    binarization: Literal["dynamic", "static", "threshold", "none"] = "dynamic"
    validation_size: int = Field(10_000, ge=0, lt=TRAIN_IMAGES)
    split_seed: Seed = 0
    binarization_seed: Seed = 0
    # Keep only this many training images (quick runs, tests).
    train_subset: int | None = Field(None, gt=0, le=TRAIN_IMAGES + TEST_IMAGES)  # checked against the split below
    # "train+test": train on the test images too, as the Keras conv VAE example does (70k images). The test metrics
    # are then not held out: such a run never competes with held-out ones for champion.
    training_images: Literal["train", "train+test"] = "train"
    cache_dir: Path | None = None  # default: $VAE_DATA_DIR, else the user's cache directory


def training_image_count(data: DataConfig) -> int:
    """How many images a run with these data settings trains on (both data sets have 60k training, 10k test images)."""
    count = TRAIN_IMAGES - data.validation_size + (TEST_IMAGES if data.training_images == "train+test" else 0)
    return count if data.train_subset is None else min(count, data.train_subset)


class RegistryConfig(BaseModel):
    """Whether the trained model is registered, and by how much it must beat the champion to replace it."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = True
    promotion_margin_nats: float = Field(0.0, ge=0, le=MAX_PROMOTION_MARGIN_NATS)


# The figure each tutorial reports, logged per epoch under this name in the tutorial's own unit (pipeline/tutorials.py
# defines each): "tf_loss" (A: the epoch's mean of the batch loss, with tf_reconstruction_loss and tf_kl_loss),
# "tutorial_loss" (B: the same, as its "Loss" line), "keras_loss" (C: Keras' printed epoch loss, with
# keras_reconstruction_loss and keras_kl_loss), "tf_test_elbo" (D: the test set's one-sample ELBO) and
# "matlab_test_elbo_loss" (E: the test set's "ELBO loss", 0.5 * squared error + KL).
TutorialMetric = Literal["none", "tf_loss", "tutorial_loss", "keras_loss", "tf_test_elbo", "matlab_test_elbo_loss"]


class TutorialConfig(BaseModel):
    """Which tutorial's figure a run logs per epoch next to the nats, computed as that tutorial computes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: TutorialMetric = "none"


class PicturesConfig(BaseModel):
    """How many pictures a run's images hold, sized per preset to what its tutorial shows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Decoded from the same prior draws after every epoch, in the most nearly square grid: 16 is a 4x4 grid.
    samples: int = Field(16, gt=0, le=MAX_GRID_PICTURES)
    # The n of the n x n grid of z in [-2, 2]^2 that a 2-D latent's manifold (latent_manifold.png) decodes.
    manifold_size: int = Field(15, ge=2, le=MAX_MANIFOLD_SIZE)
    # Above 0: also the first N test images above their N reconstructions (first_reconstructions.png).
    first_reconstructions: int = Field(0, ge=0, le=MAX_GRID_PICTURES)


class RunConfig(BaseModel):
    """Everything a run needs; built from a preset plus overrides and checked before any work starts."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    preset: str = Field("default", max_length=100)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    classifier: ClassifierConfig = ClassifierConfig()  # the recipe of the data set's classifier, which FID uses
    registry: RegistryConfig = RegistryConfig()
    tutorial: TutorialConfig = TutorialConfig()
    pictures: PicturesConfig = PicturesConfig()

    @model_validator(mode="after")
    def _check_consistency(self) -> RunConfig:
        available = training_image_count(self.data.model_copy(update={"train_subset": None}))
        if self.data.train_subset is not None and self.data.train_subset > available:
            raise ValueError(
                f"data.train_subset ({self.data.train_subset}) exceeds the {available} "
                "training images left after the validation split"
            )
        images = training_image_count(self.data)
        if self.train.drop_last and images < self.train.batch_size:
            raise ValueError(
                f"train.drop_last leaves no step: {images} training images are fewer than train.batch_size "
                f"({self.train.batch_size})"
            )
        if self.train.early_stopping_patience is not None and self.data.validation_size == 0:
            raise ValueError("train.early_stopping_patience needs a validation set: set data.validation_size > 0")
        if not self.model.has_closed_form_kl and self.objective.bound == "elbo" and self.objective.kl == "analytic":
            why = "model.prior='vamp'" if self.model.prior != "standard_normal" else "model.stochastic_layers=2"
            raise ValueError(
                f"objective.kl='analytic' has no closed form with {why}: set objective.kl='monte_carlo' or "
                "objective.bound='iwae'"
            )
        return self

    @property
    def experiment_name(self) -> str:
        """The MLflow experiment of this run (see :func:`experiment_name`)."""
        return experiment_name(self.data.dataset)

    @property
    def model_name(self) -> str:
        """The registered model this run's model competes in (see :func:`model_name`)."""
        return model_name(self)


# "default" is the main job: the pytorch/examples network on dynamically binarized MNIST, scored by the IWAE bound. Five
# presets reproduce the seed tutorials (network, data, binarization, likelihood, optimizer, batch, z), and
# "hvae-vampprior" is the literature-grade model.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "data": {"dataset": "mnist", "binarization": "dynamic", "validation_size": 10_000},
        "model": {"architecture": "mlp", "hidden_dims": [400], "latent_dim": 20},
        "train": {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 128, "epochs": 10, "early_stopping_patience": 5},
        "eval": {"iwae_samples": 1000},
    },
    "tf-fashion-mlp": {  # A: TensorFlow 2 / Keras subclassed MLP VAE on Fashion-MNIST (Keras' Adam epsilon)
        "data": {"dataset": "fashion-mnist", "binarization": "none", "validation_size": 0},
        "model": {"architecture": "mlp", "hidden_dims": [128], "latent_dim": 10, "init": "glorot_uniform"},
        "train": {"optimizer": "adam", "learning_rate": 1e-3, "epsilon": 1e-7, "batch_size": 512, "epochs": 100, "seed": 22},
        "tutorial": {"metric": "tf_loss"},
        # It shows a 10x10 grid of samples, and the first 50 test images above their 50 reconstructions (here: the
        # samples after every epoch, the reconstructions after the last).
        "pictures": {"samples": 100, "first_reconstructions": 50},
    },
    "vae-tutorial-mlp": {  # B: "Tutorial on VAEs" MLP on MNIST (TensorFlow 1 and PyTorch)
        # The old TF loader's 55k training images (5k held out) in full batches of 64: 859 steps an epoch, so 117
        # epochs are the PyTorch listing's 100,000 iterations (100,503).
        "data": {"dataset": "mnist", "binarization": "none", "validation_size": 5_000},
        "model": {"architecture": "mlp", "hidden_dims": [128], "latent_dim": 100, "init": "kaiming_normal"},
        "train": {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 64, "drop_last": True, "epochs": 117},
        "tutorial": {"metric": "tutorial_loss"},
    },
    "keras-conv-fashion": {  # C: Keras example conv VAE with a 2-D latent, on Fashion-MNIST train + test (70k)
        "data": {"dataset": "fashion-mnist", "binarization": "none", "validation_size": 0, "training_images": "train+test"},
        "model": {
            "architecture": "conv", "latent_dim": 2, "conv_channels": [32, 64], "conv_padding": "same",
            "conv_dense_dim": 16, "decoder_start_channels": 64, "decoder_channels": [64, 32], "init": "glorot_uniform",
            "padding_convention": "tensorflow",
        },
        # Its KL term is tf.reduce_mean over the batch and the 2 latent dimensions: the KL enters its loss at weight 1/2.
        "objective": {"beta": 0.5},
        # RMSprop as the example's TF 2 Keras computes it, epsilon added to the root (Keras 3 puts it inside the root,
        # "keras_rmsprop"): its epoch-1 loss is within 2% of the example's with this update and 3% below with Keras 3's.
        "train": {"optimizer": "rmsprop", "learning_rate": 1e-3, "batch_size": 64, "epochs": 100},
        "tutorial": {"metric": "keras_loss"},
        "pictures": {"manifold_size": 10},  # its 10x10 manifold over [-2, 2]^2
    },
    "tf-cvae-mnist": {  # D: TensorFlow 2 CVAE tutorial on threshold-binarized MNIST, Monte Carlo KL
        "data": {"dataset": "mnist", "binarization": "threshold", "validation_size": 0},
        "model": {
            "architecture": "conv", "latent_dim": 50, "conv_channels": [32, 64], "conv_padding": "valid",
            "decoder_start_channels": 32, "decoder_channels": [64, 32], "init": "glorot_uniform",
            "padding_convention": "tensorflow",
        },
        "objective": {"kl": "monte_carlo"},
        "train": {"optimizer": "adam", "learning_rate": 1e-4, "epsilon": 1e-7, "batch_size": 100, "epochs": 100},
        "tutorial": {"metric": "tf_test_elbo"},
    },
    "matlab-conv-mnist": {  # E: MATLAB Deep Learning Toolbox conv VAE on grayscale MNIST, Gaussian (MSE) likelihood
        # The example never shuffles and drops the last partial batch: the same 117 batches of 512 every epoch.
        "data": {"dataset": "mnist", "binarization": "none", "validation_size": 0},
        "model": {
            "architecture": "conv", "latent_dim": 20, "conv_channels": [32, 64], "conv_padding": "same",
            "decoder_projection": "transposed_conv", "decoder_start_channels": 64, "decoder_channels": [64, 32],
            "init": "glorot_uniform", "padding_convention": "matlab",
        },
        "objective": {"likelihood": "gaussian", "gaussian_std": 1.0},
        "train": {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 512, "epochs": 50, "shuffle": False, "drop_last": True},
        "tutorial": {"metric": "matlab_test_elbo_loss"},
        "pictures": {"samples": 25},  # its grid of 25 images decoded from random latents
    },
    # Literature grade (issue 9): the VampPrior paper's two-stochastic-layer HVAE (gated MLPs of 300 units, z1 = z2 =
    # 40, 500 pseudo-inputs; Tomczak and Welling 2018) on dynamically binarized MNIST, made for two CPU cores: bf16
    # matrix products, large batches, torch.compile and a cosine learning rate over all its epochs; 58k training
    # images (a 2k validation set only watches). The KL warm-up over 10 epochs won the pipeline's own search (0.2 nats
    # at k=5000 over none): BENCHMARKS.md ("Literature-grade preset") has what it reached and in how long.
    "hvae-vampprior": {
        "data": {"dataset": "mnist", "binarization": "dynamic", "validation_size": 2_000},
        "model": {
            "architecture": "mlp", "stochastic_layers": 2, "hidden_dims": [300, 300], "latent_dim": 40,
            "top_latent_dim": 40, "activation": "gated", "prior": "vamp", "prior_components": 500,
            "logvar_limits": [-6.0, 2.0],
        },
        "objective": {"bound": "iwae", "samples": 1, "kl": "monte_carlo", "kl_warmup_epochs": 10},
        "train": {
            "optimizer": "adam", "learning_rate": 2e-3, "batch_size": 500, "epochs": 400, "lr_schedule": "cosine",
            "lr_warmup_epochs": 2, "precision": "bf16", "compile": True,
        },
    },
}


# --- names and comparability: what a run is filed under, and whose test numbers it can be ranked against -------------

# Two runs' test numbers compare only when they score the same test images in the same way: these fields decide.
# The first ones fix the test images (the published files are fixed by the data set; tracking digests the test split
# from them), the rest what is measured on them.
# Training on the test images (data.training_images) makes the test numbers not held out, so it decides too.
TEST_IMAGE_FIELDS = ("data.dataset", "data.binarization", "data.binarization_seed")
SCORE_FIELDS = (
    *TEST_IMAGE_FIELDS, "data.training_images", "objective.likelihood", "objective.gaussian_std", "eval.iwae_samples",
    "eval.seed",
)
# Fields that join a comparable_on record only away from these defaults, so that records made before the field
# existed (on registered versions) still compare with new ones.
_RECORDED_WHEN_CHANGED = {"data.training_images": "train"}


def experiment_name(dataset: str) -> str:
    """The MLflow experiment that holds every run on ``dataset``: "vae-mnist"."""
    return f"vae-{dataset}"


def classifier_name(dataset: str) -> str:
    """The registered model, and the MLflow experiment of its training runs, of the data set's classifier, whose
    features FID uses: "classifier-mnist" (one registered version per verified data set and recipe)."""
    return f"classifier-{dataset}"


def model_name(config: RunConfig) -> str:
    """The registered model of the config's comparable family: one champion per data set, binarization and likelihood.

    "vae-mnist" is dynamically binarized MNIST under a Bernoulli likelihood, as published likelihoods are measured;
    other families say how they differ: "vae-mnist-threshold", "vae-fashion-mnist-grayscale",
    "vae-mnist-grayscale-gaussian", and "-train-test" when the test images were trained on.
    """
    parts = [experiment_name(config.data.dataset)]
    if config.data.binarization != "dynamic":
        parts.append("grayscale" if config.data.binarization == "none" else config.data.binarization)
    if config.objective.likelihood != "bernoulli":
        parts.append(config.objective.likelihood)
    if config.data.training_images == "train+test":  # test numbers not held out: a family of its own
        parts.append("train-test")
    return "-".join(parts)


def comparable_on(config: RunConfig) -> dict[str, Any]:
    """The values of :data:`SCORE_FIELDS` in ``config``: runs whose test numbers compare have equal ones (a field of
    :data:`_RECORDED_WHEN_CHANGED` only when it is not at its default)."""
    values = {field: _dotted(config, field) for field in SCORE_FIELDS}
    return {field: value for field, value in values.items() if _RECORDED_WHEN_CHANGED.get(field, object()) != value}


def comparability_changes(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """What makes two :func:`comparable_on` records differ, as "field: theirs -> ours" (empty when they compare)."""
    ours, theirs = dict(_RECORDED_WHEN_CHANGED) | dict(ours), dict(_RECORDED_WHEN_CHANGED) | dict(theirs)
    return [
        f"{field}: {theirs.get(field)!r} -> {ours.get(field)!r}"
        for field in dict.fromkeys([*theirs, *ours])
        if ours.get(field) != theirs.get(field)
    ]


def _dotted(config: RunConfig, field: str) -> Any:
    value: Any = config
    for part in field.split("."):
        value = getattr(value, part)
    return value


def load_config(
    preset: str = "default",
    overrides: Mapping[str, Any] | None = None,
    file: Path | str | None = None,
) -> RunConfig:
    """The preset, then the settings of a TOML or JSON ``file``, then ``overrides`` (``{"train.epochs": 3}``)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    values = json.loads(json.dumps(PRESETS[preset]))
    values["preset"] = preset
    if file is not None:
        _merge(values, _read_file(Path(file)))
    return validate(_with_overrides(values, overrides or {}))


def with_overrides(config: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """``config`` with dotted ``overrides`` (``{"train.epochs": 20}``) applied, validated again."""
    return validate(_with_overrides(config.model_dump(mode="json"), overrides))


def _with_overrides(values: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        target = values
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{dotted}: {part} is not a section")
        target[leaf] = value
    return values


def validate(values: Mapping[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from plain values; every bad field is named in one :class:`ConfigError`."""
    try:
        return RunConfig.model_validate(values)
    except ValidationError as error:
        raise ConfigError("invalid config:\n  " + "\n  ".join(field_errors(error))) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``train.epochs=3`` -> ("train.epochs", 3); values are read as JSON when they parse, else kept as text."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form section.field=value")
    return key.strip(), parse_value(raw)


def parse_value(raw: str) -> Any:
    """A setting's value as typed on the command line: JSON when it parses (``3``, ``[400]``, ``null``), else the text."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: cannot read config file ({error})") from error
