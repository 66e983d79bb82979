"""Validated settings of the model, the objective, training and evaluation; a bad value is rejected by field name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Upper bounds, far above any sensible run, so that a typo or a tampered config.json (which --resume and evaluate
# read back from the tracking store) is refused by name instead of exhausting memory or running for years.
MAX_LATENT_DIM = 1024
MAX_WIDTH = 4096  # units of a dense layer
MAX_HIDDEN_LAYERS = 8
MAX_CHANNELS = 1024
MAX_IMAGE_SIDE = 64  # pixels; the data sets here are 28x28
MAX_IMAGE_CHANNELS = 4
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 65_536
MAX_IWAE_SAMPLES = 100_000
MAX_FID_SAMPLES = 1_000_000
MAX_PRIOR_COMPONENTS = 60_000  # pseudo-inputs of a VampPrior: at most one per training image
MAX_TRAINING_MINUTES = 525_600.0  # a year
MAX_BETA = 1_000.0
MAX_GAUSSIAN_STD = 1_000.0

Width = Annotated[int, Field(gt=0, le=MAX_WIDTH)]
Channels = Annotated[int, Field(gt=0, le=MAX_CHANNELS)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # seed + 2 must still be a valid torch seed


class _Settings(BaseModel):
    # allow_inf_nan=False: JSON's Infinity and NaN parse as floats, and would pass every ``gt``/``le`` bound check.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelConfig(_Settings):
    """The network: an MLP or a convolutional VAE for 1x28x28 images, with one or two stochastic layers."""

    architecture: Literal["mlp", "conv"] = "mlp"
    latent_dim: int = Field(20, gt=0, le=MAX_LATENT_DIM)  # z, or with two stochastic layers z1, the one next to x
    image_shape: tuple[
        Annotated[int, Field(gt=0, le=MAX_IMAGE_CHANNELS)],
        Annotated[int, Field(gt=0, le=MAX_IMAGE_SIDE)],
        Annotated[int, Field(gt=0, le=MAX_IMAGE_SIDE)],
    ] = (1, 28, 28)
    # MLP: encoder hidden widths; the decoder mirrors them.
    hidden_dims: tuple[Width, ...] = Field((400,), max_length=MAX_HIDDEN_LAYERS)
    # MLP hidden units: relu, or gated (h * sigmoid(g), two linear maps per layer: the VampPrior paper's GatedDense).
    activation: Literal["relu", "gated"] = "relu"
    # p(z) of the top latent: N(0, I), or the VampPrior (Tomczak and Welling 2018): the mixture of the encoder's
    # posteriors at prior_components learned pseudo-inputs.
    prior: Literal["standard_normal", "vamp"] = "standard_normal"
    prior_components: int = Field(500, gt=0, le=MAX_PRIOR_COMPONENTS)
    # 2: the VampPrior paper's hierarchical VAE, q(z2|x) q(z1|x,z2) and p(z2) p(z1|z2) p(x|z1,z2), an MLP whose every
    # network has hidden_dims; latent_dim is z1's size and top_latent_dim z2's.
    stochastic_layers: Literal[1, 2] = 1
    top_latent_dim: int = Field(40, gt=0, le=MAX_LATENT_DIM)
    # Bounds of every posterior and conditional prior log-variance, by a hard tanh (the VampPrior paper: [-6, 2]).
    logvar_limits: tuple[float, float] | None = None
    # Conv encoder: stride-2 3x3 convolutions, then an optional dense layer, then the Gaussian heads.
    conv_channels: tuple[Channels, ...] = Field((32, 64), max_length=MAX_HIDDEN_LAYERS)
    conv_padding: Literal["same", "valid"] = "same"
    conv_dense_dim: Width | None = None
    # Conv decoder: a projection of z to a 7x7 map, stride-2 transposed convolutions, a final 3x3 one.
    decoder_projection: Literal["dense", "transposed_conv"] = "dense"
    decoder_start_channels: Channels = 64
    decoder_channels: tuple[Channels, ...] = Field((64, 32), max_length=MAX_HIDDEN_LAYERS)
    init: Literal["pytorch", "glorot_uniform", "kaiming_normal"] = "pytorch"
    # Where a "same" convolution pads, and a transposed one crops, the odd pixel of a stride-2 layer: "pytorch" on
    # both sides (pad 1 each side, crop the first row and column); "tensorflow" (and Keras) at the bottom and right
    # only; "matlab" pads at the bottom and right like TensorFlow but crops the first row and column like PyTorch.
    # Parameter counts are equal; the pixel grids of encoder and decoder are shifted by one.
    padding_convention: Literal["pytorch", "tensorflow", "matlab"] = "pytorch"

    @model_validator(mode="after")
    def _check_sizes(self) -> ModelConfig:
        if self.architecture == "mlp" and not self.hidden_dims:
            raise ValueError("hidden_dims must name at least one layer for the mlp architecture")
        if self.architecture == "conv":
            if self.image_shape[1:] != (28, 28):
                raise ValueError(f"image_shape must be (C, 28, 28) for the conv architecture, got {self.image_shape}")
            if len(self.conv_channels) != 2 or len(self.decoder_channels) != 2:
                raise ValueError("conv_channels and decoder_channels must each hold two widths (28 -> 14 -> 7)")
        if self.stochastic_layers == 2 and self.architecture != "mlp":
            raise ValueError("stochastic_layers=2 is built for the mlp architecture only")
        if self.logvar_limits is not None and not self.logvar_limits[0] < self.logvar_limits[1]:
            raise ValueError(f"logvar_limits must be (low, high) with low < high, got {self.logvar_limits}")
        if self.activation == "gated" and self.architecture != "mlp":
            raise ValueError("activation='gated' applies to the mlp architecture only")
        return self

    @property
    def has_closed_form_kl(self) -> bool:
        """Whether KL(q(z|x) || p(z)) has a closed form: one Gaussian layer under the standard normal prior."""
        return self.stochastic_layers == 1 and self.prior == "standard_normal"


class ObjectiveConfig(_Settings):
    """The bound trained on (the ELBO, or the importance-weighted bound of Burda et al. 2015 with ``samples``
    importance samples per image), a likelihood, a KL estimator, a beta weight and an optional linear warm-up of it."""

    bound: Literal["elbo", "iwae"] = "elbo"
    samples: int = Field(1, ge=1, le=MAX_IWAE_SAMPLES)  # k of the iwae bound; with k = 1 it is the ELBO with a Monte Carlo KL
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    gaussian_std: float = Field(1.0, gt=0, le=MAX_GAUSSIAN_STD)
    # The ELBO's KL estimator; the iwae bound always uses its samples' log p(z) - log q(z|x).
    kl: Literal["analytic", "monte_carlo"] = "analytic"
    beta: float = Field(1.0, ge=0, le=MAX_BETA)
    kl_warmup_epochs: float = Field(0.0, ge=0, le=MAX_EPOCHS)

    @model_validator(mode="after")
    def _check_samples(self) -> ObjectiveConfig:
        if self.samples > 1 and self.bound != "iwae":
            raise ValueError(f"samples={self.samples} needs bound='iwae' (the ELBO is trained on one sample)")
        return self


class TrainConfig(_Settings):
    """The optimizer and the loop: how long, how fast, where, and when to stop."""

    # "rmsprop" is PyTorch's update (epsilon added to the root) with Keras' rho and epsilon, which is also TF 2's Keras
    # RMSprop without momentum; "keras_rmsprop" is Keras 3's update, epsilon inside the root: w -= lr * g / sqrt(v + epsilon).
    optimizer: Literal["adam", "rmsprop", "keras_rmsprop"] = "adam"
    learning_rate: float = Field(1e-3, gt=0)  # no upper bound: a diverging rate is a legitimate (failing) experiment
    epsilon: float | None = Field(None, gt=0, le=1.0)  # None: the optimizer's own (Adam 1e-8, both RMSprops Keras' 1e-7)
    batch_size: int = Field(128, gt=0, le=MAX_BATCH_SIZE)
    epochs: int = Field(10, gt=0, le=MAX_EPOCHS)
    shuffle: bool = True  # a new order of the training set every epoch; False: the set's own order every epoch
    drop_last: bool = False  # skip the last, smaller batch of an epoch (steps = images // batch_size)
    grad_clip_norm: float | None = Field(None, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0, le=MAX_EPOCHS)
    seed: Seed = 0
    device: str = Field("auto", max_length=32)
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    # The learning rate: constant, or cosine-annealed from learning_rate to learning_rate * lr_final_fraction over
    # all the epochs; either way after a linear ramp from 0 over the first lr_warmup_epochs.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_warmup_epochs: float = Field(0.0, ge=0, le=MAX_EPOCHS)
    lr_final_fraction: float = Field(0.0, ge=0, le=1)
    # Stop before an epoch that, at the mean epoch's length so far, would end past this many minutes of training
    # (None: no limit).
    max_minutes: float | None = Field(None, gt=0, le=MAX_TRAINING_MINUTES)

    @model_validator(mode="after")
    def _check_device(self) -> TrainConfig:
        kind = self.device.split(":", 1)[0]
        if kind not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"device must be auto, cpu, cuda[:N] or mps, got {self.device!r}")
        return self


class EvalConfig(_Settings):
    """Test-set evaluation: the ELBO, the importance-weighted (IWAE) log-likelihood bound and sample quality (FID)."""

    batch_size: int = Field(500, gt=0, le=MAX_BATCH_SIZE)
    iwae_samples: int = Field(1000, ge=0, le=MAX_IWAE_SAMPLES)  # 0 skips the IWAE estimate
    # Small chunks stay in cache: ~2x faster on a CPU than 250.
    iwae_chunk_size: int = Field(32, gt=0, le=MAX_IWAE_SAMPLES)
    iwae_batch_size: int = Field(100, gt=0, le=MAX_BATCH_SIZE)
    seed: Seed = 0
    fid: bool = True  # the Frechet distance of prior samples and reconstructions, on the data set's classifier
    # Prior samples scored against the test images (the covariance needs 2).
    fid_samples: int = Field(10_000, ge=2, le=MAX_FID_SAMPLES)


class ClassifierConfig(_Settings):
    """The recipe of the data set's classifier, whose penultimate features the FID compares: network and training.

    The default recipe is meant to reach 99.0% test accuracy on MNIST and 90% on Fashion-MNIST (BENCHMARKS.md has
    what was measured).
    """

    conv_channels: tuple[Channels, Channels] = (32, 64)
    feature_dim: Width = 128  # the penultimate layer: the space the Frechet distance is measured in
    dropout: float = Field(0.25, ge=0, lt=1)  # on the features, in training only
    epochs: int = Field(3, gt=0, le=MAX_EPOCHS)
    batch_size: int = Field(128, gt=0, le=MAX_BATCH_SIZE)
    learning_rate: float = Field(2e-3, gt=0)
    train_subset: int | None = Field(None, gt=0)  # train on the first N training images only (quick runs, tests)
    seed: Seed = 0


def field_errors(error: ValidationError) -> list[str]:
    """One line per bad field of a failed validation: "train.epochs: Input should be greater than 0 (got 0)"."""
    problems = []
    for issue in error.errors():
        where = ".".join(str(part) for part in issue["loc"]) or "config"
        value = issue.get("input")
        given = "" if issue["type"] == "missing" or isinstance(value, Mapping) else f" (got {value!r})"
        problems.append(f"{where}: {issue['msg']}{given}")
    return problems
