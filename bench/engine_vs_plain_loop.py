"""Benchmark: the engine against hand-written PyTorch loops, same model, alternating epoch by epoch.

The model is the pytorch/examples VAE (784-400-20, Bernoulli likelihood, analytic KL) on MNIST's 60k training
images with dynamic binarization, batch 128, Adam 1e-3. Each epoch of the engine is followed by one epoch of each
plain loop, the lean one first, so machine-speed drift hits all of them alike; the ratio is taken epoch by epoch and
its median quoted with its quartiles (this machine's speed wanders by 10-20% from one epoch to the next).
The loops: the tutorial's (a shuffled DataLoader, ``torch.bernoulli``), the same drawing batches by index from one
tensor, and a lean one (index batches, ``rand < p``, fused Adam): what a performance-minded user writes by hand.

    VAE_DATA_MIRROR=../shared/data .venv/bin/python bench/engine_vs_plain_loop.py --epochs 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import data  # noqa: E402
from vae.config import ModelConfig, ObjectiveConfig, TrainConfig  # noqa: E402
from vae.engine import Callback, fit  # noqa: E402
from vae.evaluate import evaluate_elbo  # noqa: E402
from vae.models import build_model  # noqa: E402


class PlainVAE(nn.Module):
    """The pytorch/examples VAE, written out as that example does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc1(x.view(-1, 784)))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.fc4(F.relu(self.fc3(z))), mu, logvar


def plain_loss(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (bce + kld) / x.shape[0]


def plain_epoch(model: PlainVAE, optimizer: torch.optim.Optimizer, batches, binarize=torch.bernoulli) -> None:
    """One epoch of the pytorch/examples loop over ``batches`` of grayscale images, binarized per batch."""
    model.train()
    for x in batches:
        x = binarize(x)
        optimizer.zero_grad()
        logits, mu, logvar = model(x)
        loss = plain_loss(logits, x, mu, logvar)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def plain_test_elbo(model: PlainVAE, test: torch.Tensor) -> float:
    """The test ELBO in nats per image (one reparameterization sample per image)."""
    model.eval()
    total = 0.0
    for x in test.split(1000):
        logits, mu, logvar = model(x)
        total += plain_loss(logits, x, mu, logvar).item() * len(x)
    return -total / len(test)


def threshold_binarize(x: torch.Tensor) -> torch.Tensor:
    """The same Bernoulli draw as ``torch.bernoulli``, a quarter of its cost on CPU."""
    return (torch.rand_like(x) < x).to(x.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    raw = data.load("mnist")
    prepared = data.prepare(raw, validation_size=0, binarization="dynamic")
    train, test = prepared.train, prepared.test
    config = TrainConfig(optimizer="adam", learning_rate=1e-3, batch_size=128, epochs=args.epochs, seed=args.seed, device="cpu")

    loader_model, index_model, lean_model = PlainVAE(), PlainVAE(), PlainVAE()
    loader_optimizer = torch.optim.Adam(loader_model.parameters(), lr=1e-3)
    index_optimizer = torch.optim.Adam(index_model.parameters(), lr=1e-3)
    lean_optimizer = torch.optim.Adam(lean_model.parameters(), lr=1e-3, fused=True)
    loader = DataLoader(TensorDataset(train.pixels), batch_size=128, shuffle=True)
    seconds: dict[str, list[float]] = {"engine": [], "lean loop": [], "indexed loop": [], "dataloader loop": []}

    def timed(name: str, work) -> None:
        started = time.perf_counter()
        work()
        seconds[name].append(time.perf_counter() - started)

    class PlainLoopsAfterEachEpoch(Callback):
        def on_epoch_end(self, state) -> None:
            seconds["engine"].append(state.epoch_seconds[-1])
            order = torch.randperm(len(train))
            lean_batches = (train.pixels[i] for i in order.split(128))
            timed("lean loop", lambda: plain_epoch(lean_model, lean_optimizer, lean_batches, binarize=threshold_binarize))
            order = torch.randperm(len(train))
            timed("indexed loop", lambda: plain_epoch(index_model, index_optimizer, (train.pixels[i] for i in order.split(128))))
            timed("dataloader loop", lambda: plain_epoch(loader_model, loader_optimizer, (x for (x,) in loader)))
            print(
                f"epoch {state.epoch}: " + ", ".join(f"{name} {len(train) / times[-1]:,.0f} img/s" for name, times in seconds.items()),
                flush=True,
            )

    model = build_model(ModelConfig(architecture="mlp", hidden_dims=(400,), latent_dim=20), seed=args.seed)
    fit(model, train, None, ObjectiveConfig(), config, callbacks=[PlainLoopsAfterEachEpoch()], progress=False)

    engine = seconds["engine"]
    print(f"\nMNIST 60k, 784-400-20, batch 128, Adam 1e-3, dynamic binarization, {args.epochs} epochs, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'loop':<16}{'median img/s':>14}{'engine speed / loop speed: median of epochs (quartiles)':>58}{'test ELBO (nats)':>20}")
    elbos = {
        "engine": evaluate_elbo(model, test, ObjectiveConfig())["elbo_nats"],
        "lean loop": plain_test_elbo(lean_model, test.pixels),
        "indexed loop": plain_test_elbo(index_model, test.pixels),
        "dataloader loop": plain_test_elbo(loader_model, test.pixels),
    }
    for name, times in seconds.items():
        ratios = [b / a for a, b in zip(engine, times)]
        low, median, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        spread = f"{median:.3f} ({low:.3f}-{high:.3f})"
        print(f"{name:<16}{statistics.median(len(train) / t for t in times):>14,.0f}{spread:>58}{elbos[name]:>20.2f}")


if __name__ == "__main__":
    main()
