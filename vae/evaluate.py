"""Test-set ELBO and the importance-weighted (IWAE) log-likelihood bound, in nats per image and bits per dimension."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from vae.config import ObjectiveConfig
from vae.data import ImageSet
from vae.models import VAE, HierarchicalVAE, eval_mode
from vae.objectives import ElboTerms, elbo_terms, log_importance_weights, sampled_elbo_terms
from vae.progress import progress as progress_of

# The IWAE noise of a batch is drawn in blocks of this many samples, whatever the chunk size, so that the noise of
# sample i of image j (and hence the bound, up to float rounding) does not depend on how the samples are chunked.
NOISE_BLOCK = 32


Model = VAE | HierarchicalVAE


def uses_sampled_terms(model: Model, objective: ObjectiveConfig) -> bool:
    """Whether the objective's terms come from :meth:`latent_sample` (the importance-weighted bound, or a model without
    a closed-form KL: a learned prior or two stochastic layers) rather than from one pass of the model's forward.

    Raises ValueError when the ELBO's analytic KL is asked of a model that has none.
    """
    _check_kl(model, objective)
    return objective.bound == "iwae" or not model.has_closed_form_kl


def _check_kl(model: Model, objective: ObjectiveConfig) -> None:
    if not model.has_closed_form_kl and objective.bound == "elbo" and objective.kl == "analytic":
        raise ValueError(
            "objective.kl='analytic' needs one stochastic layer under the standard normal prior: this model has no "
            "closed-form KL; use objective.kl='monte_carlo' (or objective.bound='iwae')"
        )


def evaluate_elbo(
    model: Model, data: ImageSet, objective: ObjectiveConfig, *, batch_size: int = 500, seed: int = 0
) -> dict[str, float]:
    """The ELBO of ``data`` and its two terms, as means in nats per image over the whole set.

    ``elbo_nats = -(reconstruction_nats + kl_nats)`` exactly: beta is 1 whatever training used, so this is the true
    bound. The likelihood and the KL estimator are the ``objective``'s; a model without a closed-form KL (a learned
    prior, two stochastic layers) takes the one-sample Monte Carlo KL over all its layers.
    Batches are taken in order with one generator on the data's device, seeded with ``seed``, which draws any
    binarization and the reparameterization noise; the model is evaluated in eval mode and its training flags are
    restored afterwards.
    """
    _check_positive(batch_size=batch_size)
    _check_inputs(model, data)
    _check_kl(model, objective)
    sampled = not model.has_closed_form_kl
    generator = torch.Generator(device=data.device).manual_seed(seed)
    reconstruction, kl = _Mean(data.device), _Mean(data.device)
    with eval_mode(model), torch.inference_mode(), _frozen_prior(model):
        for start in range(0, len(data), batch_size):
            x = data.batch(slice(start, start + batch_size), generator)
            if sampled:
                noise = torch.randn(1, x.shape[0], model.latent_dim, generator=generator, device=x.device)
                sample = model.latent_sample(model.posterior(x), noise)
                terms = ElboTerms(*(term.squeeze(0) for term in sampled_elbo_terms(x, sample, objective)))
            else:
                terms = elbo_terms(x, model(x, generator=generator), objective)
            reconstruction.update(terms.reconstruction)
            kl.update(terms.kl)
        reconstruction_nats, kl_nats = reconstruction.compute(), kl.compute()
    elbo_nats = -(reconstruction_nats + kl_nats)
    return {"elbo_nats": elbo_nats, "reconstruction_nats": reconstruction_nats, "kl_nats": kl_nats}


def iwae_bound(
    model: Model,
    data: ImageSet,
    objective: ObjectiveConfig,
    *,
    samples: int,
    chunk_size: int = 32,
    batch_size: int = 100,
    seed: int = 0,
    progress: bool | None = None,
) -> dict[str, float]:
    """The importance-weighted bound log p(x) >= E[log (1/k) sum_i w_i] of Burda et al. (2015), mean per image.

    ``w_i = p(x|z_i) p(z_i) / q(z_i|x)`` with ``z_i ~ q(z|x)``, ``k = samples``; q is the model's posterior (whatever
    KL estimator the objective trains with; for two stochastic layers the joint q(z1, z2|x), the weights over both
    layers' latents) and p(x|z) the objective's likelihood. Returns ``iwae_nats`` (the bound,
    negative), ``nll_nats = -iwae_nats``, ``bits_per_dim = nll_nats / (D ln 2)`` with D = C*H*W, and ``samples``.

    Each batch is encoded once (what of q depends on x alone); its samples are decoded ``chunk_size`` at a time
    ([chunk * batch, latent] at once) and folded into a running log-sum-exp, so memory is bounded by
    ``chunk_size * batch_size`` decoded images. The noise comes from one generator seeded with ``seed`` in a fixed
    order that does not depend on ``chunk_size``; with ``samples=1`` the draws are exactly those of
    :func:`evaluate_elbo` at the same ``batch_size`` and ``seed``. ``progress`` as in :func:`vae.progress.progress`
    (by default a bar on a terminal, else a line now and then).
    """
    _check_positive(samples=samples, chunk_size=chunk_size, batch_size=batch_size)
    _check_inputs(model, data)
    generator = torch.Generator(device=data.device).manual_seed(seed)
    bound = _Mean(data.device)
    log_k = math.log(samples)
    report = progress_of(len(data), f"IWAE bound (k={samples})", "images", enabled=progress)
    with eval_mode(model), torch.inference_mode(), _frozen_prior(model), report as done:
        for start in range(0, len(data), batch_size):
            x = data.batch(slice(start, start + batch_size), generator)
            posterior = model.posterior(x)
            noise = _BlockNoise(samples, (x.shape[0], model.latent_dim), x.device, generator)
            log_sum = torch.full(x.shape[:1], -math.inf, device=x.device)
            for first in range(0, samples, chunk_size):
                eps = noise.take(first, min(first + chunk_size, samples))
                log_w = log_importance_weights(sampled_elbo_terms(x, model.latent_sample(posterior, eps), objective))
                log_sum = torch.logaddexp(log_sum, torch.logsumexp(log_w, dim=0))
            bound.update(log_sum - log_k)
            done.update(len(x))
        iwae_nats = bound.compute()
    nll_nats = -iwae_nats
    dims = math.prod(data.pixels.shape[1:])
    bits_per_dim = nll_nats / (dims * math.log(2))
    return {"iwae_nats": iwae_nats, "nll_nats": nll_nats, "bits_per_dim": bits_per_dim, "samples": samples}


class _BlockNoise:
    """Standard normal noise [samples, B, latent] for one batch, drawn in order in blocks of NOISE_BLOCK samples."""

    def __init__(self, samples: int, shape: tuple[int, int], device: torch.device, generator: torch.Generator):
        self.samples, self.shape, self.device, self.generator = samples, shape, device, generator
        self.index, self.block = -1, torch.empty(0, device=device)

    def take(self, start: int, stop: int) -> Tensor:
        """The noise of samples [start, stop); calls must cover consecutive ranges in increasing order."""
        pieces = []
        for index in range(start // NOISE_BLOCK, (stop - 1) // NOISE_BLOCK + 1):
            if index != self.index:  # the next block: only the latest one is kept
                size = min(NOISE_BLOCK, self.samples - index * NOISE_BLOCK)
                self.block = torch.randn((size, *self.shape), generator=self.generator, device=self.device)
                self.index = index
            offset = index * NOISE_BLOCK
            pieces.append(self.block[max(start - offset, 0) : stop - offset])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class _Mean:
    """The mean of every value passed to :meth:`update`, summed on the device (no host sync per batch) in float64,
    or float32 where the device has no float64 (MPS). A NaN shows in the result.

    torchmetrics' MeanMetric computes the same sum in the same order, but importing torchmetrics (which brings
    scipy.signal and pyplot) took 1.3 s of CPU here, as long as importing torch, in every process that trains or
    evaluates; and this mean must not be synchronized across a torchrun process group anyway (only rank 0 evaluates).
    """

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
        self.count = 0

    def update(self, values: Tensor) -> None:
        self.total += values.to(self.total.dtype).sum()
        self.count += values.numel()

    def compute(self) -> float:
        return (self.total / self.count).item()


def _frozen_prior(model: Model) -> contextlib.AbstractContextManager:
    """p(z) computed once for the whole evaluation (a learned prior's encoded pseudo-inputs), where the model has one."""
    return model.frozen_prior() if hasattr(model, "frozen_prior") else contextlib.nullcontext()


def _check_positive(**arguments: int) -> None:
    for name, value in arguments.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def _check_inputs(model: Model, data: ImageSet) -> None:
    if len(data) == 0:
        raise ValueError("data must hold at least one image")
    if tuple(data.pixels.shape[1:]) != tuple(model.image_shape):
        shape = tuple(data.pixels.shape[1:])
        raise ValueError(f"data images have shape {shape}, the model expects {model.image_shape}")
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device != data.device:
        raise ValueError(f"model is on {parameter.device} but data is on {data.device}; move them to one device")
