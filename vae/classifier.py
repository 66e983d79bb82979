"""A small convolutional classifier of a data set's images, whose penultimate features are where FID is measured."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from vae.config import ClassifierConfig
from vae.distributed import resolve_device
from vae.progress import progress as progress_of

NUM_CLASSES = 10
# The network's layout, stored in every weights file: a change of layout must not load old weights (or reuse an old
# registered classifier), so it is part of what identifies a classifier.
ARCHITECTURE = "conv3x3-bn-pool-conv3x3-bn-pool-dense-relu/2"


class Classifier(nn.Module):
    """Two 3x3 convolutions, each followed by batch normalization, ReLU and 2x2 max-pooling, a dense ReLU layer of
    ``feature_dim`` features (the penultimate layer, ``features``), dropout and the linear layer to the class logits.

    Batch normalization is there because without it the same network stops at 98.89% test accuracy on MNIST and
    89.96% on Fashion-MNIST after three epochs (BENCHMARKS.md), short of the 99.0% and 90% FID here is meant to have."""

    def __init__(self, config: ClassifierConfig, image_shape: tuple[int, int, int] = (1, 28, 28)):
        super().__init__()
        channels, height, width = image_shape
        if height % 4 or width % 4:
            raise ValueError(f"image height and width must be multiples of 4 (two 2x2 poolings), got {image_shape}")
        c1, c2 = config.conv_channels
        self.config, self.image_shape = config, tuple(image_shape)
        self.num_features = config.feature_dim  # torchmetrics' FID reads the feature dimension from here
        self.features = nn.Sequential(
            nn.Conv2d(channels, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * (height // 4) * (width // 4), config.feature_dim), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.feature_dim, NUM_CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits [N, 10] of images [N, C, H, W] in [0, 1]."""
        return self.head(self.features(x))


def build_classifier(config: ClassifierConfig, image_shape: tuple[int, int, int] = (1, 28, 28)) -> Classifier:
    """The classifier of ``config``, its weights drawn with ``config.seed`` (without touching the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return Classifier(config, image_shape)


def train_classifier(
    config: ClassifierConfig,
    images: Tensor,
    labels: Tensor,
    *,
    device: torch.device | str = "auto",
    progress: bool | None = None,
) -> tuple[Classifier, list[dict[str, float]]]:
    """Train a classifier of ``config`` on ``images`` (float [N, C, H, W] in [0, 1]) and ``labels`` (int [N]).

    Adam with the learning rate decayed linearly to zero over the run, cross-entropy, batches drawn by index from
    the images held as one tensor on the device, seeded by ``config.seed`` (shuffling and dropout; the global RNG is
    left as it was): the same config and data give the same classifier on the CPU. Returns the classifier in eval
    mode and one record per epoch (``train_loss``, ``train_accuracy``, ``seconds``). ``progress`` as in
    :func:`vae.progress.progress`, in images over all the epochs ("classifier training (3 epochs)"): one report for
    the whole training, so that a log gets its line every LOG_EVERY_SECONDS however short an epoch is.
    """
    if images.ndim != 4 or not images.is_floating_point() or labels.shape != images.shape[:1]:
        raise ValueError(
            f"images must be float [N, C, H, W] with labels [N], got {images.dtype} {tuple(images.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    if config.train_subset is not None:
        if config.train_subset > len(images):
            raise ValueError(f"train_subset ({config.train_subset}) exceeds the {len(images)} training images")
        images, labels = images[: config.train_subset], labels[: config.train_subset]
    device = resolve_device(device)
    classifier = build_classifier(config, tuple(images.shape[1:])).to(device)
    images, labels = images.to(device), labels.to(device)
    n = len(images)
    steps = math.ceil(n / config.batch_size)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=config.learning_rate, fused=device.type in ("cpu", "cuda") or None)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / (config.epochs * steps))
    shuffle = torch.Generator().manual_seed(config.seed)
    history = []
    report = progress_of(config.epochs * n, f"classifier training ({config.epochs} epochs)", "images", enabled=progress)
    classifier.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), report as done:
        torch.manual_seed(config.seed + 1)  # dropout draws from the global generator
        for epoch in range(1, config.epochs + 1):
            started = time.perf_counter()
            order = torch.randperm(n, generator=shuffle).to(device)
            losses = torch.empty(steps, device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            for step in range(steps):
                index = order[step * config.batch_size : (step + 1) * config.batch_size]
                logits = classifier(images[index])
                loss = F.cross_entropy(logits, labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses[step] = loss.detach()
                correct += (logits.detach().argmax(1) == labels[index]).sum()
                done.update(len(index))
            history.append(
                {"train_loss": losses.mean().item(), "train_accuracy": correct.item() / n, "seconds": time.perf_counter() - started}
            )
    return classifier.eval(), history


def accuracy(classifier: Classifier, images: Tensor, labels: Tensor, *, batch_size: int = 1000) -> float:
    """The share of ``images`` whose most likely class is their label (the classifier's flags are restored)."""
    from torchmetrics.classification import MulticlassAccuracy  # here: importing torchmetrics takes most of a second

    device = next(classifier.parameters()).device
    metric = MulticlassAccuracy(NUM_CLASSES, average="micro", sync_on_compute=False).to(device)
    training = classifier.training
    classifier.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = images[start : start + batch_size].to(device)
                metric.update(classifier(x), labels[start : start + batch_size].to(device))
            return metric.compute().item()
    finally:
        classifier.train(training)


def save_classifier(classifier: Classifier, path: Path | str) -> None:
    """Write the weights as safetensors, with the recipe and the layout in its metadata: loading never unpickles."""
    metadata = {
        "architecture": ARCHITECTURE,
        "recipe": classifier.config.model_dump_json(),
        "image_shape": json.dumps(classifier.image_shape),
    }
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in classifier.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


def load_classifier(path: Path | str, *, device: torch.device | str = "cpu") -> Classifier:
    """A classifier written by :func:`save_classifier`, rebuilt from its recipe and loaded strictly, in eval mode.

    A file that is not such a classifier (damaged, another layout, a bad recipe) is a ValueError naming it.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            state = {name: file.get_tensor(name) for name in file.keys()}
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    if metadata.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{path}: a classifier of layout {metadata.get('architecture')!r}, expected {ARCHITECTURE!r}")
    try:
        config = ClassifierConfig.model_validate_json(metadata["recipe"])
        image_shape = tuple(json.loads(metadata["image_shape"]))
        classifier = Classifier(config, image_shape)
        classifier.load_state_dict(state, strict=True)
    except (KeyError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: not a classifier this code can load ({type(error).__name__}: {error})") from error
    return classifier.to(device).eval()
