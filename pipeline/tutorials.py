"""The figure each tutorial reports, computed the way that tutorial computes it, as per-epoch metrics of a run."""

from __future__ import annotations

import math

from torch import Tensor

from pipeline.config import RunConfig, TutorialMetric
from vae.config import ObjectiveConfig
from vae.data import ImageSet
from vae.engine import Callback, TrainingState
from vae.evaluate import evaluate_elbo
from vae.objectives import LOG_2PI

# The metric names each choice logs: the first is the figure the tutorial prints, the others its parts.
FIGURE_NAMES: dict[str, tuple[str, ...]] = {
    "none": (),
    "tf_loss": ("tf_loss", "tf_reconstruction_loss", "tf_kl_loss"),
    "tutorial_loss": ("tutorial_loss",),
    "keras_loss": ("keras_loss", "keras_reconstruction_loss", "keras_kl_loss"),
    "tf_test_elbo": ("tf_test_elbo",),
    "matlab_test_elbo_loss": ("matlab_test_elbo_loss",),
}
# The TF CVAE tutorial scores the test set in batches of 100; every batch is full, so the mean of the batch means is
# the mean per image, which the batch size does not change (beyond float rounding).
TF_TEST_BATCH_SIZE = 100
TEST_BATCH_SIZE = 1000  # the MATLAB example scores all 10k test images at once: the same mean


def figure_names(config: RunConfig) -> tuple[str, ...]:
    """The metrics a run of ``config`` logs in its tutorial's unit (none when ``tutorial.metric`` is "none")."""
    return FIGURE_NAMES[config.tutorial.metric]


def epoch_mean_of_batch_means(batch_means: Tensor, prefix: str) -> dict[str, float]:
    """The epoch's mean of the steps' batch-mean loss, reconstruction and KL, each batch counting once whatever its
    size: the figures a Keras progress bar prints at the end of an epoch (``<prefix>_loss``, ...)."""
    loss, reconstruction, kl = batch_means.double().mean(0).tolist()
    return {f"{prefix}_loss": loss, f"{prefix}_reconstruction_loss": reconstruction, f"{prefix}_kl_loss": kl}


def keras_figures(batch_means: Tensor, latent_dim: int) -> dict[str, float]:
    """What the Keras example's progress bar prints at the end of an epoch: the epoch's mean of the steps' batch means
    (each batch counting once) of its reconstruction loss (binary cross-entropy summed per image) and of its KL term,
    which ``tf.reduce_mean`` averages over the latent dimensions as well as over the batch, so it is the KL divided by
    ``latent_dim``; ``keras_loss`` is their sum."""
    _, reconstruction, kl = batch_means.double().mean(0).tolist()
    kl_term = kl / latent_dim
    return {"keras_loss": reconstruction + kl_term, "keras_reconstruction_loss": reconstruction, "keras_kl_loss": kl_term}


def tf_test_elbo(model, test: ImageSet, *, seed: int) -> float:
    """The TF CVAE tutorial's "Test set ELBO": per image log p(x|z) + log p(z) - log q(z|x) at one z ~ q(z|x), with a
    Bernoulli p(x|z) on the logits, averaged over the test set (higher is better, in nats)."""
    objective = ObjectiveConfig(likelihood="bernoulli", kl="monte_carlo")
    return evaluate_elbo(model, test, objective, batch_size=TF_TEST_BATCH_SIZE, seed=seed)["elbo_nats"]


def matlab_test_elbo_loss(model, test: ImageSet, *, seed: int) -> float:
    """The MATLAB example's test "ELBO loss": per image sum(0.5 * (x_hat - x)^2) + KL(q(z|x) || N(0, I)), x_hat the
    sigmoid of the decoder at one z ~ q(z|x), the KL analytic, averaged over the test set (lower is better).

    That is minus the ELBO of a unit-variance Gaussian likelihood less its normalizing constant, D * 0.5 * ln(2 pi)
    (720.4 nats for 784 pixels), which the MATLAB example leaves out.
    """
    objective = ObjectiveConfig(likelihood="gaussian", gaussian_std=1.0, kl="analytic")
    elbo_nats = evaluate_elbo(model, test, objective, batch_size=TEST_BATCH_SIZE, seed=seed)["elbo_nats"]
    return -elbo_nats - math.prod(test.pixels.shape[1:]) * 0.5 * LOG_2PI


def epoch_figures(metric: TutorialMetric, state: TrainingState, test: ImageSet, *, seed: int) -> dict[str, float]:
    """The figures of ``metric`` for the epoch just trained: from its batches, or from the ``test`` set."""
    if metric == "none":
        return {}
    if metric == "tf_loss":
        return epoch_mean_of_batch_means(state.batch_means, "tf")
    if metric == "tutorial_loss":
        return {"tutorial_loss": epoch_mean_of_batch_means(state.batch_means, "tutorial")["tutorial_loss"]}
    if metric == "keras_loss":
        return keras_figures(state.batch_means, state.model.latent_dim)
    if metric == "tf_test_elbo":
        return {"tf_test_elbo": tf_test_elbo(state.model, test, seed=seed)}
    if metric == "matlab_test_elbo_loss":
        return {"matlab_test_elbo_loss": matlab_test_elbo_loss(state.model, test, seed=seed)}
    raise ValueError(f"unknown tutorial metric {metric!r}; expected one of {', '.join(FIGURE_NAMES)}")


class TutorialFigures(Callback):
    """Adds the figures of the run's tutorial metric to every epoch's metrics (so MLflow logs them beside the nats).

    Test-set figures are computed on ``test`` after each epoch, outside the epoch's timed training, with the noise
    of a generator seeded with ``seed`` (the same draws every epoch).
    """

    def __init__(self, metric: TutorialMetric, test: ImageSet, *, seed: int = 0):
        self.metric, self.test, self.seed = metric, test, seed

    def on_fit_start(self, state: TrainingState) -> None:
        if self.metric in ("tf_test_elbo", "matlab_test_elbo_loss"):
            self.test = self.test.to(state.device)  # once, not every epoch

    def on_epoch_metrics(self, state: TrainingState) -> dict[str, float]:
        return epoch_figures(self.metric, state, self.test, seed=self.seed)
