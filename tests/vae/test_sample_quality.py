"""Specification of vae.sample_quality: torchmetrics' FID on a classifier's penultimate features, checked against the
closed form, and the sample-quality metrics of a VAE (prior samples, reconstructions, their accuracy)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vae.classifier import accuracy, build_classifier
from vae.config import ClassifierConfig, ModelConfig
from vae.data import ImageSet
from vae.models import build_model
from vae.sample_quality import fid_metric, frechet_distance, sample_quality
from tests.conftest import needs_data

SMALL = ClassifierConfig(conv_channels=(4, 8), feature_dim=16)
FLOAT32_EPS = torch.finfo(torch.float32).eps


def identity_features(side: int = 4):
    """A classifier whose "features" are the pixels of [N, 1, side, side] images: features are whatever we draw."""
    classifier = build_classifier(SMALL, (1, side, side))
    classifier.features = nn.Flatten()
    classifier.num_features = side * side
    return classifier


def gaussian(n: int, seed: int, side: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(side * side, side * side, generator=generator) / side  # correlated features
    return (torch.randn(n, side * side, generator=generator) @ mixing + 0.5).reshape(n, 1, side, side)


def test_the_fid_of_a_set_against_itself_is_zero_up_to_rounding():
    classifier = build_classifier(SMALL).eval()
    images = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    features = classifier.features(images).double()
    # sqrt(eigenvalues of S @ S) carries float64 rounding of about sqrt(eps64) * ||S|| for each of the d eigenvalues
    # near zero (the ReLU features of random images are nearly degenerate); the float32 result adds nothing at 0.
    bound = features.shape[1] * math.sqrt(torch.finfo(torch.float64).eps) * torch.linalg.matrix_norm(torch.cov(features.T), 2).item()
    assert abs(frechet_distance(classifier, images, images, batch_size=64)) <= bound


def test_the_fid_of_a_shifted_copy_is_the_squared_shift():
    # Shifting every feature vector by c moves the mean by c and leaves the covariance: FID = |c|^2 exactly.
    real = gaussian(2000, seed=1)
    shift = torch.linspace(-0.3, 0.4, 16).reshape(1, 1, 4, 4)
    assert frechet_distance(identity_features(), real, real + shift, batch_size=500) == pytest.approx(shift.square().sum().item(), rel=1e-5)


def test_the_fid_of_a_scaled_copy_follows_the_closed_form_for_gaussians():
    # Y = a X: mean a m, covariance a^2 S, sqrt(S a^2 S) = a S, so FID = (1 - a)^2 (|m|^2 + tr S) with the sample
    # mean m and the (unbiased) sample covariance S of X.
    real, a = gaussian(2000, seed=2), 1.5
    flat = real.flatten(1).double()
    expected = (1 - a) ** 2 * (flat.mean(0).square().sum() + torch.cov(flat.T).trace()).item()
    assert frechet_distance(identity_features(), real, a * real, batch_size=300) == pytest.approx(expected, rel=1e-5)


def test_the_fid_of_two_gaussian_sets_matches_the_formula_on_their_sample_statistics():
    first, second = gaussian(3000, seed=3), 0.7 * gaussian(2500, seed=4) + 0.2
    x, y = first.flatten(1).double(), second.flatten(1).double()
    mu_x, mu_y, s_x, s_y = x.mean(0), y.mean(0), torch.cov(x.T), torch.cov(y.T)
    # tr sqrt(S_x S_y) = tr sqrt(S_x^1/2 S_y S_x^1/2), a symmetric PSD matrix: another route than torchmetrics' eigvals.
    values, vectors = torch.linalg.eigh(s_x)
    root_x = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_x @ s_y @ root_x).clamp(min=0).sqrt().sum()
    expected = ((mu_x - mu_y).square().sum() + s_x.trace() + s_y.trace() - 2 * cross).item()
    assert frechet_distance(identity_features(), first, second, batch_size=1000) == pytest.approx(expected, rel=1e-5)


def test_the_feature_extractor_keeps_the_classifier_in_eval_mode():
    classifier = build_classifier(SMALL).train()
    metric = fid_metric(classifier)
    assert not classifier.training
    metric.train()
    assert not any(module.training for module in classifier.modules())
    assert metric.inception.num_features == 16


def quality_setup():
    model = build_model(ModelConfig(architecture="mlp", hidden_dims=(32,), latent_dim=3), seed=0)
    classifier = build_classifier(SMALL)
    generator = torch.Generator().manual_seed(7)
    reference = torch.rand(120, 1, 28, 28, generator=generator)
    test = ImageSet((torch.rand(90, 1, 28, 28, generator=generator) < 0.3).float(), torch.arange(90) % 10)
    return model, classifier, reference, test


def test_sample_quality_scores_prior_samples_and_reconstructions_against_the_reference():
    model, classifier, reference, test = quality_setup()
    model.train()
    quality = sample_quality(model, classifier, reference, test, samples=150, batch_size=150, seed=3)
    assert model.training  # flags put back
    samples = model.sample(150, generator=torch.Generator().manual_seed(3))
    reconstructions = model.reconstruct(test.pixels)
    assert quality == {
        "fid": frechet_distance(classifier, reference, samples, batch_size=150),
        "reconstruction_fid": frechet_distance(classifier, reference, reconstructions, batch_size=150),
        "reconstruction_accuracy": accuracy(classifier, reconstructions, test.labels),
    }


def test_sample_quality_is_the_same_for_the_same_seed_and_differs_for_another():
    model, classifier, reference, test = quality_setup()
    first = sample_quality(model, classifier, reference, test, samples=100, batch_size=40, seed=0)
    assert sample_quality(model, classifier, reference, test, samples=100, batch_size=40, seed=0) == first
    other = sample_quality(model, classifier, reference, test, samples=100, batch_size=40, seed=1)
    assert other["fid"] != first["fid"]
    assert {key: other[key] for key in ("reconstruction_fid", "reconstruction_accuracy")} == {
        key: first[key] for key in ("reconstruction_fid", "reconstruction_accuracy")
    }


def test_sample_quality_refuses_too_few_samples_and_images_of_another_shape():
    model, classifier, reference, test = quality_setup()
    with pytest.raises(ValueError, match="samples must be at least 2 \\(a covariance needs two\\), got 1"):
        sample_quality(model, classifier, reference, test, samples=1)
    with pytest.raises(ValueError, match=r"reference images \(1, 14, 14\) and test images \(1, 28, 28\) must have the model's shape \(1, 28, 28\)"):
        sample_quality(model, classifier, reference[:, :, :14, :14], test, samples=10)


def test_without_a_terminal_each_pass_of_the_classifier_reports_its_images_batch_by_batch(progress_at_every_update, capsys):
    model, classifier, reference, test = quality_setup()  # 120 reference images, 90 test images
    sample_quality(model, classifier, reference, test, samples=100, batch_size=40)
    assert capsys.readouterr().out.splitlines() == [
        "FID (reference images): 40/120 images (33%), 0 s",
        "FID (reference images): 80/120 images (67%), 0 s",
        "FID (reference images): 120/120 images (100%), 0 s",
        "FID (prior samples): 40/100 images (40%), 0 s",
        "FID (prior samples): 80/100 images (80%), 0 s",
        "FID (prior samples): 100/100 images (100%), 0 s",
        "FID (reconstructions): 40/90 images (44%), 0 s",
        "FID (reconstructions): 80/90 images (89%), 0 s",
        "FID (reconstructions): 90/90 images (100%), 0 s",
    ]


def test_without_a_terminal_the_frechet_distance_reports_each_set_batch_by_batch(progress_at_every_update, capsys):
    frechet_distance(identity_features(), gaussian(50, seed=1), gaussian(30, seed=2), batch_size=30)
    assert capsys.readouterr().out.splitlines() == [
        "FID (real images): 30/50 images (60%), 0 s",
        "FID (real images): 50/50 images (100%), 0 s",
        "FID (generated images): 30/30 images (100%), 0 s",
    ]


def test_progress_false_reports_nothing(progress_at_every_update, capsys):
    model, classifier, reference, test = quality_setup()
    sample_quality(model, classifier, reference, test, samples=100, batch_size=40, progress=False)
    frechet_distance(classifier, reference, reference, batch_size=40, progress=False)
    assert capsys.readouterr() == ("", "")


# --- the metric means something: on the real data, with a real (quickly trained) classifier -------------------------


def blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur of standard deviation ``sigma`` pixels (separable, edges replicated)."""
    radius = max(1, round(3 * sigma))
    grid = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-grid.square() / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    rows = torch.nn.functional.conv2d(torch.nn.functional.pad(images, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(torch.nn.functional.pad(rows, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))


@pytest.fixture(scope="module")
def mnist_and_classifier():
    """MNIST in grayscale and a classifier of 10,000 of its training images after one epoch (about 81% test accuracy,
    3 CPU seconds): enough for FID to tell data sets apart."""
    from pipeline import data
    from vae.classifier import train_classifier

    raw = data.load("mnist")
    train = raw.train_images.float().div(255).unsqueeze(1)
    test = raw.test_images.float().div(255).unsqueeze(1)
    recipe = ClassifierConfig(conv_channels=(8, 16), feature_dim=64, epochs=1, train_subset=10_000)
    classifier, _ = train_classifier(recipe, train, raw.train_labels, device="cpu", progress=False)
    return train, test, classifier


@needs_data
def test_the_training_set_against_the_test_set_scores_near_zero(mnist_and_classifier):
    train, test, classifier = mnist_and_classifier
    same_distribution = frechet_distance(classifier, test, train[-10_000:], batch_size=1000)  # images it never saw
    slightly_noisy = frechet_distance(classifier, test, (test + 0.2 * torch.randn(test.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1), batch_size=1000)
    # Measured: 0.12 (train vs test), 5.3 (noise of standard deviation 0.2); both vary a little with the classifier.
    assert 0 < same_distribution < 0.5 and same_distribution < slightly_noisy / 10


@needs_data
def test_the_score_grows_with_the_strength_of_noise_and_of_blur(mnist_and_classifier):
    _, test, classifier = mnist_and_classifier
    generator = torch.Generator().manual_seed(1)
    noisy = [frechet_distance(classifier, test, (test + sigma * torch.randn(test.shape, generator=generator)).clamp(0, 1), batch_size=1000) for sigma in (0.1, 0.2, 0.4)]
    blurry = [frechet_distance(classifier, test, blurred(test, sigma), batch_size=1000) for sigma in (0.5, 1.0, 2.0)]
    assert noisy == sorted(noisy) and len(set(noisy)) == 3, noisy
    assert blurry == sorted(blurry) and len(set(blurry)) == 3, blurry
    assert noisy[0] > 0.3 and blurry[0] > 0.2  # each measured at about twice that (0.79 and 0.53)
