"""The bounds trained on, in nats per image: the ELBO as its terms, reconstruction -log p(x|z) and KL(q(z|x) || p(z)),
with beta and warm-up; and the importance-weighted bound of Burda et al. (2015) over k samples of the latents."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vae.config import ObjectiveConfig
from vae.models import LatentSample, VAEOutput
from vae.priors import LOG_2PI, log_normal, log_standard_normal  # noqa: F401 (log densities used with the ELBO terms)


class ElboTerms(NamedTuple):
    """Per-image terms in nats: ``elbo = -(reconstruction + kl)``; the loss weighs kl by beta (and warm-up)."""

    reconstruction: Tensor
    kl: Tensor


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


def sampled_elbo_terms(x: Tensor, sample: LatentSample, config: ObjectiveConfig) -> ElboTerms:
    """The ELBO's terms for each of k samples z_i ~ q(z|x) of B images, [k, B]: the reconstruction -log p(x|z_i) and
    the one-sample Monte Carlo KL log q(z_i|x) - log p(z_i) (over every stochastic layer). Their means over the
    samples estimate the ELBO's terms; they also make the importance weights (:func:`log_importance_weights`)."""
    reconstruction = reconstruction_nll(x, sample.logits, config.likelihood, config.gaussian_std)
    return ElboTerms(reconstruction, sample.log_posterior - sample.log_prior)


def log_importance_weights(terms: ElboTerms, kl_weight: float | Tensor = 1.0) -> Tensor:
    """log w_i = -(reconstruction_i + kl_weight * kl_i) = log p(x|z_i) + kl_weight * (log p(z_i) - log q(z_i|x)) from
    the per-sample terms of :func:`sampled_elbo_terms`, [k, B].

    With ``kl_weight`` 1 these are the importance weights of log p(x); a smaller weight is the beta-weighted (or
    warming up) version, whose one-sample mean is the beta-weighted ELBO.
    """
    return -(terms.reconstruction + kl_weight * terms.kl)


def iwae_bound_per_image(log_weights: Tensor) -> Tensor:
    """log (1/k) sum_i w_i per image, [B], from log weights [k, B]: the importance-weighted bound on log p(x)."""
    return torch.logsumexp(log_weights, dim=0) - math.log(log_weights.shape[0])


def iwae_training_loss(terms: ElboTerms, weight: float | Tensor, images: float | None = None) -> Tensor:
    """The loss a training step on the importance-weighted bound minimizes, from the per-sample terms [k, B] of
    :func:`sampled_elbo_terms`: minus each image's bound log (1/k) sum_i w_i (its KL terms weighted by ``weight``),
    summed over the batch and divided by ``images`` (default: the batch size), as :func:`training_loss` divides.

    With k = 1 it is :func:`training_loss` of those terms: the negative one-sample Monte Carlo ELBO.
    """
    per_image = -iwae_bound_per_image(log_importance_weights(terms, weight))
    return per_image.sum() / (per_image.shape[0] if images is None else images)
