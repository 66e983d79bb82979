"""The training loop: data on the device, batches by index, per-epoch callbacks and checkpoints, exact resume, DDP."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from vae.checkpoint import restore_checkpoint, save_checkpoint
from vae.config import ObjectiveConfig, TrainConfig
from vae.data import ImageSet
from vae.distributed import check_backend, from_rank_0, rank_and_world_size, resolve_device, sum_over_processes
from vae.evaluate import evaluate_elbo, uses_sampled_terms
from vae.objectives import ElboTerms, elbo_terms, iwae_training_loss, kl_weight, sampled_elbo_terms, training_loss
from vae.optimizers import KerasRMSprop, fused_adam_update, updates_from_gradients

logger = logging.getLogger(__name__)
CHECK_EVERY_STEPS = 50  # how often the loop looks at the loss on the host (a device sync)
VALIDATION_BATCH_SIZE = 1000
VALIDATION_METRICS = ("elbo_nats", "reconstruction_nats", "kl_nats")  # evaluate_elbo's, which rank 0 shares


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the model is not usable."""

    def __init__(self, epoch: int, step: int, value: float):
        super().__init__(
            f"non-finite loss ({value}) at epoch {epoch}, step {step}: training stopped; "
            "lower the learning rate, clip gradients (grad_clip_norm) or check the data"
        )
        self.epoch, self.step, self.value = epoch, step, value

    def __reduce__(self):  # pickled with its own arguments, so that it crosses process boundaries (Dask, torchrun)
        return type(self), (self.epoch, self.step, self.value)


@dataclass
class TrainingState:
    """What the loop knows after each epoch; callbacks read it, checkpoints store it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_config: TrainConfig
    objective: ObjectiveConfig
    device: torch.device
    epoch: int = 0  # last completed epoch, counted from 1
    history: list[dict[str, float]] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)  # each epoch's training pass
    validation_seconds: list[float] = field(default_factory=list)  # each epoch's validation ELBO
    best_val_elbo_nats: float = -math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    best_model_state: dict[str, Tensor] | None = None
    stopped_early: bool = False
    # How many threads torch splits each operation over. On the CPU a matrix product's sums are split over them, so the
    # bits of every step depend on their number: the checkpoint records it and a resumed run trains with it again.
    intraop_threads: int = field(default_factory=torch.get_num_threads)
    # The last epoch's per-step batch means, [steps, 3]: loss, reconstruction and KL (nats). For callbacks that
    # report per-batch averages as some tutorials print them; not checkpointed.
    batch_means: Tensor | None = None

    @property
    def training_minutes(self) -> float:
        """Minutes spent so far in the training passes and the validations after them (not checkpoints or callbacks)."""
        return self.training_minutes_after(len(self.epoch_seconds))

    def training_minutes_after(self, epoch: int) -> float:
        """:attr:`training_minutes` as it was at the end of ``epoch`` (counted from 1)."""
        return (sum(self.epoch_seconds[:epoch]) + sum(self.validation_seconds[:epoch])) / 60

    @property
    def final_val_elbo_nats(self) -> float | None:
        """The validation ELBO of the parameters :func:`fit` returns: the best epoch's when early stopping restored
        them, else the last epoch's; None without a validation set."""
        if self.train_config.early_stopping_patience is not None and self.best_model_state is not None:
            return self.best_val_elbo_nats
        return self.history[-1].get("val_elbo_nats") if self.history else None


class Callback:
    """Hooks called by :func:`fit`; override the ones you need."""

    def on_fit_start(self, state: TrainingState) -> None: ...

    def on_epoch_metrics(self, state: TrainingState) -> dict[str, float]:
        """Further metrics of the epoch just trained (``state.epoch``), such as a test-set figure; they join its
        history entry before the checkpoint is written and ``on_epoch_end`` runs. Kept out of the epoch's seconds."""
        return {}

    def on_epoch_end(self, state: TrainingState) -> None: ...

    def on_fit_end(self, state: TrainingState) -> None: ...


class SampledElboTerms(nn.Module):
    """The ELBO's terms of ``samples`` draws of the latents of each image, [samples, B] (see
    :func:`vae.objectives.sampled_elbo_terms`), as a module's forward: DistributedDataParallel and torch.compile wrap
    the importance-weighted objective through it as they wrap the model's own forward."""

    def __init__(self, model: nn.Module, objective: ObjectiveConfig):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, x: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> ElboTerms:
        """The terms for the noise ``noise`` [samples, B, latent_dim], else noise drawn with ``generator``."""
        if noise is None:
            shape = (self.objective.samples, x.shape[0], self.model.latent_dim)
            noise = torch.randn(shape, generator=generator, device=x.device)
        return sampled_elbo_terms(x, self.model.latent_sample(self.model.posterior(x), noise), self.objective)


