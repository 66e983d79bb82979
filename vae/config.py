"""Validated settings of the model, the objective, training and evaluation; a bad value is rejected by field name."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Settings):
    """The network: an MLP or a convolutional VAE for 1x28x28 images, with one or two stochastic layers."""

    architecture: Literal["mlp", "conv"] = "mlp"
    latent_dim: int = Field(20, gt=0)  # z, or with two stochastic layers z1, the one next to x
    image_shape: tuple[int, int, int] = (1, 28, 28)
    # MLP: encoder hidden widths; the decoder mirrors them.
    hidden_dims: tuple[int, ...] = (400,)
    # MLP hidden units: relu, or gated (h * sigmoid(g), two linear maps per layer: the VampPrior paper's GatedDense).
    activation: Literal["relu", "gated"] = "relu"
    # p(z) of the top latent: N(0, I), or the VampPrior (Tomczak and Welling 2018): the mixture of the encoder's
    # posteriors at prior_components learned pseudo-inputs.
    prior: Literal["standard_normal", "vamp"] = "standard_normal"
    prior_components: int = Field(500, gt=0)
    # 2: the VampPrior paper's hierarchical VAE, q(z2|x) q(z1|x,z2) and p(z2) p(z1|z2) p(x|z1,z2), an MLP whose every
    # network has hidden_dims; latent_dim is z1's size and top_latent_dim z2's.
    stochastic_layers: Literal[1, 2] = 1
    top_latent_dim: int = Field(40, gt=0)
    # Bounds of every posterior and conditional prior log-variance, by a hard tanh (the VampPrior paper: [-6, 2]).
    logvar_limits: tuple[float, float] | None = None
    # Conv encoder: stride-2 3x3 convolutions, then an optional dense layer, then the Gaussian heads.
    conv_channels: tuple[int, ...] = (32, 64)
    conv_padding: Literal["same", "valid"] = "same"
    conv_dense_dim: int | None = None
    # Conv decoder: a projection of z to a 7x7 map, stride-2 transposed convolutions, a final 3x3 one.
    decoder_projection: Literal["dense", "transposed_conv"] = "dense"
    decoder_start_channels: int = Field(64, gt=0)
    decoder_channels: tuple[int, ...] = (64, 32)
    init: Literal["pytorch", "glorot_uniform", "kaiming_normal"] = "pytorch"

    @model_validator(mode="after")
    def _check_sizes(self) -> ModelConfig:
        for name in ("hidden_dims", "conv_channels", "decoder_channels"):
            if any(width <= 0 for width in getattr(self, name)):
                raise ValueError(f"{name} must hold positive widths, got {getattr(self, name)}")
        if self.architecture == "mlp" and not self.hidden_dims:
            raise ValueError("hidden_dims must name at least one layer for the mlp architecture")
        if self.architecture == "conv":
            if self.image_shape[1:] != (28, 28):
                raise ValueError(f"image_shape must be (C, 28, 28) for the conv architecture, got {self.image_shape}")
            if len(self.conv_channels) != 2 or len(self.decoder_channels) != 2:
                raise ValueError("conv_channels and decoder_channels must each hold two widths (28 -> 14 -> 7)")
        if self.conv_dense_dim is not None and self.conv_dense_dim <= 0:
            raise ValueError(f"conv_dense_dim must be positive or None, got {self.conv_dense_dim}")
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
    samples: int = Field(1, ge=1)  # k of the iwae bound; with k = 1 it is the ELBO with a Monte Carlo KL
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    gaussian_std: float = Field(1.0, gt=0)
    # The ELBO's KL estimator; the iwae bound always uses its samples' log p(z) - log q(z|x).
    kl: Literal["analytic", "monte_carlo"] = "analytic"
    beta: float = Field(1.0, ge=0)
    kl_warmup_epochs: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check_samples(self) -> ObjectiveConfig:
        if self.samples > 1 and self.bound != "iwae":
            raise ValueError(f"samples={self.samples} needs bound='iwae' (the ELBO is trained on one sample)")
        return self


class TrainConfig(_Settings):
    """The optimizer and the loop: how long, how fast, where, and when to stop."""

    optimizer: Literal["adam", "rmsprop"] = "adam"
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(128, gt=0)
    epochs: int = Field(10, gt=0)
    grad_clip_norm: float | None = Field(None, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0)
    seed: int = 0
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    # The learning rate: constant, or cosine-annealed from learning_rate to learning_rate * lr_final_fraction over
    # all the epochs; either way after a linear ramp from 0 over the first lr_warmup_epochs.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_warmup_epochs: float = Field(0.0, ge=0)
    lr_final_fraction: float = Field(0.0, ge=0, le=1)
    # Stop at the end of the first epoch that ends this many minutes of training after the start (None: no limit).
    max_minutes: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check_device(self) -> TrainConfig:
        kind = self.device.split(":", 1)[0]
        if kind not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"device must be auto, cpu, cuda[:N] or mps, got {self.device!r}")
        return self


class EvalConfig(_Settings):
    """Test-set evaluation: the ELBO and the importance-weighted (IWAE) log-likelihood bound."""

    batch_size: int = Field(500, gt=0)
    iwae_samples: int = Field(1000, ge=0)  # 0 skips the IWAE estimate
    iwae_chunk_size: int = Field(32, gt=0)  # small chunks stay in cache: ~2x faster on a CPU than 250
    iwae_batch_size: int = Field(100, gt=0)
    seed: int = 0
