"""Priors p(z) of a latent layer: the standard normal, and the VampPrior, a mixture of the encoder's posteriors."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)

# An encoder as the priors see it: images [N, C, H, W] -> the mean and log-variance [N, latent] of q(z|x).
Encode = Callable[[Tensor], tuple[Tensor, Tensor]]


def log_normal(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, exp(logvar)) summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def log_standard_normal(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def log_normal_mixture(z: Tensor, means: Tensor, logvars: Tensor) -> Tensor:
    """log (1/C) sum_c N(z; means[c], exp(logvars[c])) for z [..., D] and C diagonal Gaussians ``means``, ``logvars``
    [C, D]: shape [...], in float32.

    The squared distances of every z to every component are expanded into three matrix products, so that memory is
    [..., C] and not [..., C, D]. The expansion cancels large terms when z is near a narrow component (in float32 an
    error of about 0.02 nats at std 0.05 and |z| ~ 10), so it runs in float64, outside any autocast.
    """
    with torch.autocast(z.device.type, enabled=False):
        flat, means, logvars = z.reshape(-1, z.shape[-1]).double(), means.double(), logvars.double()
        precisions = torch.exp(-logvars)  # [C, D]
        squared = (flat * flat) @ precisions.T - 2.0 * flat @ (means * precisions).T + (means * means * precisions).sum(-1)
        log_components = -0.5 * (squared + logvars.sum(-1) + z.shape[-1] * LOG_2PI)  # [N, C]
        log_density = torch.logsumexp(log_components, dim=-1) - math.log(means.shape[0])
    return log_density.float().reshape(z.shape[:-1])


class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I) over ``latent_dim`` dimensions (no parameters)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def log_prob(self, z: Tensor, encode: Encode | None = None) -> Tensor:
        """log p(z) in nats, summed over the last dimension (``encode`` is not needed)."""
        return log_standard_normal(z.float())

    @contextmanager
    def frozen(self, encode: Encode | None = None) -> Iterator[None]:
        """Nothing to hold fixed (see :meth:`VampPrior.frozen`)."""
        yield

    def sample(self, n: int, encode: Encode | None = None, generator: torch.Generator | None = None, *, device: torch.device | str = "cpu") -> Tensor:
        """``n`` draws [n, latent_dim] made with ``generator``."""
        return torch.randn(n, self.latent_dim, generator=generator, device=device)


class VampPrior(nn.Module):
    """p(z) = (1/C) sum_c q(z|u_c): the variational mixture of posteriors (Tomczak and Welling 2018).

    The C pseudo-inputs u_c are learned images, kept in [0, 1] by a hard tanh as in the paper's code, and initialized
    near 0.05 (std 0.01), as the paper's code does for binary MNIST. The encoder that maps them to the mixture's
    components is the model's own (of the top layer), passed in at every call: the prior holds no copy of it.
    """

    def __init__(self, components: int, image_shape: tuple[int, int, int], latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.pseudo_inputs = nn.Parameter(0.05 + 0.01 * torch.randn(components, *image_shape))
        self._frozen: tuple[Tensor, Tensor] | None = None

    @property
    def components(self) -> int:
        return self.pseudo_inputs.shape[0]

    def pseudo_images(self) -> Tensor:
        """The pseudo-inputs as images in [0, 1], [C, *image_shape]."""
        return F.hardtanh(self.pseudo_inputs, 0.0, 1.0)

    def mixture(self, encode: Encode) -> tuple[Tensor, Tensor]:
        """The means and log-variances [C, latent] of the mixture's components: q(z|u_c)."""
        if self._frozen is not None:
            return self._frozen
        means, logvars = encode(self.pseudo_images())
        return means.float(), logvars.float()

    @contextmanager
    def frozen(self, encode: Encode) -> Iterator[None]:
        """Inside, the mixture is computed once and reused: for evaluation, where the parameters do not change and
        encoding the C pseudo-inputs for every batch of samples would cost as much as a batch of C images."""
        self._frozen = self.mixture(encode)
        try:
            yield
        finally:
            self._frozen = None

    def log_prob(self, z: Tensor, encode: Encode) -> Tensor:
        """log p(z) in nats for z [..., latent], with ``encode`` the encoder of q(z|x)."""
        return log_normal_mixture(z, *self.mixture(encode))

    def sample(self, n: int, encode: Encode, generator: torch.Generator | None = None, *, device: torch.device | str = "cpu") -> Tensor:
        """``n`` draws [n, latent] on the pseudo-inputs' device: a component chosen uniformly, then z from it, both
        with ``generator`` (``device`` is ignored)."""
        means, logvars = self.mixture(encode)
        chosen = torch.randint(self.components, (n,), generator=generator, device=means.device)
        eps = torch.randn(n, self.latent_dim, generator=generator, device=means.device)
        return means[chosen] + eps * torch.exp(0.5 * logvars[chosen])


def build_prior(kind: str, latent_dim: int, components: int, image_shape: tuple[int, int, int]) -> nn.Module:
    """The prior a model config names: ``standard_normal`` or ``vamp``."""
    if kind == "standard_normal":
        return StandardNormalPrior(latent_dim)
    if kind == "vamp":
        return VampPrior(components, image_shape, latent_dim)
    raise ValueError(f"unknown prior {kind!r}; expected standard_normal or vamp")
