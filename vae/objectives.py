"""The ELBO as its terms in nats per image: reconstruction -log p(x|z) and KL(q(z|x) || p(z)), with beta and warm-up."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vae.config import ObjectiveConfig
from vae.models import VAEOutput

LOG_2PI = math.log(2 * math.pi)


class ElboTerms(NamedTuple):
    """Per-image terms in nats: ``elbo = -(reconstruction + kl)``; the loss weighs kl by beta (and warm-up)."""

    reconstruction: Tensor
    kl: Tensor


def log_normal(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, exp(logvar)) summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def log_standard_normal(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def reconstruction_nll(x: Tensor, logits: Tensor, likelihood: str, gaussian_std: float = 1.0) -> Tensor:
    """-log p(x|z) in nats per image, summed over the last three (C, H, W) dimensions.

    ``bernoulli``: sigmoid cross-entropy on the logits. ``gaussian``: a normal with mean sigmoid(logits) and fixed
    standard deviation, its normalizing constant included (so with std 1 it is the MATLAB example's
    0.5 * sum((x_hat - x)^2) plus 0.5 * log(2 pi) per pixel).
    """
    logits = logits.float()
    if likelihood == "bernoulli":
        per_pixel = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
    elif likelihood == "gaussian":
        per_pixel = 0.5 * ((x - torch.sigmoid(logits)) / gaussian_std).pow(2) + math.log(gaussian_std) + 0.5 * LOG_2PI
    else:
        raise ValueError(f"unknown likelihood {likelihood!r}; expected bernoulli or gaussian")
    return per_pixel.flatten(-3).sum(-1)


def kl_divergence(mu: Tensor, logvar: Tensor, z: Tensor | None = None, estimator: str = "analytic") -> Tensor:
    """KL(q(z|x) || N(0, I)) in nats per image: in closed form, or as the one-sample estimate log q(z|x) - log p(z)."""
    mu, logvar = mu.float(), logvar.float()
    if estimator == "analytic":
        return 0.5 * (mu.pow(2) + torch.exp(logvar) - 1.0 - logvar).sum(-1)
    if estimator == "monte_carlo":
        if z is None:
            raise ValueError("the monte_carlo KL estimate needs the sampled z")
        z = z.float()
        return log_normal(z, mu, logvar) - log_standard_normal(z)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected analytic or monte_carlo")


def elbo_terms(x: Tensor, output: VAEOutput, config: ObjectiveConfig) -> ElboTerms:
    """The reconstruction and KL terms of the ELBO for a batch, one value per image."""
    return ElboTerms(
        reconstruction_nll(x, output.logits, config.likelihood, config.gaussian_std),
        kl_divergence(output.mu, output.logvar, output.z, config.kl),
    )


def training_loss(terms: ElboTerms, weight: float, images: float | None = None) -> Tensor:
    """The loss a training step minimizes: the negative ELBO with its KL term weighted, (reconstruction + weight * KL)
    summed over the batch and divided by ``images`` (default: the batch size, so the batch mean in nats).

    With ``weight`` 1 this is the negative ELBO per image; :func:`kl_weight` gives beta, ramped over any warm-up.
    Training spread over processes divides each process's sum by the whole batch's share per process (see
    :func:`vae.engine.fit`).
    """
    per_image = terms.reconstruction + weight * terms.kl
    return per_image.sum() / (len(per_image) if images is None else images)


def kl_weight(config: ObjectiveConfig, progress_epochs: float) -> float:
    """beta, ramped linearly from 0 over the first ``kl_warmup_epochs`` (progress counted in fractional epochs)."""
    if config.kl_warmup_epochs <= 0:
        return config.beta
    return config.beta * min(1.0, progress_epochs / config.kl_warmup_epochs)
