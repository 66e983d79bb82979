"""Training checkpoints: the whole state of a run after an epoch, written atomically and read back without unpickling."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vae.config import ObjectiveConfig, TrainConfig

if TYPE_CHECKING:
    from vae.engine import TrainingState

CHECKPOINT_FORMAT = 1


def save_checkpoint(
    path: Path,
    state: TrainingState,
    shuffle_generator: torch.Generator,
    noise_generator: torch.Generator,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write the state atomically (a temporary file renamed over ``path``), loadable with ``weights_only=True``."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "epoch": state.epoch,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "rng": {"shuffle": shuffle_generator.get_state(), "noise": noise_generator.get_state().cpu()},
        "history": state.history,
        "epoch_seconds": state.epoch_seconds,
        "validation_seconds": state.validation_seconds,
        "early_stopping": {
            "best_val_elbo_nats": state.best_val_elbo_nats,
            "best_epoch": state.best_epoch,
            "epochs_without_improvement": state.epochs_without_improvement,
            "best_model": state.best_model_state,
            "stopped_early": state.stopped_early,
        },
        "intraop_threads": state.intraop_threads,
        "train_config": state.train_config.model_dump(mode="json"),
        "objective": state.objective.model_dump(mode="json"),
        "metadata": metadata or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path | str, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, read with ``weights_only=True``; a damaged file gets a clear
    error.

    Every record's CRC-32 is checked first (torch.load does not check them): a copy torn by a kill or a power cut, or
    with a block of zeros where data should be, is refused instead of loading wrong numbers.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{path}: not a readable checkpoint ({error.__class__.__name__}: {error})") from error
    if damaged is not None:
        raise ValueError(f"{path}: not a readable checkpoint (its record {damaged} does not match its CRC-32: damaged)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ValueError(f"{path}: not a readable checkpoint ({error.__class__.__name__}: {error})") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a checkpoint of format {CHECKPOINT_FORMAT}")
    return payload


def restore_checkpoint(
    state: TrainingState, path: Path, shuffle_generator: torch.Generator, noise_generator: torch.Generator
) -> None:
    """Put the checkpoint at ``path`` into ``state`` and the two generators, refusing changed training settings."""
    checkpoint = load_checkpoint(path, map_location=state.device)
    saved = TrainConfig.model_validate(checkpoint["train_config"])
    changed = [
        name for name in TrainConfig.model_fields
        if name not in ("epochs", "device", "max_minutes") and getattr(saved, name) != getattr(state.train_config, name)
    ]
    if changed:
        raise ValueError(f"{path}: cannot resume with different training settings ({', '.join(changed)})")
    if ObjectiveConfig.model_validate(checkpoint["objective"]) != state.objective:
        raise ValueError(f"{path}: cannot resume with a different objective")
    state.model.load_state_dict(checkpoint["model"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    shuffle_generator.set_state(checkpoint["rng"]["shuffle"].cpu())
    noise_generator.set_state(checkpoint["rng"]["noise"].cpu())
    state.epoch = checkpoint["epoch"]
    state.history = list(checkpoint["history"])
    state.epoch_seconds = list(checkpoint["epoch_seconds"])
    state.validation_seconds = list(checkpoint.get("validation_seconds", []))  # absent before training minutes were kept
    early = checkpoint["early_stopping"]
    state.best_val_elbo_nats = early["best_val_elbo_nats"]
    state.best_epoch = early["best_epoch"]
    state.epochs_without_improvement = early["epochs_without_improvement"]
    state.best_model_state = early["best_model"]
    state.stopped_early = early["stopped_early"]
    # The thread count the sums of every step were split over (see TrainingState); absent from checkpoints of earlier
    # versions, which then resume with this process's.
    state.intraop_threads = checkpoint.get("intraop_threads", state.intraop_threads)
