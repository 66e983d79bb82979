"""The VAEs: an encoder to a diagonal Gaussian posterior, a decoder to pixel logits and a prior, as an MLP or a ConvNet,
with one stochastic layer or two (the VampPrior paper's hierarchical VAE)."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae.config import ModelConfig
from vae.priors import StandardNormalPrior, build_prior, log_normal, log_standard_normal

# The first call of a process into MKL's vector math (torch.exp, log, tanh... of float tensors on the CPU) computes the
# second thread's share on a less accurate path in about one process in five when the other core is idle (MKL 2024.2 in
# torch 2.13's CPU wheel: exactly the second half of 2560 values differ; never with one MKL thread, never after a first
# call, whatever the function). Training's first step was then not the same in every process, and a run resumed in a
# new process parted from the uninterrupted one. Spending that first call here, on a throwaway tensor, makes every
# process compute alike.
torch.exp(torch.zeros(16))


class VAEOutput(NamedTuple):
    """One pass of the model: decoder logits, posterior mean and log-variance, and the sampled latent."""

    logits: Tensor
    mu: Tensor
    logvar: Tensor
    z: Tensor


class LatentSample(NamedTuple):
    """k samples z ~ q(z|x) for each of B images: the decoder's logits [k, B, C, H, W] and, in nats, log p(z) and
    log q(z|x) [k, B] (over all the stochastic layers). With the likelihood they make the importance weights."""

    logits: Tensor
    log_prior: Tensor
    log_posterior: Tensor


class MeanImages:
    """Mean images of a model with ``encode``, ``decode`` and ``sample_latents``: reconstructions and samples."""

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean images decoded from the posterior means of ``x``, in [0, 1]."""
        mu, _ = self.encode(x)
        return torch.sigmoid(self.decode(mu))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` mean images decoded from z ~ p(z), shape [n, C, H, W], in [0, 1]."""
        return torch.sigmoid(self.decode(self.sample_latents(n, generator)))


class VAE(MeanImages, nn.Module):
    """A VAE made of an encoder (image -> 2 * latent_dim numbers), a decoder (latent -> image logits) and a prior p(z)
    (N(0, I) unless given)."""

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        latent_dim: int,
        image_shape: tuple[int, int, int],
        prior: nn.Module | None = None,
        logvar_limits: tuple[float, float] | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.latent_dim = latent_dim
        self.image_shape = tuple(image_shape)
        self.prior = prior if prior is not None else StandardNormalPrior(latent_dim)
        self.logvar_limits = logvar_limits

    @property
    def has_closed_form_kl(self) -> bool:
        """KL(q(z|x) || p(z)) has a closed form under the standard normal prior."""
        return isinstance(self.prior, StandardNormalPrior)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z|x) for images ``x`` of shape [N, C, H, W]."""
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, _limited(logvar, self.logvar_limits)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """What :meth:`latent_sample` needs of images ``x`` (the parameters of q(z|x)), computed once for all samples."""
        return self.encode(x)

    def latent_sample(self, posterior: tuple[Tensor, Tensor], eps: Tensor) -> LatentSample:
        """z = mu + eps * sigma for the noise ``eps`` [k, B, latent_dim] and the :meth:`posterior` of B images."""
        mu, logvar = posterior
        z = mu + eps * torch.exp(0.5 * logvar)
        logits = self.decode(z.flatten(0, 1)).unflatten(0, z.shape[:2])
        # log N(mu + std * eps; mu, std^2) = log N(eps; 0, I) - sum(log std): the density of z without the
        # cancellation in z - mu when std is tiny.
        log_posterior = log_standard_normal(eps.float()) - 0.5 * logvar.float().sum(-1)
        return LatentSample(logits, self.prior.log_prob(z, self.encode), log_posterior)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of z ~ p(z) [n, latent_dim], made with ``generator``."""
        return self.prior.sample(n, self.encode, generator, device=_device_of(self))

    def frozen_prior(self) -> contextlib.AbstractContextManager:
        """A block in which p(z) is computed once and reused (evaluation: the parameters must not change inside)."""
        return self.prior.frozen(self.encode)

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



class HierarchicalVAE(MeanImages, nn.Module):
    """Two stochastic layers, as the VampPrior paper's HVAE (Tomczak and Welling 2018): the generative model
    p(z2) p(z1|z2) p(x|z1, z2) and the posterior q(z2|x) q(z1|x, z2), every conditional a diagonal Gaussian (the
    prior p(z2) is the model's ``prior``, given the top encoder q(z2|x)).

    ``latent_dim`` is the size of z = (z1, z2), the concatenation that :meth:`decode` takes and :meth:`encode` gives
    the posterior means of (z1's at z2's mean), so the pictures of a single-layer VAE work unchanged.
    """

    def __init__(
        self,
        top_encoder: nn.Module,
        bottom_encoder: nn.Module,
        conditional_prior: nn.Module,
        decoder: nn.Module,
        latent_dims: tuple[int, int],
        image_shape: tuple[int, int, int],
        prior: nn.Module,
        logvar_limits: tuple[float, float] | None = None,
    ):
        super().__init__()
        self.top_encoder = top_encoder  # x -> (mu, logvar) of z2
        self.bottom_encoder = bottom_encoder  # (x, z2) -> (mu, logvar) of z1
        self.conditional_prior = conditional_prior  # z2 -> (mu, logvar) of z1
        self.decoder = decoder  # (z1, z2) -> logits
        self.latent_dims = tuple(latent_dims)
        self.latent_dim = sum(latent_dims)
        self.image_shape = tuple(image_shape)
        self.prior = prior
        self.logvar_limits = logvar_limits

    has_closed_form_kl = False

    def encode_top(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z2|x)."""
        return self._gaussian(self.top_encoder, x)

    def _gaussian(self, network: nn.Module, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        return self._split(network(*inputs))

    def _split(self, output: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = output.chunk(2, dim=-1)
        return mu, _limited(logvar, self.logvar_limits)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior means and log-variances of z = (z1, z2): q(z2|x), and q(z1|x, z2) at z2's mean."""
        mu2, logvar2 = self.encode_top(x)
        mu1, logvar1 = self._gaussian(self.bottom_encoder, x, mu2)
        return torch.cat([mu1, mu2], -1), torch.cat([logvar1, logvar2], -1)

    def decode(self, z: Tensor) -> Tensor:
        """Pixel logits of p(x|z1, z2) for z = (z1, z2) [N, latent_dim]."""
        z1, z2 = z.split(self.latent_dims, dim=-1)
        return self.decoder(z1, z2)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What :meth:`latent_sample` needs of images ``x``, computed once for all samples: q(z2|x) and the features of
        x that q(z1|x, z2) starts from."""
        mu2, logvar2 = self.encode_top(x)
        return mu2, logvar2, self.bottom_encoder.first(x)

    def latent_sample(self, posterior: tuple[Tensor, Tensor, Tensor], eps: Tensor) -> LatentSample:
        """z2 ~ q(z2|x), then z1 ~ q(z1|x, z2), for the noise ``eps`` [k, B, latent_dim] (z1's noise, then z2's)."""
        mu2, logvar2, x_features = posterior
        k, batch = eps.shape[:2]
        eps1, eps2 = eps.split(self.latent_dims, dim=-1)
        z2 = (mu2 + eps2 * torch.exp(0.5 * logvar2)).flatten(0, 1)
        z2_features = self.bottom_encoder.second(z2)
        x_features = x_features.expand(k, *x_features.shape).flatten(0, 1).to(z2_features.dtype)
        mu1, logvar1 = self._split(self.bottom_encoder.joint(torch.cat([x_features, z2_features], -1)))
        z1 = mu1 + eps1.flatten(0, 1) * torch.exp(0.5 * logvar1)
        prior_mu1, prior_logvar1 = self._gaussian(self.conditional_prior, z2)
        logits = self.decoder(z1, z2).unflatten(0, (k, batch))
        log_q2 = log_standard_normal(eps2.float()) - 0.5 * logvar2.float().sum(-1)
        log_q1 = log_standard_normal(eps1.float()) - 0.5 * logvar1.float().sum(-1).unflatten(0, (k, batch))
        log_p1 = log_normal(z1.float(), prior_mu1.float(), prior_logvar1.float()).unflatten(0, (k, batch))
        log_p2 = self.prior.log_prob(z2, self.encode_top).unflatten(0, (k, batch))
        return LatentSample(logits, log_p1 + log_p2, log_q1 + log_q2)

    def forward(self, x: Tensor, generator: torch.Generator | None = None, eps: Tensor | None = None) -> VAEOutput:
        """One draw of (z1, z2) ~ q(z1, z2|x) (with noise ``eps`` [N, latent_dim] when given) and its decoding; mu and
        logvar are those of q(z1|x, z2) at the drawn z2, and of q(z2|x)."""
        mu2, logvar2 = self.encode_top(x)
        if eps is None:
            eps = torch.randn(x.shape[0], self.latent_dim, generator=generator, device=x.device, dtype=mu2.dtype)
        elif eps.shape != (x.shape[0], self.latent_dim):
            raise ValueError(f"eps must have shape {(x.shape[0], self.latent_dim)}, got {tuple(eps.shape)}")
        eps1, eps2 = eps.split(self.latent_dims, dim=-1)
        z2 = mu2 + eps2 * torch.exp(0.5 * logvar2)
        mu1, logvar1 = self._gaussian(self.bottom_encoder, x, z2)
        z1 = mu1 + eps1 * torch.exp(0.5 * logvar1)
        z = torch.cat([z1, z2], -1)
        return VAEOutput(self.decode(z), torch.cat([mu1, mu2], -1), torch.cat([logvar1, logvar2], -1), z)

    def frozen_prior(self) -> contextlib.AbstractContextManager:
        """A block in which p(z2) is computed once and reused (evaluation: the parameters must not change inside)."""
        return self.prior.frozen(self.encode_top)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of z = (z1, z2) ~ p(z2) p(z1|z2) [n, latent_dim], made with ``generator``."""
        z2 = self.prior.sample(n, self.encode_top, generator, device=_device_of(self))
        mu1, logvar1 = self._gaussian(self.conditional_prior, z2)
        eps1 = torch.randn(mu1.shape, generator=generator, device=mu1.device, dtype=mu1.dtype)
        return torch.cat([mu1 + eps1 * torch.exp(0.5 * logvar1), z2], -1)


class ServingVAE(VAE):
    """The VAE as served: the same networks and methods, but ``forward(x)`` returns the mean reconstructions.

    Model servers (MLflow's pyfunc ``predict()`` among them) need one tensor out of ``forward``.
    """

    @classmethod
    def of(cls, model: VAE) -> ServingVAE:
        """A CPU copy of ``model`` in eval mode (the caller's model is left as it is)."""
        serving = cls(
            copy.deepcopy(model.encoder), copy.deepcopy(model.decoder), model.latent_dim, model.image_shape,
            copy.deepcopy(model.prior), model.logvar_limits,
        )
        return serving.cpu().eval()

    def unwrap(self) -> VAE:
        """The plain :class:`VAE` of these networks (models pickled before priors existed get the standard normal)."""
        return VAE(self.encoder, self.decoder, self.latent_dim, self.image_shape, getattr(self, "prior", None), getattr(self, "logvar_limits", None))

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return self.reconstruct(x)


class ServingHierarchicalVAE(HierarchicalVAE):
    """The hierarchical VAE as served: ``forward(x)`` returns the mean reconstructions (see :class:`ServingVAE`)."""

    @classmethod
    def of(cls, model: HierarchicalVAE) -> ServingHierarchicalVAE:
        """A CPU copy of ``model`` in eval mode (the caller's model is left as it is)."""
        serving = cls(*(copy.deepcopy(part) for part in _hierarchical_parts(model)))
        return serving.cpu().eval()

    def unwrap(self) -> HierarchicalVAE:
        """The plain :class:`HierarchicalVAE` of these networks."""
        return HierarchicalVAE(*_hierarchical_parts(self))

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return self.reconstruct(x)


def serving_copy(model: VAE | HierarchicalVAE) -> ServingVAE | ServingHierarchicalVAE:
    """A CPU copy of ``model`` in eval mode whose ``forward(x)`` returns the mean reconstructions."""
    return ServingHierarchicalVAE.of(model) if isinstance(model, HierarchicalVAE) else ServingVAE.of(model)


def _hierarchical_parts(model: HierarchicalVAE) -> tuple:
    return (
        model.top_encoder, model.bottom_encoder, model.conditional_prior, model.decoder, model.latent_dims,
        model.image_shape, model.prior, model.logvar_limits,
    )


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


def build_model(config: ModelConfig, seed: int | None = None) -> VAE | HierarchicalVAE:
    """The VAE that ``config`` describes, its weights drawn with ``seed`` when given (without touching global RNG)."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        limits = tuple(config.logvar_limits) if config.logvar_limits is not None else None
        if config.stochastic_layers == 2:
            model = _hierarchical(config, limits)
        else:
            builder = _mlp if config.architecture == "mlp" else _conv
            encoder, decoder = builder(config)
            prior = None
            if config.prior != "standard_normal":
                prior = build_prior(config.prior, config.latent_dim, config.prior_components, config.image_shape)
            model = VAE(encoder, decoder, config.latent_dim, config.image_shape, prior, limits)
        _initialize(model, config.init)
    return model


def _hidden_layers(widths: tuple[int, ...], activation: str) -> list[nn.Module]:
    """Dense layers between consecutive ``widths``, each followed by a ReLU, or gated (see :class:`GatedDense`)."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths, widths[1:]):
        layers += [GatedDense(fan_in, fan_out)] if activation == "gated" else [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return layers


class GatedDense(nn.Module):
    """h * sigmoid(g) with h and g two linear maps of the input (Dauphin et al. 2017, as the VampPrior paper's MLPs use
    them), computed as one linear map to both."""

    def __init__(self, fan_in: int, fan_out: int):
        super().__init__()
        self.linear = nn.Linear(fan_in, 2 * fan_out)

    def forward(self, x: Tensor) -> Tensor:
        h, g = self.linear(x).chunk(2, dim=-1)
        return h * torch.sigmoid(g)


class _Joint(nn.Module):
    """Two inputs, each through one hidden layer, concatenated, then more layers: the HVAE's q(z1|x, z2) and p(x|z1, z2)."""

    def __init__(self, first: nn.Module, second: nn.Module, joint: nn.Module):
        super().__init__()
        self.first, self.second, self.joint = first, second, joint

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.joint(torch.cat([self.first(a), self.second(b)], dim=-1))


def _mlp(config: ModelConfig) -> tuple[nn.Module, nn.Module]:
    pixels = math.prod(config.image_shape)
    widths = (pixels, *config.hidden_dims)
    encoder: list[nn.Module] = [nn.Flatten(), *_hidden_layers(widths, config.activation)]
    encoder.append(nn.Linear(widths[-1], 2 * config.latent_dim))
    back = (config.latent_dim, *reversed(config.hidden_dims))
    decoder: list[nn.Module] = _hidden_layers(back, config.activation)
    decoder += [nn.Linear(back[-1], pixels), nn.Unflatten(1, config.image_shape)]
    return nn.Sequential(*encoder), nn.Sequential(*decoder)


def _hierarchical(config: ModelConfig, limits: tuple[float, float] | None) -> HierarchicalVAE:
    """The VampPrior paper's HVAE with every network's hidden layers ``hidden_dims`` wide: q(z2|x) and p(z1|z2) are
    MLPs; q(z1|x, z2) and p(x|z1, z2) take each input through one layer of hidden_dims[0] units, then the pair
    through the remaining layers."""
    pixels, hidden, act = math.prod(config.image_shape), config.hidden_dims, config.activation
    z1, z2 = config.latent_dim, config.top_latent_dim

    def joint(first_in: int, second_in: int, out: int, flatten_first: bool) -> _Joint:
        first = _hidden_layers((first_in, hidden[0]), act)
        rest = _hidden_layers((2 * hidden[0], *hidden[1:]), act)
        return _Joint(
            nn.Sequential(*([nn.Flatten()] if flatten_first else []), *first),
            nn.Sequential(*_hidden_layers((second_in, hidden[0]), act)),
            nn.Sequential(*rest, nn.Linear(2 * hidden[0] if len(hidden) == 1 else hidden[-1], out)),
        )

    top_encoder = nn.Sequential(nn.Flatten(), *_hidden_layers((pixels, *hidden), act), nn.Linear(hidden[-1], 2 * z2))
    bottom_encoder = joint(pixels, z2, 2 * z1, flatten_first=True)
    conditional_prior = nn.Sequential(*_hidden_layers((z2, *hidden), act), nn.Linear(hidden[-1], 2 * z1))
    decoder = joint(z1, z2, pixels, flatten_first=False)
    decoder.joint.append(nn.Unflatten(1, config.image_shape))
    prior = build_prior(config.prior, z2, config.prior_components, config.image_shape)
    return HierarchicalVAE(top_encoder, bottom_encoder, conditional_prior, decoder, (z1, z2), config.image_shape, prior, limits)


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


def _limited(logvar: Tensor, limits: tuple[float, float] | None) -> Tensor:
    """``logvar`` clipped to ``limits`` by a hard tanh (the VampPrior paper's heads: [-6, 2]), or as it is."""
    return logvar if limits is None else F.hardtanh(logvar, *limits)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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