def learning_rate(config: TrainConfig, progress_epochs: float) -> float:
    """The learning rate after ``progress_epochs`` (fractional) epochs: a linear ramp from 0 over the first
    ``lr_warmup_epochs``, times 1 (constant) or the cosine from 1 down to ``lr_final_fraction`` over all ``epochs``."""
    factor = 1.0
    if config.lr_schedule == "cosine":
        progress = min(1.0, progress_epochs / config.epochs)
        final = config.lr_final_fraction
        factor = final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.lr_warmup_epochs > 0:
        factor *= min(1.0, progress_epochs / config.lr_warmup_epochs)
    return config.learning_rate * factor


def has_schedule(config: TrainConfig) -> bool:
    """Whether the learning rate changes during training (else the optimizer's own is never touched)."""
    return config.lr_schedule != "constant" or config.lr_warmup_epochs > 0


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over the model's parameters."""
    if config.optimizer == "adam":
        # The fused kernel updates all parameters in one pass: on a CPU about 10x faster than the default loop.
        fused = next(model.parameters()).device.type in ("cpu", "cuda")
        eps = 1e-8 if config.epsilon is None else config.epsilon
        return torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=eps, fused=fused or None)
    # Keras' RMSprop defaults (rho 0.9, eps 1e-7), which the Keras example trains with.
    eps = 1e-7 if config.epsilon is None else config.epsilon
    if config.optimizer == "keras_rmsprop":
        return KerasRMSprop(model.parameters(), lr=config.learning_rate, rho=0.9, eps=eps)
    return torch.optim.RMSprop(model.parameters(), lr=config.learning_rate, alpha=0.9, eps=eps)


def epoch_order(images: int, config: TrainConfig, generator: torch.Generator) -> Tensor:
    """The order an epoch visits the training images in (batch i is positions i * batch_size onwards): a new random
    permutation drawn with ``generator``, or, without ``shuffle``, the set's own order (nothing drawn)."""
    if config.shuffle:
        return torch.randperm(images, generator=generator)
    return torch.arange(images)


def steps_per_epoch(images: int, config: TrainConfig) -> int:
    """Optimizer steps in an epoch of ``images``: every batch, or only the full ones with ``drop_last``."""
    return images // config.batch_size if config.drop_last else math.ceil(images / config.batch_size)


