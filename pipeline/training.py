"""The train and evaluate stages: a run config and prepared data in, a trained model and its test metrics out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.data import PreparedData
from pipeline.tutorials import TutorialFigures
from vae.data import ImageSet
from vae.engine import Callback, TrainingState, fit
from vae.evaluate import evaluate_elbo, iwae_bound
from vae.models import VAE, build_model


class EpochReport(Callback):
    """Prints one line per epoch (ELBOs, KL, the tutorial's figures named in ``extra``, seconds): what a log shows of
    training when there is no progress bar."""

    def __init__(self, extra: Sequence[str] = ()):
        self.extra = tuple(extra)

    def on_epoch_end(self, state: TrainingState) -> None:
        metrics = state.history[-1]
        validation = f", validation ELBO {metrics['val_elbo_nats']:.2f}" if "val_elbo_nats" in metrics else ""
        tutorial = "".join(f", {name} {metrics[name]:.4f}" for name in self.extra if name in metrics)
        print(
            f"epoch {state.epoch}/{state.train_config.epochs}: train ELBO {metrics['train_elbo_nats']:.2f} nats "
            f"(KL {metrics['train_kl_nats']:.2f}){validation}{tutorial}, {state.epoch_seconds[-1]:.1f} s",
            flush=True,
        )


def train(
    config: RunConfig,
    prepared: PreparedData,
    *,
    callbacks: Iterable[Callback] = (),
    checkpoint_path: Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> tuple[VAE, TrainingState]:
    """Build the configured model (weights drawn with the training seed) and fit it; resume from the checkpoint if asked.

    The figures of the config's tutorial metric join every epoch's metrics (see :mod:`pipeline.tutorials`).
    """
    model = build_model(config.model, seed=config.train.seed)
    if config.tutorial.metric != "none":
        callbacks = [TutorialFigures(config.tutorial.metric, prepared.test, seed=config.eval.seed), *callbacks]
    state = fit(
        model,
        prepared.train,
        prepared.validation,
        config.objective,
        config.train,
        callbacks=callbacks,
        checkpoint_path=checkpoint_path,
        resume_from=checkpoint_path if resume and checkpoint_path is not None and checkpoint_path.exists() else None,
        metadata={"run_config": config.model_dump(mode="json"), "dataset_digest": prepared.digest},
        progress=progress,
    )
    return model, state


def evaluate(model: VAE, test: ImageSet, config: RunConfig) -> dict[str, float]:
    """Test metrics in nats per image: the ELBO and its terms and, unless ``eval.iwae_samples`` is 0, the IWAE NLL."""
    device = next(model.parameters()).device
    test = test.to(device)
    settings = config.eval
    elbo = evaluate_elbo(model, test, config.objective, batch_size=settings.batch_size, seed=settings.seed)
    metrics = {f"test_{name}": value for name, value in elbo.items()}
    if settings.iwae_samples > 0:
        bound = iwae_bound(
            model, test, config.objective, samples=settings.iwae_samples,
            chunk_size=settings.iwae_chunk_size, batch_size=settings.iwae_batch_size, seed=settings.seed,
        )
        metrics.update(test_nll_nats=bound["nll_nats"], test_bits_per_dim=bound["bits_per_dim"])
    return metrics


def likelihood_note(config: RunConfig) -> str:
    """Why the nats of this run do not compare with published binarized-MNIST likelihoods, if they do not."""
    if config.objective.likelihood == "gaussian":
        return "a Gaussian density on grayscale pixels: not comparable with likelihoods of binary images"
    if config.data.binarization == "none":
        return "grayscale pixels under a Bernoulli likelihood: the ELBO and NLL are not normalized log-likelihoods"
    return ""


def held_out_note(config: RunConfig) -> str:
    """Why this run's test metrics are not held-out figures, if they are not."""
    if config.data.training_images == "train+test":
        return "trained on the test images too (data.training_images = train+test): the test metrics are not held out"
    return ""


def run_notes(config: RunConfig) -> list[str]:
    """What a reader of this run's test metrics should know: why its nats are not published likelihoods, and whether
    its test set was held out."""
    return [note for note in (likelihood_note(config), held_out_note(config)) if note]
