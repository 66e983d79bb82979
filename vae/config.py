"""Validated settings of the model, the objective, training and evaluation; a bad value is rejected by field name."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Settings):
    """The network: an MLP or a convolutional VAE for 1x28x28 images."""

    architecture: Literal["mlp", "conv"] = "mlp"
    latent_dim: int = Field(20, gt=0)
    image_shape: tuple[int, int, int] = (1, 28, 28)
    # MLP: encoder hidden widths; the decoder mirrors them.
    hidden_dims: tuple[int, ...] = (400,)
    # Conv encoder: stride-2 3x3 convolutions, then an optional dense layer, then the Gaussian heads.
    conv_channels: tuple[int, ...] = (32, 64)
    conv_padding: Literal["same", "valid"] = "same"
    conv_dense_dim: int | None = None
    # Conv decoder: a projection of z to a 7x7 map, stride-2 transposed convolutions, a final 3x3 one.
    decoder_projection: Literal["dense", "transposed_conv"] = "dense"
    decoder_start_channels: int = Field(64, gt=0)
    decoder_channels: tuple[int, ...] = (64, 32)
    init: Literal["pytorch", "glorot_uniform", "kaiming_normal"] = "pytorch"
    # Where a "same" convolution pads, and a transposed one crops, the odd pixel of a stride-2 layer: "pytorch" on
    # both sides (pad 1 each side, crop the first row and column); "tensorflow" (and Keras) at the bottom and right
    # only; "matlab" pads at the bottom and right like TensorFlow but crops the first row and column like PyTorch.
    # Parameter counts are equal; the pixel grids of encoder and decoder are shifted by one.
    padding_convention: Literal["pytorch", "tensorflow", "matlab"] = "pytorch"

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
        return self


class ObjectiveConfig(_Settings):
    """The negative ELBO: a likelihood, a KL estimator, a beta weight and an optional linear warm-up of it."""

    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    gaussian_std: float = Field(1.0, gt=0)
    kl: Literal["analytic", "monte_carlo"] = "analytic"
    beta: float = Field(1.0, ge=0)
    kl_warmup_epochs: float = Field(0.0, ge=0)


class TrainConfig(_Settings):
    """The optimizer and the loop: how long, how fast, where, and when to stop."""

    # "rmsprop" is PyTorch's update (epsilon added to the root) with Keras' rho and epsilon; "keras_rmsprop" is Keras'
    # own update, epsilon inside the root: w -= lr * g / sqrt(v + epsilon).
    optimizer: Literal["adam", "rmsprop", "keras_rmsprop"] = "adam"
    learning_rate: float = Field(1e-3, gt=0)
    epsilon: float | None = Field(None, gt=0)  # None: the optimizer's own (Adam 1e-8, both RMSprops Keras' 1e-7)
    batch_size: int = Field(128, gt=0)
    epochs: int = Field(10, gt=0)
    shuffle: bool = True  # a new order of the training set every epoch; False: the set's own order every epoch
    drop_last: bool = False  # skip the last, smaller batch of an epoch (steps = images // batch_size)
    grad_clip_norm: float | None = Field(None, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0)
    seed: int = 0
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False

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
