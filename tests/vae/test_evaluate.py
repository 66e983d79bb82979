"""Specifications of vae.evaluate: the test-set ELBO and the importance-weighted (IWAE) log-likelihood bound."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli, Normal

from vae.config import ModelConfig, ObjectiveConfig
from vae.data import ImageSet
from vae.evaluate import evaluate_elbo, iwae_bound
from vae.models import VAE, build_model
from vae.objectives import elbo_terms

BERNOULLI = ObjectiveConfig()
PIXELS = 28 * 28
# Per-image values are float32 sums of 784 pixel terms, averaged in float64: two computations that differ only in
# the order of float32 operations agree to about 1e-7 relative.
FLOAT_RTOL = 1e-6


def random_images(n: int, seed: int, p: float = 0.3) -> ImageSet:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.bernoulli(torch.full((n, 1, 28, 28), p), generator=generator)
    return ImageSet(pixels, torch.zeros(n, dtype=torch.long))


def small_model(latent_dim: int = 3) -> VAE:
    return build_model(ModelConfig(architecture="mlp", latent_dim=latent_dim, hidden_dims=(16,)), seed=0)


def mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    return tensor.mean().item(), (tensor.std() / math.sqrt(len(values))).item()


class PriorEncoder(nn.Module):
    """q(z|x) = N(0, I) = p(z) for every image; records the training flag it ran under."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return x.new_zeros(x.shape[0], 2 * self.latent_dim)


