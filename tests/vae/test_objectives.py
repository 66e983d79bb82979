"""Specification of the objectives: each ELBO term is the textbook formula, in nats per image, and the
importance-weighted bound is the log mean of the weights, the ELBO itself with one sample."""

import math

import pytest
import torch

from vae.config import ModelConfig, ObjectiveConfig
from vae.models import LatentSample, VAEOutput, build_model
from vae.objectives import (
    ElboTerms, elbo_terms, iwae_bound_per_image, iwae_training_loss, kl_divergence, kl_weight, log_importance_weights,
    log_normal, reconstruction_nll, sampled_elbo_terms, training_loss,
)

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


# --- the importance-weighted bound -----------------------------------------------------------------------------------


def small_vae():
    return build_model(ModelConfig(hidden_dims=(16,), latent_dim=3), seed=0)


def test_importance_weighted_objective_with_one_sample_equals_the_elbo_objective():
    # The same model, images and noise: the k = 1 importance-weighted loss is the negative ELBO with the Monte Carlo
    # KL, for any weight of the KL term (beta, warm-up).
    model, eps = small_vae(), torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
    elbo = elbo_terms(X, model(X, eps=eps), ObjectiveConfig(kl="monte_carlo"))
    per_sample = sampled_elbo_terms(X, model.latent_sample(model.posterior(X), eps.unsqueeze(0)), ObjectiveConfig(bound="iwae"))
    assert per_sample.reconstruction.shape == per_sample.kl.shape == (1, 3)
    torch.testing.assert_close(per_sample.reconstruction[0], elbo.reconstruction)
    torch.testing.assert_close(per_sample.kl[0], elbo.kl, rtol=1e-5, atol=1e-4)  # log q by another route: rounding
    for weight in (1.0, 0.25, 0.0):
        expected = training_loss(elbo, weight).item()
        assert iwae_training_loss(per_sample, weight).item() == pytest.approx(expected, rel=1e-6)
        assert iwae_training_loss(per_sample, weight, images=6).item() == pytest.approx(expected / 2, rel=1e-6)


def test_sampled_terms_are_minus_the_log_likelihood_and_log_posterior_minus_log_prior():
    sample = LatentSample(torch.stack([LOGITS, LOGITS - 1]), torch.tensor([[1.0, 2, 3], [4, 5, 6]]), torch.tensor([[0.5, 0.5, 0.5], [1, 1, 1]]))
    terms = sampled_elbo_terms(X, sample, ObjectiveConfig())
    expected = torch.stack([reconstruction_nll(X, LOGITS, "bernoulli"), reconstruction_nll(X, LOGITS - 1, "bernoulli")])
    torch.testing.assert_close(terms.reconstruction, expected)
    assert terms.kl.tolist() == [[-0.5, -1.5, -2.5], [-3.0, -4.0, -5.0]]


def test_importance_weights_are_the_likelihood_times_prior_over_posterior_with_the_kl_weighted():
    terms = ElboTerms(torch.tensor([[80.0, 90.0], [85.0, 70.0]]), torch.tensor([[10.0, 20.0], [4.0, -2.0]]))
    assert log_importance_weights(terms).tolist() == [[-90.0, -110.0], [-89.0, -68.0]]
    assert log_importance_weights(terms, 0.5).tolist() == [[-85.0, -100.0], [-87.0, -69.0]]


def test_the_importance_weighted_loss_is_minus_the_mean_bound_of_the_batch():
    terms = ElboTerms(torch.tensor([[80.0, 90.0], [85.0, 70.0]]), torch.tensor([[10.0, 20.0], [4.0, -2.0]]))
    bound = torch.logsumexp(torch.tensor([[-90.0, -110.0], [-89.0, -68.0]]), dim=0) - math.log(2)
    assert iwae_training_loss(terms, 1.0).item() == pytest.approx(-bound.mean().item())


def test_importance_weighted_bound_is_the_log_mean_of_the_weights():
    log_weights = torch.log(torch.tensor([[1.0, 10.0], [2.0, 20.0], [6.0, 0.0]]))  # 3 samples of 2 images
    torch.testing.assert_close(iwae_bound_per_image(log_weights), torch.log(torch.tensor([3.0, 10.0])))


def test_importance_weighted_bound_is_at_least_the_mean_of_the_sample_elbos():
    log_weights = torch.randn(50, 8, generator=torch.Generator().manual_seed(2)) * 10 - 100
    assert torch.all(iwae_bound_per_image(log_weights) >= log_weights.mean(0))


def test_several_samples_need_the_iwae_bound():
    with pytest.raises(ValueError, match="samples=5 needs bound='iwae'"):
        ObjectiveConfig(samples=5)
    assert ObjectiveConfig(bound="iwae", samples=5).samples == 5
