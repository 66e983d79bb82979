"""The VAE: an encoder to a diagonal Gaussian posterior, a decoder to pixel logits, built as an MLP or a ConvNet."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from vae.config import ModelConfig


class VAEOutput(NamedTuple):
    """One pass of the model: decoder logits, posterior mean and log-variance, and the sampled latent."""

    logits: Tensor
    mu: Tensor
    logvar: Tensor
    z: Tensor


class VAE(nn.Module):
    """A VAE made of an encoder (image -> 2 * latent_dim numbers) and a decoder (latent -> image logits)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_dim: int, image_shape: tuple[int, int, int]):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.latent_dim = latent_dim
        self.image_shape = tuple(image_shape)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z|x) for images ``x`` of shape [N, C, H, W]."""
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        """Pixel logits of p(x|z), shape [N, C, H, W] (the mean image is their sigmoid)."""
        return self.decoder(z)

    def reparameterize(
        self, mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None, eps: Tensor | None = None
    ) -> Tensor:
        """z = mu + eps * sigma, with eps ~ N(0, I) drawn with ``generator`` unless ``eps`` is given."""
        if eps is None:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        elif eps.shape != mu.shape:
            raise ValueError(f"eps must have the posterior mean's shape {tuple(mu.shape)}, got {tuple(eps.shape)}")
        return mu + eps * torch.exp(0.5 * logvar)

    def forward(self, x: Tensor, generator: torch.Generator | None = None, eps: Tensor | None = None) -> VAEOutput:
        """Encode, sample z (with noise ``eps`` when given, else drawn with ``generator``) and decode."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, generator, eps)
        return VAEOutput(self.decode(z), mu, logvar, z)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean images decoded from the posterior means of ``x``, in [0, 1]."""
        mu, _ = self.encode(x)
        return torch.sigmoid(self.decode(mu))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` mean images decoded from z ~ N(0, I), shape [n, C, H, W], in [0, 1]."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        return torch.sigmoid(self.decode(z))


class ServingVAE(VAE):
    """The VAE as served: the same networks and methods, but ``forward(x)`` returns the mean reconstructions.

    Model servers (MLflow's pyfunc ``predict()`` among them) need one tensor out of ``forward``.
    """

    @classmethod
    def of(cls, model: VAE) -> ServingVAE:
        """A CPU copy of ``model`` in eval mode (the caller's model is left as it is)."""
        serving = cls(copy.deepcopy(model.encoder), copy.deepcopy(model.decoder), model.latent_dim, model.image_shape)
        return serving.cpu().eval()

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return self.reconstruct(x)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block, each submodule's training flag put back afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def build_model(config: ModelConfig, seed: int | None = None) -> VAE:
    """The VAE that ``config`` describes, its weights drawn with ``seed`` when given (without touching global RNG)."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        builder = _mlp if config.architecture == "mlp" else _conv
        encoder, decoder = builder(config)
        model = VAE(encoder, decoder, config.latent_dim, config.image_shape)
        _initialize(model, config.init)
    return model


def _mlp(config: ModelConfig) -> tuple[nn.Module, nn.Module]:
    pixels = math.prod(config.image_shape)
    widths = (pixels, *config.hidden_dims)
    encoder: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in zip(widths, widths[1:]):
        encoder += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    encoder.append(nn.Linear(widths[-1], 2 * config.latent_dim))
    back = (config.latent_dim, *reversed(config.hidden_dims))
    decoder: list[nn.Module] = []
    for fan_in, fan_out in zip(back, back[1:]):
        decoder += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    decoder += [nn.Linear(back[-1], pixels), nn.Unflatten(1, config.image_shape)]
    return nn.Sequential(*encoder), nn.Sequential(*decoder)


def _conv(config: ModelConfig) -> tuple[nn.Module, nn.Module]:
    channels = config.image_shape[0]
    c1, c2 = config.conv_channels
    same = config.conv_padding == "same"
    side = 28
    for _ in range(2):
        side = -(-side // 2) if same else (side - 3) // 2 + 1
    encoder: list[nn.Module] = [
        *_strided_conv(channels, c1, same, config.padding_convention), nn.ReLU(),
        *_strided_conv(c1, c2, same, config.padding_convention), nn.ReLU(),
        nn.Flatten(),
    ]
    features = c2 * side * side
    if config.conv_dense_dim is not None:
        encoder += [nn.Linear(features, config.conv_dense_dim), nn.ReLU()]
        features = config.conv_dense_dim
    encoder.append(nn.Linear(features, 2 * config.latent_dim))

    start = config.decoder_start_channels
    if config.decoder_projection == "dense":
        projection = [nn.Linear(config.latent_dim, start * 7 * 7), nn.ReLU(), nn.Unflatten(1, (start, 7, 7))]
    else:  # a 7x7 transposed convolution of a 1x1 map, as the MATLAB example builds it
        projection = [nn.Unflatten(1, (config.latent_dim, 1, 1)), nn.ConvTranspose2d(config.latent_dim, start, 7, stride=7), nn.ReLU()]
    d1, d2 = config.decoder_channels
    decoder = [
        *projection,
        *_upsampling_conv(start, d1, config.padding_convention), nn.ReLU(),
        *_upsampling_conv(d1, d2, config.padding_convention), nn.ReLU(),
        nn.ConvTranspose2d(d2, channels, 3, stride=1, padding=1),
    ]
    return nn.Sequential(*encoder), nn.Sequential(*decoder)


def _strided_conv(fan_in: int, fan_out: int, same: bool, convention: str) -> list[nn.Module]:
    """A 3x3 stride-2 convolution halving the side (rounding up) when ``same``, else unpadded.

    "Same" needs one pixel of padding for an even side: PyTorch puts one on each side (and drops the last row and
    column the stride never reaches), TensorFlow and MATLAB put it at the bottom and right only.
    """
    if not same:
        return [nn.Conv2d(fan_in, fan_out, 3, stride=2)]
    if convention == "pytorch":
        return [nn.Conv2d(fan_in, fan_out, 3, stride=2, padding=1)]
    return [nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(fan_in, fan_out, 3, stride=2)]


def _upsampling_conv(fan_in: int, fan_out: int, convention: str) -> list[nn.Module]:
    """A 3x3 stride-2 transposed convolution doubling the side: of its 2n + 1 output rows (and columns) one is
    cropped, the first in PyTorch and MATLAB, the last in TensorFlow."""
    if convention == "tensorflow":
        return [nn.ConvTranspose2d(fan_in, fan_out, 3, stride=2), _CropLast()]
    return [nn.ConvTranspose2d(fan_in, fan_out, 3, stride=2, padding=1, output_padding=1)]


class _CropLast(nn.Module):
    """Drops the last row and column of a feature map."""

    def forward(self, x: Tensor) -> Tensor:
        return x[..., :-1, :-1]


def _initialize(model: nn.Module, scheme: str) -> None:
    if scheme == "pytorch":
        return
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            if scheme == "glorot_uniform":
                nn.init.xavier_uniform_(module.weight)
            else:  # kaiming_normal: std = 1 / sqrt(fan_in / 2), as the "Tutorial on VAEs" code draws it
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