class FixedLogitsDecoder(nn.Module):
    """p(x|z) independent of z; records the number of latents of each call."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits)
        self.rows: list[int] = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        assert z.ndim == 2
        self.rows.append(z.shape[0])
        return self.logits.expand(z.shape[0], *self.logits.shape)


def prior_model(latent_dim: int = 2) -> VAE:
    """A VAE whose posterior is the prior and whose decoder ignores z: log p(x) = log p(x|any z) exactly."""
    logits = torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(5))
    return VAE(PriorEncoder(latent_dim), FixedLogitsDecoder(logits), latent_dim, (1, 28, 28))


def fit(model: VAE, data: ImageSet, steps: int, lr: float) -> None:
    """Adam on the negative ELBO of the whole set, written out (torch.optim would import torch._dynamo, ~1 s)."""
    parameters = list(model.parameters())
    first = [torch.zeros_like(p) for p in parameters]
    second = [torch.zeros_like(p) for p in parameters]
    noise = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        terms = elbo_terms(data.pixels, model(data.pixels, generator=noise), BERNOULLI)
        gradients = torch.autograd.grad((terms.reconstruction + terms.kl).mean(), parameters)
        with torch.no_grad():
            for p, g, m, v in zip(parameters, gradients, first, second):
                m.lerp_(g, 0.1)
                v.lerp_(g * g, 0.001)
                p -= lr * (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-8)


@pytest.fixture(scope="module")
def trained_1d() -> tuple[VAE, ImageSet, float]:
    """A VAE with a one-dimensional latent fitted to noisy copies of 4 prototypes, its data, and exact mean log p(x).

    With one latent dimension log p(x) = log of the integral of p(x|z) p(z) dz is a quadrature on a grid of 4001
    points over [-10, 10]. The posteriors have std ~0.1 (~20 grid points per std); the value agrees within 2e-5
    with a 64001-point grid and a float64 decoder.
    """
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.where(torch.rand(4, 1, 28, 28, generator=generator) < 0.5, 0.1, 0.9)
    labels = torch.arange(64) % 4
    data = ImageSet(torch.bernoulli(prototypes[labels], generator=generator), labels)
    model = build_model(ModelConfig(latent_dim=1, hidden_dims=(32,)), seed=0)
    fit(model, data, steps=300, lr=3e-3)
    with torch.no_grad():
        z = torch.linspace(-10.0, 10.0, 4001).unsqueeze(1)
        logits = model.decode(z).flatten(1).double()
        x = data.pixels.flatten(1).double()
        log_likelihood = x @ F.logsigmoid(logits).T + (1 - x) @ F.logsigmoid(-logits).T  # [images, grid]
        log_prior = Normal(0.0, 1.0).log_prob(z.double().squeeze(1))
        log_px = torch.logsumexp(log_likelihood + log_prior, dim=1) + math.log(20.0 / 4000)
    return model, data, log_px.mean().item()


# --- evaluate_elbo -------------------------------------------------------------------------------------------------


def test_elbo_equals_a_direct_computation_with_the_same_noise():
    model, data = small_model(), random_images(40, seed=1)
    result = evaluate_elbo(model, data, BERNOULLI, batch_size=25, seed=3)

    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        mu, logvar = model.encode(data.pixels)
        # Two batches (25 + 15 images), each drawing its noise in turn from the one generator.
        eps = torch.cat([torch.randn(25, 3, generator=generator), torch.randn(15, 3, generator=generator)])
        logits = model.decode(mu + eps * torch.exp(0.5 * logvar))
        reconstruction = -Bernoulli(logits=logits).log_prob(data.pixels).sum((1, 2, 3))
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)

    assert result["reconstruction_nats"] == pytest.approx(reconstruction.mean().item(), rel=FLOAT_RTOL)
    assert result["kl_nats"] == pytest.approx(kl.mean().item(), rel=FLOAT_RTOL)


def test_elbo_is_minus_reconstruction_plus_kl_exactly():
    result = evaluate_elbo(small_model(), random_images(30, seed=1), BERNOULLI, batch_size=8)
    assert result["elbo_nats"] == -(result["reconstruction_nats"] + result["kl_nats"])


def test_elbo_is_the_true_bound_whatever_beta_and_warmup_training_used():
    model, data = small_model(), random_images(30, seed=1)
    weighted = ObjectiveConfig(beta=0.1, kl_warmup_epochs=5.0)
    assert evaluate_elbo(model, data, weighted) == evaluate_elbo(model, data, BERNOULLI)


def test_analytic_kl_does_not_depend_on_batch_size_or_seed():
    model, data = small_model(), random_images(30, seed=1)
    reference = evaluate_elbo(model, data, BERNOULLI, batch_size=30, seed=0)["kl_nats"]
    for batch_size, seed in [(1, 0), (7, 1), (500, 2)]:
        kl = evaluate_elbo(model, data, BERNOULLI, batch_size=batch_size, seed=seed)["kl_nats"]
        assert kl == pytest.approx(reference, rel=FLOAT_RTOL)


def test_elbo_of_a_point_mass_posterior_does_not_depend_on_batch_size_or_seed():
    model, data = small_model(), random_images(30, seed=1)
    head = model.encoder[-1]  # Linear(16, 2 * latent): mu rows then logvar rows
    with torch.no_grad():
        head.weight[3:] = 0.0
        head.bias[3:] = -60.0  # std = e^-30: mu + std * eps rounds to mu in float32, so the noise has no effect
    reference = evaluate_elbo(model, data, BERNOULLI, batch_size=30, seed=0)
    for batch_size, seed in [(1, 0), (7, 1), (500, 2)]:
        result = evaluate_elbo(model, data, BERNOULLI, batch_size=batch_size, seed=seed)
        assert result == pytest.approx(reference, rel=FLOAT_RTOL)


# --- iwae_bound ----------------------------------------------------------------------------------------------------


def test_iwae_with_one_sample_equals_the_monte_carlo_elbo_drawn_with_the_same_noise():
    model, data = small_model(), random_images(30, seed=1)
    iwae = iwae_bound(model, data, BERNOULLI, samples=1, batch_size=8, seed=4)["iwae_nats"]
    elbo = evaluate_elbo(model, data, ObjectiveConfig(kl="monte_carlo"), batch_size=8, seed=4)["elbo_nats"]
    assert iwae == pytest.approx(elbo, rel=FLOAT_RTOL)


def test_iwae_with_one_sample_equals_the_analytic_elbo_in_expectation(trained_1d):
    model, data, _ = trained_1d
    # Independent seeds for the two estimates: the differences are i.i.d. with mean 0, so |mean| < 4 standard
    # errors fails with probability ~6e-5. The KL here is ~5 nats, so dropping log p(z) - log q(z|x) would fail.
    differences = [
        iwae_bound(model, data, BERNOULLI, samples=1, seed=seed)["iwae_nats"]
        - evaluate_elbo(model, data, BERNOULLI, seed=1000 + seed)["elbo_nats"]
        for seed in range(20)
    ]
    mean, standard_error = mean_and_standard_error(differences)
    assert abs(mean) < 4 * standard_error


def test_iwae_bound_grows_with_the_number_of_samples():
    # An untrained model's posterior is far from the true one, so the gaps between k are large against the Monte
    # Carlo error: each step up must exceed 4 standard errors of the difference of the two means.
    model, data = small_model(), random_images(64, seed=1)
    estimates = {
        k: mean_and_standard_error(
            [iwae_bound(model, data, BERNOULLI, samples=k, seed=seed)["iwae_nats"] for seed in range(8)]
        )
        for k in (1, 10, 100)
    }
    for lower, higher in [(1, 10), (10, 100)]:
        (mean_low, se_low), (mean_high, se_high) = estimates[lower], estimates[higher]
        assert mean_high - mean_low > 4 * math.hypot(se_low, se_high)


def test_iwae_bound_approaches_the_exact_log_likelihood_from_below(trained_1d):
    model, data, log_px = trained_1d
    mean, standard_error = mean_and_standard_error(
        [iwae_bound(model, data, BERNOULLI, samples=300, seed=seed)["iwae_nats"] for seed in range(8)]
    )
    elbo_gap = log_px - evaluate_elbo(model, data, BERNOULLI)["elbo_nats"]  # ~0.27 nats here
    # A lower bound in expectation: not above log p(x) by more than 4 standard errors (plus 1e-4 for the quadrature).
    assert mean <= log_px + 4 * standard_error + 1e-4
    # And a tight one: with 300 samples the remaining gap is well under a tenth of the ELBO's.
    assert log_px - mean < 0.1 * elbo_gap


@pytest.mark.parametrize("chunk_size", [1, 7, 32, 33, 100, 1000])
def test_chunk_size_does_not_change_the_bound(chunk_size):
    model, data = small_model(), random_images(24, seed=1)
    reference = iwae_bound(model, data, BERNOULLI, samples=100, chunk_size=100, batch_size=10, seed=2)
    result = iwae_bound(model, data, BERNOULLI, samples=100, chunk_size=chunk_size, batch_size=10, seed=2)
    # The same noise per (sample, image) whatever the chunking; only float32 rounding of the decoder and of the
    # log-sum-exp order differ.
    assert result == pytest.approx(reference, rel=FLOAT_RTOL)


def test_nll_and_bits_per_dim_are_derived_from_the_bound_exactly():
    result = iwae_bound(small_model(), random_images(12, seed=1), BERNOULLI, samples=5)
    assert result["iwae_nats"] < 0
    assert result["nll_nats"] == -result["iwae_nats"]
    assert result["bits_per_dim"] == result["nll_nats"] / (PIXELS * math.log(2))
    assert result["samples"] == 5


def test_decoder_sees_at_most_chunk_size_times_batch_size_latents():
    model = prior_model()
    iwae_bound(model, random_images(25, seed=1), BERNOULLI, samples=20, chunk_size=7, batch_size=10)
    # 3 batches (10, 10, 5 images) x 3 chunks (7, 7, 6 samples).
    assert model.decoder.rows == [70, 70, 60, 70, 70, 60, 35, 35, 30]


@pytest.mark.parametrize("samples", [1, 5, 100])
def test_posterior_equal_to_prior_gives_the_exact_log_likelihood_for_any_k(samples):
    # q = p(z) and p(x|z) = p(x): every weight is p(x), so the bound is log p(x) exactly for every k.
    model, data = prior_model(), random_images(20, seed=1)
    log_px = Bernoulli(logits=model.decoder.logits.detach()).log_prob(data.pixels).sum((1, 2, 3)).mean().item()
    result = iwae_bound(model, data, BERNOULLI, samples=samples, chunk_size=7, batch_size=8)
    assert result["iwae_nats"] == pytest.approx(log_px, rel=FLOAT_RTOL)
    elbo = evaluate_elbo(model, data, BERNOULLI, batch_size=8)
    assert elbo["kl_nats"] == 0.0
    assert elbo["elbo_nats"] == pytest.approx(log_px, rel=FLOAT_RTOL)


def test_gaussian_likelihood_gives_the_exact_log_likelihood_of_the_prior_model():
    model, data = prior_model(), random_images(20, seed=1)
    gaussian = ObjectiveConfig(likelihood="gaussian", gaussian_std=0.5)
    mean_image = torch.sigmoid(model.decoder.logits.detach())
    log_px = Normal(mean_image, 0.5).log_prob(data.pixels).sum((1, 2, 3)).mean().item()
    result = iwae_bound(model, data, gaussian, samples=10)
    assert math.isfinite(result["iwae_nats"])
    assert result["iwae_nats"] == pytest.approx(log_px, rel=FLOAT_RTOL)
    assert evaluate_elbo(model, data, gaussian)["elbo_nats"] == pytest.approx(log_px, rel=FLOAT_RTOL)


# --- both ----------------------------------------------------------------------------------------------------------


def run_elbo(model: VAE, data: ImageSet, seed: int = 0) -> dict[str, float]:
    return evaluate_elbo(model, data, BERNOULLI, batch_size=8, seed=seed)


def run_iwae(model: VAE, data: ImageSet, seed: int = 0) -> dict[str, float]:
    return iwae_bound(model, data, BERNOULLI, samples=10, chunk_size=4, batch_size=8, seed=seed)


@pytest.mark.parametrize("evaluate", [run_elbo, run_iwae])
@pytest.mark.parametrize("resample", [False, True])
def test_same_seed_is_bit_identical_and_another_seed_differs(evaluate, resample):
    # With resample the generator also draws the binarization of every batch.
    pixels = random_images(20, seed=1).pixels
    labels = torch.zeros(20, dtype=torch.long)
    data = ImageSet(pixels * 0.8 + 0.1, labels, resample=True) if resample else ImageSet(pixels, labels)
    model = small_model()
    first, again, other = evaluate(model, data, seed=7), evaluate(model, data, seed=7), evaluate(model, data, seed=8)
    assert first == again
    assert first != other


@pytest.mark.parametrize("evaluate", [run_elbo, run_iwae])
def test_runs_in_eval_mode_and_restores_every_training_flag(evaluate):
    model = prior_model()
    model.train()
    model.decoder.eval()
    evaluate(model, random_images(10, seed=1))
    assert model.encoder.seen_training and not any(model.encoder.seen_training)
    assert model.training and model.encoder.training and not model.decoder.training


@pytest.mark.parametrize(
    ("call", "message"),
    [  # (m, d): a small model and 4 images; each message whole, so that one error cannot pass for another
        pytest.param(lambda m, d: iwae_bound(m, d, BERNOULLI, samples=0), "samples must be at least 1, got 0", id="samples=0"),
        pytest.param(lambda m, d: iwae_bound(m, d, BERNOULLI, samples=-3), "samples must be at least 1, got -3", id="samples=-3"),
        pytest.param(
            lambda m, d: iwae_bound(m, d, BERNOULLI, samples=5, chunk_size=0), "chunk_size must be at least 1, got 0", id="chunk=0"
        ),
        pytest.param(
            lambda m, d: iwae_bound(m, d, BERNOULLI, samples=5, batch_size=0), "batch_size must be at least 1, got 0", id="batch=0"
        ),
        pytest.param(
            lambda m, d: evaluate_elbo(m, d, BERNOULLI, batch_size=0), "batch_size must be at least 1, got 0", id="elbo-batch=0"
        ),
        pytest.param(
            lambda m, d: evaluate_elbo(m, d.subset(slice(0, 0)), BERNOULLI), "data must hold at least one image", id="elbo-empty"
        ),
        pytest.param(
            lambda m, d: iwae_bound(m, d.subset(slice(0, 0)), BERNOULLI, samples=1), "data must hold at least one image", id="iwae-empty"
        ),
        pytest.param(
            lambda m, d: iwae_bound(m, ImageSet(d.pixels[..., :14, :14], d.labels), BERNOULLI, samples=1),
            "data images have shape (1, 14, 14), the model expects (1, 28, 28)",
            id="image-shape-mismatch",
        ),
        pytest.param(
            lambda m, d: evaluate_elbo(m, d.to("meta"), BERNOULLI),
            "model is on cpu but data is on meta; move them to one device",
            id="devices-differ",
        ),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call(small_model(), random_images(4, seed=1))
