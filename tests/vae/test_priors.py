"""Specification of the priors: each density against a direct computation with torch.distributions."""

import math

import pytest
import torch
from torch import nn
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from vae.priors import StandardNormalPrior, VampPrior, build_prior, log_normal_mixture

generator = torch.Generator().manual_seed(0)
MEANS = torch.randn(5, 3, generator=generator) * 2
LOGVARS = torch.randn(5, 3, generator=generator) - 1.0
Z = torch.randn(4, 7, 3, generator=generator) * 2


def direct_mixture(means: torch.Tensor, logvars: torch.Tensor) -> MixtureSameFamily:
    """The uniform mixture of diagonal Gaussians, as torch.distributions builds it, in float64."""
    components = Independent(Normal(means.double(), torch.exp(0.5 * logvars.double())), 1)
    return MixtureSameFamily(Categorical(logits=torch.zeros(len(means), dtype=torch.float64)), components)


def test_normal_mixture_density_equals_torch_distributions():
    expected = direct_mixture(MEANS, LOGVARS).log_prob(Z.double())
    result = log_normal_mixture(Z, MEANS, LOGVARS)
    assert result.shape == (4, 7) and result.dtype == torch.float32
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-5)


def test_normal_mixture_keeps_its_precision_for_narrow_components_far_from_the_origin():
    # std e^-3 = 0.05 around means of size ~10: the squared distance is expanded into products of ~100 / 0.0025 that
    # cancel (in float32 the result was 0.02 nats off); it must match float64 to float32's own rounding of the result.
    means, logvars = 10 + MEANS, torch.full_like(LOGVARS, -6.0)
    z = means[2] + 0.05 * torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    expected = direct_mixture(means, logvars).log_prob(z.double())
    torch.testing.assert_close(log_normal_mixture(z, means, logvars).double(), expected, rtol=1e-6, atol=1e-5)


def test_one_component_is_a_normal_density():
    z = Z.reshape(-1, 3)
    expected = Normal(MEANS[0].double(), torch.exp(0.5 * LOGVARS[0]).double()).log_prob(z.double()).sum(-1)
    torch.testing.assert_close(log_normal_mixture(z, MEANS[:1], LOGVARS[:1]).double(), expected, rtol=1e-5, atol=1e-5)


def test_standard_normal_prior_density_and_draws():
    prior = StandardNormalPrior(3)
    torch.testing.assert_close(prior.log_prob(Z), Normal(0.0, 1.0).log_prob(Z).sum(-1))
    draws = prior.sample(6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(draws, torch.randn(6, 3, generator=torch.Generator().manual_seed(2)))
    assert list(prior.parameters()) == []


class AffineEncoder(nn.Module):
    """q(z|x): mean = A x, log-variance = B x + c over the flattened image; an encoder whose outputs are easy to check."""

    def __init__(self, pixels: int, latent: int):
        super().__init__()
        self.head = nn.Linear(pixels, 2 * latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.head(x.flatten(1)).chunk(2, -1)
        return mean, logvar


def vamp_prior() -> tuple[VampPrior, AffineEncoder]:
    torch.manual_seed(3)
    prior, encoder = VampPrior(components=6, image_shape=(1, 4, 4), latent_dim=3), AffineEncoder(16, 3)
    with torch.no_grad():  # pseudo-inputs on both sides of [0, 1], so that the hard tanh matters
        prior.pseudo_inputs.copy_(torch.rand(6, 1, 4, 4) * 1.6 - 0.3)
    return prior, encoder


def test_vamp_prior_is_the_uniform_mixture_of_the_posteriors_of_its_clipped_pseudo_inputs():
    prior, encoder = vamp_prior()
    images = prior.pseudo_inputs.detach().clamp(0.0, 1.0)  # the pseudo-inputs as images in [0, 1]
    means, logvars = encoder(images)
    expected = direct_mixture(means.detach(), logvars.detach()).log_prob(Z.double())
    torch.testing.assert_close(prior.log_prob(Z, encoder).detach().double(), expected, rtol=1e-5, atol=1e-5)


def test_vamp_prior_gradients_reach_its_pseudo_inputs_and_the_encoder():
    prior, encoder = vamp_prior()
    prior.log_prob(Z, encoder).sum().backward()
    inside = (prior.pseudo_inputs > 0) & (prior.pseudo_inputs < 1)
    assert prior.pseudo_inputs.grad[inside].abs().min() > 0  # the hard tanh passes gradients inside [0, 1] only
    assert torch.all(prior.pseudo_inputs.grad[~inside] == 0)
    assert encoder.head.weight.grad.abs().sum() > 0


def test_vamp_prior_draws_come_from_its_mixture():
    prior, encoder = vamp_prior()
    with torch.no_grad():
        encoder.head.weight.zero_()
        encoder.head.bias.copy_(torch.tensor([1.0, -2.0, 0.5, math.log(0.25), 0.0, math.log(4.0)]))
    # Every component is N((1, -2, 0.5), diag(0.25, 1, 4)) now, so the draws' moments are known exactly.
    draws = prior.sample(200_000, encoder, torch.Generator().manual_seed(4)).detach()
    torch.testing.assert_close(draws.mean(0), torch.tensor([1.0, -2.0, 0.5]), atol=0.02, rtol=0)
    torch.testing.assert_close(draws.std(0), torch.tensor([0.5, 1.0, 2.0]), atol=0.02, rtol=0)
    again = prior.sample(5, encoder, torch.Generator().manual_seed(4))
    assert torch.equal(again, prior.sample(5, encoder, torch.Generator().manual_seed(4)))


def test_vamp_prior_pseudo_inputs_start_near_0_05_as_in_the_paper_code():
    torch.manual_seed(0)
    prior = VampPrior(components=500, image_shape=(1, 28, 28), latent_dim=40)
    assert prior.pseudo_inputs.shape == (500, 1, 28, 28) and prior.components == 500
    assert prior.pseudo_inputs.mean().item() == pytest.approx(0.05, abs=1e-3)
    assert prior.pseudo_inputs.std().item() == pytest.approx(0.01, rel=0.01)


def test_build_prior_names_the_two_priors_and_refuses_others():
    assert isinstance(build_prior("standard_normal", 3, 10, (1, 28, 28)), StandardNormalPrior)
    assert isinstance(build_prior("vamp", 3, 10, (1, 28, 28)), VampPrior)
    with pytest.raises(ValueError, match="unknown prior 'flow'"):
        build_prior("flow", 3, 10, (1, 28, 28))


def test_a_frozen_vamp_prior_encodes_its_pseudo_inputs_once_and_gives_the_same_density():
    prior, encoder = vamp_prior()
    calls = []
    counted = lambda images: calls.append(len(images)) or encoder(images)  # noqa: E731
    outside = prior.log_prob(Z, counted)
    with torch.no_grad(), prior.frozen(counted):
        inside = [prior.log_prob(Z, counted), prior.log_prob(Z[:1], counted)]
    assert calls == [6, 6]  # once outside, once on entering the block
    torch.testing.assert_close(inside[0], outside.detach())
    torch.testing.assert_close(inside[1], outside[:1].detach())
    prior.log_prob(Z, counted)
    assert calls == [6, 6, 6]  # after the block the mixture follows the parameters again
