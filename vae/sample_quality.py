"""Sample quality: the Frechet distance (FID) between a classifier's features of a VAE's images and of real images,
and the classifier's accuracy on the VAE's reconstructions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vae.classifier import NUM_CLASSES, Classifier
from vae.data import ImageSet
from vae.models import VAE, eval_mode
from vae.progress import progress as progress_of

if TYPE_CHECKING:  # imported where used: importing torchmetrics takes most of a second, which runs without FID spare
    from torchmetrics.image.fid import FrechetInceptionDistance


class ClassifierFeatures(nn.Module):
    """A classifier's penultimate features as torchmetrics' FID takes a feature extractor: ``num_features`` wide, and
    in eval mode whatever mode the metric is put in (dropout must never touch the features)."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features
        self.train(False)  # the classifier too: it is a submodule

    def train(self, mode: bool = True) -> ClassifierFeatures:
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(images)


def fid_metric(classifier: Classifier, device: torch.device | str | None = None) -> FrechetInceptionDistance:
    """torchmetrics' FrechetInceptionDistance on the classifier's penultimate features, on ``device`` (default: the
    classifier's), the classifier with it.

    Images go in as they are (float [N, C, H, W] in [0, 1]: with a feature extractor of our own, torchmetrics neither
    rescales nor casts them). Feature sums and covariances accumulate in float64 and the distance is computed from
    the eigenvalues of the covariances' product; no torch-fidelity, no scipy. The real images' features survive
    :meth:`reset`, so one pass over the real images serves several generated sets. ``sync_on_compute=False``: in a
    torch.distributed group only the process that evaluates has features (see ``vae.evaluate._mean_metric``).
    """
    device = torch.device(device) if device is not None else next(classifier.parameters()).device
    if device.type == "mps":  # MPS has no float64: the metric (and the small classifier) run on the CPU there
        device = torch.device("cpu")
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=ClassifierFeatures(classifier), reset_real_features=False, sync_on_compute=False)
    return metric.to(device)


def frechet_distance(
    classifier: Classifier, real: Tensor, generated: Tensor, *, batch_size: int = 500, progress: bool | None = None
) -> float:
    """The FID between two sets of images (float [N, C, H, W] in [0, 1]) on the classifier's penultimate features.

    ``progress`` as in :func:`vae.progress.progress`, for each set ("FID (real images)", "FID (generated images)").
    """
    metric = fid_metric(classifier)
    with torch.inference_mode():
        _update(metric, real, "FID (real images)", real=True, batch_size=batch_size, progress=progress)
        _update(metric, generated, "FID (generated images)", real=False, batch_size=batch_size, progress=progress)
        return metric.compute().item()


def sample_quality(
    model: VAE,
    classifier: Classifier,
    reference: Tensor,
    test: ImageSet,
    *,
    samples: int = 10_000,
    batch_size: int = 500,
    seed: int = 0,
    progress: bool | None = None,
) -> dict[str, float]:
    """How real the model's images look to ``classifier``, against the ``reference`` images (float [N, C, H, W] in [0, 1]).

    - ``fid``: FID of ``samples`` mean images decoded from latents drawn from the model's prior (with a generator
      seeded with ``seed``);
    - ``reconstruction_fid``: FID of the mean images decoded from the posterior means of the ``test`` images (the test
      set as the model sees it, binarized as it was trained);
    - ``reconstruction_accuracy``: the share of those reconstructions the classifier assigns to their test image's
      label.
    Mean images (not binary or Gaussian draws from them) are what is scored: a draw adds pixel noise that the
    likelihood, not the model's picture of the data, puts there. The classifier is moved to the model's device and
    put in eval mode; the model is evaluated in eval mode and its training flags are restored afterwards.
    ``progress`` as in :func:`vae.progress.progress`, in images, for each of the three passes of the classifier:
    "FID (reference images)", "FID (prior samples)", "FID (reconstructions)".
    """
    if samples < 2:
        raise ValueError(f"samples must be at least 2 (a covariance needs two), got {samples}")
    if tuple(reference.shape[1:]) != tuple(model.image_shape) or tuple(test.pixels.shape[1:]) != tuple(model.image_shape):
        raise ValueError(
            f"reference images {tuple(reference.shape[1:])} and test images {tuple(test.pixels.shape[1:])} must have "
            f"the model's shape {tuple(model.image_shape)}"
        )
    device = next(model.parameters()).device
    test = test.to(device)
    metric = fid_metric(classifier.to(device))
    features = metric.inception
    from torchmetrics.classification import MulticlassAccuracy

    recognised = MulticlassAccuracy(NUM_CLASSES, average="micro", sync_on_compute=False).to(metric.device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with eval_mode(model), torch.inference_mode():
        _update(metric, reference, "FID (reference images)", real=True, batch_size=batch_size, progress=progress)
        with progress_of(samples, "FID (prior samples)", "images", enabled=progress) as done:
            for start in range(0, samples, batch_size):
                count = min(batch_size, samples - start)
                metric.update(model.sample(count, generator=generator).to(metric.device), real=False)
                done.update(count)
        fid = metric.compute().item()
        metric.reset()  # the generated features only
        labels: list[Tensor] = []
        # The classifier's head scores the features FID has just computed, instead of running the network again.
        hook = features.register_forward_hook(lambda module, inputs, out: recognised.update(classifier.head(out), labels.pop()))
        try:
            with progress_of(len(test), "FID (reconstructions)", "images", enabled=progress) as done:
                for start in range(0, len(test), batch_size):
                    labels.append(test.labels[start : start + batch_size].to(metric.device))
                    x = test.batch(slice(start, start + batch_size), generator)
                    metric.update(model.reconstruct(x).to(metric.device), real=False)
                    done.update(len(x))
        finally:
            hook.remove()
        reconstruction_fid = metric.compute().item()
    return {"fid": fid, "reconstruction_fid": reconstruction_fid, "reconstruction_accuracy": recognised.compute().item()}


def _update(
    metric: FrechetInceptionDistance, images: Tensor, description: str, *, real: bool, batch_size: int,
    progress: bool | None,
) -> None:
    """The features of ``images``, ``batch_size`` at a time, into the metric's real or generated statistics."""
    with progress_of(len(images), description, "images", enabled=progress) as done:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            metric.update(batch.to(metric.device), real=real)
            done.update(len(batch))
