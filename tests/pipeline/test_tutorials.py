"""Specification of the tutorials' own figures: each computed by hand, as its tutorial's code computes it."""

import math
import typing

import pytest
import torch

from pipeline import tutorials
from pipeline.config import PRESETS, TutorialMetric, load_config
from vae.config import ModelConfig, TrainConfig
from vae.data import ImageSet, binarize
from vae.engine import fit
from vae.models import build_model

TINY = ModelConfig(architecture="mlp", hidden_dims=(16,), latent_dim=3)


def random_images(n: int, mode: str) -> ImageSet:
    generator = torch.Generator().manual_seed(11)
    return binarize(torch.rand(n, 28, 28, generator=generator), torch.zeros(n, dtype=torch.long), mode)


def one_sample_terms(model, x: torch.Tensor, noise: torch.Generator):
    """Encode, draw z = mu + eps * exp(logvar / 2) with eps from ``noise``, decode: all in float64."""
    mu, logvar = (t.double() for t in model.encode(x))
    z = mu + torch.randn(mu.shape, generator=noise).double() * torch.exp(0.5 * logvar)
    logits = model.decode(z.float()).double()
    return mu, logvar, z, logits


def test_tf_test_elbo_is_the_cvae_tutorials_monte_carlo_elbo_over_test_batches_of_100():
    model = build_model(TINY, seed=0)
    test = random_images(300, "threshold")
    noise = torch.Generator().manual_seed(4)
    batch_elbos = []
    with torch.no_grad():
        for start in range(0, 300, 100):  # the tutorial: loss(compute_loss(model, test_x)) per batch, ELBO = -mean
            x = test.pixels[start : start + 100].double()
            mu, logvar, z, logits = one_sample_terms(model, x.float(), noise)
            # tf.nn.sigmoid_cross_entropy_with_logits: max(l, 0) - l * x + log(1 + exp(-|l|))
            cross_ent = logits.clamp(min=0) - logits * x + torch.log1p(torch.exp(-logits.abs()))
            logpx_z = -cross_ent.sum(dim=(1, 2, 3))
            log2pi = math.log(2 * math.pi)
            logpz = (-0.5 * (z**2 + log2pi)).sum(1)
            logqz_x = (-0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar + log2pi)).sum(1)
            batch_elbos.append((logpx_z + logpz - logqz_x).mean())
    expected = torch.stack(batch_elbos).mean().item()
    assert tutorials.tf_test_elbo(model, test, seed=4) == pytest.approx(expected, rel=1e-6)


def test_matlab_test_elbo_loss_is_half_the_squared_error_plus_the_analytic_kl_without_the_gaussian_constant():
    model = build_model(TINY, seed=1)
    test = random_images(250, "none")
    noise = torch.Generator().manual_seed(9)
    with torch.no_grad():
        losses = []
        for start in range(0, 250, tutorials.TEST_BATCH_SIZE):
            x = test.pixels[start : start + tutorials.TEST_BATCH_SIZE].double()
            mu, logvar, _, logits = one_sample_terms(model, x.float(), noise)
            squares = 0.5 * (torch.sigmoid(logits) - x) ** 2  # ELBOloss: squares = 0.5*(xPred-x).^2
            reconstruction = squares.sum(dim=(1, 2, 3))
            kl = -0.5 * (1 + logvar - mu**2 - torch.exp(logvar)).sum(1)
            losses.append(reconstruction + kl)
    expected = torch.cat(losses).mean().item()  # elbo = mean(reconstructionLoss + KL) over the whole test set
    assert tutorials.matlab_test_elbo_loss(model, test, seed=9) == pytest.approx(expected, rel=1e-6)


def test_keras_figures_are_the_epochs_mean_of_batch_means_each_batch_counting_once():
    means = torch.tensor([[300.0, 296.0, 4.0], [200.0, 197.0, 3.0], [10.0, 8.0, 2.0]])  # the last a small batch
    assert tutorials.epoch_mean_of_batch_means(means, "tf") == {"tf_loss": 170.0, "tf_reconstruction_loss": 167.0, "tf_kl_loss": 3.0}


def test_keras_figures_take_the_kls_mean_over_the_latent_dimensions_as_the_examples_reduce_mean_does():
    means = torch.tensor([[300.0, 296.0, 4.0], [200.0, 197.0, 3.0], [10.0, 8.0, 2.0]])  # loss, reconstruction, KL
    # kl_loss = -0.5 * tf.reduce_mean(1 + z_log_var - z_mean**2 - exp(z_log_var)) over [batch, 2]: the KL / 2
    assert tutorials.keras_figures(means, latent_dim=2) == {
        "keras_loss": 168.5, "keras_reconstruction_loss": 167.0, "keras_kl_loss": 1.5,
    }


def test_a_run_logs_its_tutorials_batch_figures_or_test_figure_in_every_epochs_metrics():
    train = random_images(150, "none")  # batches of 64, 64 and 22
    test = random_images(200, "none")
    settings = TrainConfig(batch_size=64, epochs=2, device="cpu")
    for preset in ("keras-conv-fashion", "matlab-conv-mnist"):
        config = load_config(preset)
        model = build_model(TINY, seed=0)
        callback = tutorials.TutorialFigures(config.tutorial.metric, test, seed=3)
        # the KL's weight as the Keras example's mean over the latent dimensions gives it (1/2 in the preset's 2-D latent)
        objective = config.objective.model_copy(update={"beta": 1 / TINY.latent_dim}) if preset == "keras-conv-fashion" else config.objective
        state = fit(model, train, None, objective, settings, callbacks=[callback], progress=False)
        assert all(set(tutorials.figure_names(config)) <= set(entry) for entry in state.history)
        if preset == "keras-conv-fashion":  # Keras' printed loss: the mean of the three batch losses it trained on
            assert [entry["keras_loss"] for entry in state.history] == pytest.approx([entry["train_loss"] for entry in state.history])
        else:
            assert state.history[-1]["matlab_test_elbo_loss"] == pytest.approx(tutorials.matlab_test_elbo_loss(model, test, seed=3))


def test_every_tutorial_metric_has_names_and_every_tutorial_preset_names_its_figure():
    assert set(typing.get_args(TutorialMetric)) == set(tutorials.FIGURE_NAMES)
    figures = {preset: load_config(preset).tutorial.metric for preset in PRESETS}
    assert figures == {
        "default": "none",
        "tf-fashion-mlp": "tf_loss",
        "vae-tutorial-mlp": "tutorial_loss",
        "keras-conv-fashion": "keras_loss",
        "tf-cvae-mnist": "tf_test_elbo",
        "matlab-conv-mnist": "matlab_test_elbo_loss", "hvae-vampprior": "none",
    }
    assert tutorials.figure_names(load_config("keras-conv-fashion")) == ("keras_loss", "keras_reconstruction_loss", "keras_kl_loss")