def fit(
    model: nn.Module,
    train: ImageSet,
    validation: ImageSet | None,
    objective: ObjectiveConfig,
    config: TrainConfig,
    *,
    callbacks: Iterable[Callback] = (),
    checkpoint_path: Path | str | None = None,
    resume_from: Path | str | None = None,
    metadata: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> TrainingState:
    """Train ``model`` on ``train`` for ``config.epochs`` epochs and return the final state.

    The data sets are moved to the training device once. After every epoch the validation ELBO is computed, a
    checkpoint is written atomically (with ``checkpoint_path``) and the callbacks run. ``resume_from`` continues a run
    from its checkpoint and ends with the same parameters as an uninterrupted run, bit for bit: it trains with the
    number of intra-op threads the checkpoint recorded (a step's sums are split over them), and says so on the
    ``vae.engine`` logger when this process would use another. With early stopping the
    parameters of the best validation epoch are restored at the end. ``metadata`` (plain values) is stored in the
    checkpoint as it is. A NaN or infinite loss raises :class:`NonFiniteLossError`. With a fused Adam (the default on
    CPU and CUDA) the gradients go straight to its kernel, so the parameters' ``.grad`` stay None; an optimizer step hook
    (``register_step_pre_hook``) sees them in ``.grad`` as usual, since with one the steps are PyTorch's own.

    In a torch.distributed process group (see :func:`vae.distributed.process_group`) every process calls ``fit`` with the same data
    and settings and trains with DistributedDataParallel on its contiguous shard of every batch. Every process draws
    the random numbers of the whole batch (shuffle, binarization, reparameterization noise) and keeps its shard's
    rows, so the run ends with the parameters of one process training on the same batches, up to float rounding.
    The history holds the metrics of the whole batches, all processes stop at the same NaN, rank 0 computes the
    validation ELBO and shares it, and only rank 0 writes the checkpoint, shows progress and calls the callbacks.
    ``resume_from`` must then name the same checkpoint on every process.
    """
    rank, world_size = rank_and_world_size()
    device = resolve_device(config.device)
    check_backend(device)
    model.to(device)
    train = train.to(device)
    validation = validation.to(device) if validation is not None else None
    if config.early_stopping_patience is not None and validation is None:
        raise ValueError("early_stopping_patience needs a validation set (validation_size > 0)")
    if steps_per_epoch(len(train), config) == 0:
        raise ValueError(f"drop_last leaves no step: {len(train)} training images is less than batch_size {config.batch_size}")
    shuffle_generator = torch.Generator().manual_seed(config.seed)
    noise_generator = torch.Generator(device=device).manual_seed(config.seed + 1)
    state = TrainingState(model, make_optimizer(model, config), config, objective, device)
    if resume_from is not None:
        restore_checkpoint(state, Path(resume_from), shuffle_generator, noise_generator)
        if state.intraop_threads != torch.get_num_threads():
            logger.warning(
                "resuming with %d intra-op threads, as the run was trained, instead of this process's %d: every step's "
                "bits depend on the thread count", state.intraop_threads, torch.get_num_threads(),
            )
    sampled = uses_sampled_terms(model, objective)
    step_model = SampledElboTerms(model, objective) if sampled else model
    step_model = DistributedDataParallel(step_model) if world_size > 1 else step_model
    step_model = torch.compile(step_model) if config.compile else step_model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.precision == "bf16" else contextlib.nullcontext()
    show_progress = rank == 0 and (sys.stderr.isatty() if progress is None else progress)
    callbacks = list(callbacks) if rank == 0 else []

    with intraop_threads(state.intraop_threads):
        for callback in callbacks:
            callback.on_fit_start(state)
        for epoch in range(state.epoch + 1, config.epochs + 1):
            if state.stopped_early or _out_of_time(state):
                break
            started = time.perf_counter()
            metrics, state.batch_means = _train_epoch(
                state, step_model, train, epoch, shuffle_generator, noise_generator, autocast, show_progress
            )
            state.epoch_seconds.append(time.perf_counter() - started)
            if validation is not None:  # rank 0's numbers on every process, so that all of them stop at the same epoch
                started, val = time.perf_counter(), None
                if rank == 0:
                    val = evaluate_elbo(model, validation, objective, batch_size=VALIDATION_BATCH_SIZE, seed=config.seed)
                shared = from_rank_0(val, VALIDATION_METRICS, device)
                metrics.update({f"val_{name}": value for name, value in shared.items()})
                state.validation_seconds.append(time.perf_counter() - started)
            state.epoch = epoch
            for callback in callbacks:
                metrics.update(callback.on_epoch_metrics(state))
            state.history.append(metrics)
            if validation is not None:
                _track_best(state, metrics["val_elbo_nats"])
            if checkpoint_path is not None and rank == 0:
                save_checkpoint(Path(checkpoint_path), state, shuffle_generator, noise_generator, metadata)
            for callback in callbacks:
                callback.on_epoch_end(state)
        if config.early_stopping_patience is not None and state.best_model_state is not None:
            model.load_state_dict(state.best_model_state)
        for callback in callbacks:
            callback.on_fit_end(state)
    return state


@contextlib.contextmanager
def intraop_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside the block and put back after it.

    Set even when it is already ``count``: torch.set_num_threads also turns off MKL's dynamic choice of a thread count
    per call, so that a resumed run splits its sums exactly as the run it continues.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train_epoch(
    state: TrainingState,
    step_model: nn.Module,
    train: ImageSet,
    epoch: int,
    shuffle_generator: torch.Generator,
    noise_generator: torch.Generator,
    autocast: contextlib.AbstractContextManager,
    show_progress: bool,
) -> tuple[dict[str, float], Tensor]:
    """One epoch; its metrics (means per image, and ``train_loss``, the mean of the steps' losses) and the steps'
    batch means of loss, reconstruction and KL, [steps, 3]."""
    config, objective, optimizer, model = state.train_config, state.objective, state.optimizer, state.model
    rank, world_size = rank_and_world_size()
    sampled = uses_sampled_terms(model, objective)
    scheduled = has_schedule(config)
    # Gradients handed straight to the fused Adam kernel, bit for bit the update of zero_grad, backward and step. Not
    # with several processes (DDP averages gradients in backward's hooks) nor with clipping (it reads the .grad).
    direct_update = world_size == 1 and config.grad_clip_norm is None and updates_from_gradients(optimizer)
    parameters = optimizer.param_groups[0]["params"]
    steps = steps_per_epoch(len(train), config)
    n = steps * config.batch_size if config.drop_last else len(train)  # images seen this epoch
    order = epoch_order(len(train), config, shuffle_generator).to(state.device)
    losses = torch.empty(steps, 3, device=state.device)  # per step: loss, reconstruction and KL batch means
    totals = torch.zeros(2, device=state.device)  # summed reconstruction and KL, nats
    weighted_kl = 0.0
    checked = 0  # how many steps' losses have been checked (and, with several processes, averaged over them)
    model.train()
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=not show_progress)
    for step in range(steps):
        index = order[step * config.batch_size : (step + 1) * config.batch_size]
        x = train.batch(index, noise_generator)
        progress_epochs = epoch - 1 + step / steps
        if scheduled:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, progress_epochs)
        weight = kl_weight(objective, progress_epochs)
        # With several processes, each draws the noise of the whole batch, as one process draws it, then keeps its
        # rows. DDP averages the processes' gradients: each one's loss is its shard's sum over the whole batch's share
        # per process, which makes that the gradient of the mean over the whole batch, also when the shards differ by
        # an image (the last batch). In one process this is the batch mean, bit for bit. The terms' batch means are
        # shared out the same way.
        rows = slice(rank * len(index) // world_size, (rank + 1) * len(index) // world_size)
        share = len(index) / world_size
        if sampled:
            noise = None
            if world_size > 1:
                shape = (objective.samples, len(index), model.latent_dim)
                noise = torch.randn(shape, generator=noise_generator, device=state.device)[:, rows]
                x = x[rows]
            with autocast:
                per_sample = step_model(x, generator=noise_generator, noise=noise)
            loss = iwae_training_loss(per_sample, weight, share)
            terms = ElboTerms(per_sample.reconstruction.mean(0), per_sample.kl.mean(0))
        else:
            eps = None
            if world_size > 1:
                eps = torch.randn(len(index), model.latent_dim, generator=noise_generator, device=state.device)[rows]
                x = x[rows]
            with autocast:
                output = step_model(x, generator=noise_generator, eps=eps)
            terms = elbo_terms(x, output, objective)
            loss = training_loss(terms, weight, share)
        if direct_update:
            fused_adam_update(optimizer, torch.autograd.grad(loss, parameters, allow_unused=True))
        else:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
            optimizer.step()
        sums = torch.stack((terms.reconstruction.detach().sum(), terms.kl.detach().sum()))
        totals += sums
        losses[step, 0] = loss.detach()
        losses[step, 1:] = sums / share
        weighted_kl += weight * len(index)
        if (step + 1) % CHECK_EVERY_STEPS == 0 or step + 1 == steps:
            sum_over_processes(losses[checked : step + 1]).div_(world_size)
            checked = step + 1
            _check_finite(losses[: step + 1, 0], epoch)
            bar.set_postfix(loss=f"{losses[step, 0].item():.2f}", refresh=False)
            bar.update(step + 1 - bar.n)
    bar.close()
    reconstruction, kl = (sum_over_processes(totals) / n).tolist()
    metrics = {
        "train_loss": losses[:, 0].mean().item(),
        "train_elbo_nats": -(reconstruction + kl),
        "train_reconstruction_nats": reconstruction,
        "train_kl_nats": kl,
        "kl_weight": weighted_kl / n,
    }
    if scheduled:
        metrics["learning_rate"] = optimizer.param_groups[0]["lr"]  # the epoch's last step's
    return metrics, losses


def _out_of_time(state: TrainingState) -> bool:
    """Whether another epoch, as long as the mean one so far, would end past ``max_minutes`` of training. Every
    process decides on rank 0's clock, so that all of them stop at the same epoch."""
    limit = state.train_config.max_minutes
    if limit is None or not state.epoch_seconds:
        return False
    per_epoch_minutes = state.training_minutes / len(state.epoch_seconds)
    out_of_time = state.training_minutes + per_epoch_minutes > limit
    mine = {"out_of_time": float(out_of_time)} if rank_and_world_size()[0] == 0 else None
    return bool(from_rank_0(mine, ["out_of_time"], state.device)["out_of_time"])


def _check_finite(losses: Tensor, epoch: int) -> None:
    bad = ~torch.isfinite(losses)
    if bad.any():
        step = int(bad.nonzero()[0])
        raise NonFiniteLossError(epoch, step + 1, losses[step].item())


def _track_best(state: TrainingState, val_elbo_nats: float) -> None:
    if val_elbo_nats > state.best_val_elbo_nats:
        state.best_val_elbo_nats, state.best_epoch, state.epochs_without_improvement = val_elbo_nats, state.epoch, 0
        if state.train_config.early_stopping_patience is not None:
            state.best_model_state = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
    else:
        state.epochs_without_improvement += 1
        patience = state.train_config.early_stopping_patience
        state.stopped_early = patience is not None and state.epochs_without_improvement >= patience
