"""Specification of the ELBO terms: each is the textbook formula, in nats per image."""

import math

import pytest
import torch

from vae.config import ObjectiveConfig
from vae.models import VAEOutput
from vae.objectives import ElboTerms, elbo_terms, kl_divergence, kl_weight, log_normal, reconstruction_nll, training_loss

generator = torch.Generator().manual_seed(0)
X = torch.bernoulli(torch.full((3, 1, 28, 28), 0.3), generator=generator)
LOGITS = torch.randn(3, 1, 28, 28, generator=generator)


def test_bernoulli_reconstruction_is_summed_binary_cross_entropy():
    p = torch.sigmoid(LOGITS).double()
    expected = -(X * p.log() + (1 - X) * (1 - p).log()).sum((1, 2, 3))
    torch.testing.assert_close(reconstruction_nll(X, LOGITS, "bernoulli").double(), expected, rtol=1e-5, atol=1e-4)


def test_gaussian_reconstruction_is_half_squared_error_plus_the_normalizing_constant():
    sse = 0.5 * (X - torch.sigmoid(LOGITS)).pow(2).sum((1, 2, 3))
    torch.testing.assert_close(reconstruction_nll(X, LOGITS, "gaussian", 1.0), sse + 784 * 0.5 * math.log(2 * math.pi))
    halved = 0.5 * ((X - torch.sigmoid(LOGITS)) / 0.5).pow(2).sum((1, 2, 3)) + 784 * (math.log(0.5) + 0.5 * math.log(2 * math.pi))
    torch.testing.assert_close(reconstruction_nll(X, LOGITS, "gaussian", 0.5), halved)


def test_reconstruction_broadcasts_over_leading_sample_dimensions():
    stacked = torch.stack([LOGITS, LOGITS + 1])
    nll = reconstruction_nll(X, stacked, "bernoulli")
    assert nll.shape == (2, 3)
    torch.testing.assert_close(nll[1], reconstruction_nll(X, LOGITS + 1, "bernoulli"))


def test_analytic_kl_is_the_closed_form_and_zero_at_the_prior():
    mu, logvar = torch.tensor([[0.5, -1.0]]), torch.tensor([[math.log(2.0), 0.0]])
    expected = 0.5 * ((0.25 + 2.0 - 1 - math.log(2.0)) + (1.0 + 1.0 - 1 - 0.0))
    assert kl_divergence(mu, logvar).item() == pytest.approx(expected)
    assert kl_divergence(torch.zeros(4, 3), torch.zeros(4, 3)).tolist() == [0.0] * 4


def test_monte_carlo_kl_is_log_q_minus_log_p_and_unbiased():
    mu, logvar = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[math.log(2.0), -1.0, 0.3]])
    z = mu + torch.randn(400_000, 3, generator=torch.Generator().manual_seed(1)) * (0.5 * logvar).exp()
    estimate = kl_divergence(mu.expand_as(z), logvar.expand_as(z), z, "monte_carlo")
    standard_error = estimate.std().item() / math.sqrt(len(estimate))
    assert abs(estimate.mean().item() - kl_divergence(mu, logvar).item()) < 4 * standard_error
    torch.testing.assert_close(estimate[:5], log_normal(z[:5], mu, logvar) + 0.5 * (math.log(2 * math.pi) + z[:5].pow(2)).sum(-1))


def test_monte_carlo_kl_without_z_is_an_error():
    with pytest.raises(ValueError, match="needs the sampled z"):
        kl_divergence(torch.zeros(1, 2), torch.zeros(1, 2), None, "monte_carlo")


def test_elbo_terms_follow_the_objective_config():
    mu, logvar, z = torch.zeros(3, 2), torch.zeros(3, 2), torch.ones(3, 2)
    output = VAEOutput(LOGITS, mu, logvar, z)
    analytic = elbo_terms(X, output, ObjectiveConfig())
    monte_carlo = elbo_terms(X, output, ObjectiveConfig(kl="monte_carlo"))
    torch.testing.assert_close(analytic.reconstruction, reconstruction_nll(X, LOGITS, "bernoulli"))
    assert analytic.kl.tolist() == [0.0] * 3
    torch.testing.assert_close(monte_carlo.kl, torch.zeros(3))  # log N(1; 0, 1) - log N(1; 0, 1)


def test_kl_weight_ramps_linearly_over_the_warm_up_then_stays_at_beta():
    config = ObjectiveConfig(beta=2.0, kl_warmup_epochs=4)
    assert [kl_weight(config, e) for e in (0, 1, 2, 4, 10)] == [0.0, 0.5, 1.0, 2.0, 2.0]
    assert kl_weight(ObjectiveConfig(beta=0.5), 0) == 0.5


def test_the_training_loss_is_the_batch_mean_of_reconstruction_plus_weighted_kl():
    terms = ElboTerms(reconstruction=torch.tensor([1.0, 2.0]), kl=torch.tensor([3.0, 5.0]))

    assert training_loss(terms, weight=1.0).item() == (1.0 + 3.0 + 2.0 + 5.0) / 2  # the negative ELBO per image
    assert training_loss(terms, weight=0.5).item() == (1.0 + 1.5 + 2.0 + 2.5) / 2
    assert training_loss(terms, weight=0.5, images=4).item() == (1.0 + 1.5 + 2.0 + 2.5) / 4  # a shard of 4 images
