"""Variational autoencoders in plain PyTorch: models, objectives, a training engine and likelihood evaluation."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# What `from vae import X` finds, and in which module. Loaded on first use, so that `import vae.config` (which the
# command line needs to check a config at once) does not import torch.
_EXPORTS = {
    "ClassifierConfig": "vae.config", "EvalConfig": "vae.config", "ModelConfig": "vae.config",
    "ObjectiveConfig": "vae.config", "TrainConfig": "vae.config",
    "ImageSet": "vae.data", "binarize": "vae.data",
    "Callback": "vae.engine", "NonFiniteLossError": "vae.engine", "TrainingState": "vae.engine", "fit": "vae.engine",
    "load_checkpoint": "vae.checkpoint", "resolve_device": "vae.distributed",
    "evaluate_elbo": "vae.evaluate", "iwae_bound": "vae.evaluate",
    "Classifier": "vae.classifier", "load_classifier": "vae.classifier", "train_classifier": "vae.classifier",
    "frechet_distance": "vae.sample_quality",  # not sample_quality: that name is its module's
    "VAE": "vae.models", "VAEOutput": "vae.models", "build_model": "vae.models",
    "HierarchicalVAE": "vae.models", "LatentSample": "vae.models",
    "StandardNormalPrior": "vae.priors", "VampPrior": "vae.priors",
    "ElboTerms": "vae.objectives", "elbo_terms": "vae.objectives", "kl_divergence": "vae.objectives",
    "kl_weight": "vae.objectives", "reconstruction_nll": "vae.objectives", "training_loss": "vae.objectives",
    "iwae_training_loss": "vae.objectives", "log_importance_weights": "vae.objectives",
}
__all__ = [
    "Callback", "Classifier", "ClassifierConfig", "ElboTerms", "EvalConfig", "HierarchicalVAE", "ImageSet",
    "LatentSample", "ModelConfig", "NonFiniteLossError", "ObjectiveConfig", "StandardNormalPrior", "TrainConfig",
    "TrainingState", "VAE", "VAEOutput", "VampPrior", "binarize", "build_model", "elbo_terms", "evaluate_elbo", "fit",
    "frechet_distance", "iwae_bound", "iwae_training_loss", "kl_divergence", "kl_weight", "load_checkpoint",
    "load_classifier", "log_importance_weights", "reconstruction_nll", "resolve_device", "train_classifier",
    "training_loss",
]

if TYPE_CHECKING:
    from vae.checkpoint import load_checkpoint
    from vae.classifier import Classifier, load_classifier, train_classifier
    from vae.config import ClassifierConfig, EvalConfig, ModelConfig, ObjectiveConfig, TrainConfig
    from vae.data import ImageSet, binarize
    from vae.distributed import resolve_device
    from vae.engine import Callback, NonFiniteLossError, TrainingState, fit
    from vae.evaluate import evaluate_elbo, iwae_bound
    from vae.models import VAE, HierarchicalVAE, LatentSample, VAEOutput, build_model
    from vae.objectives import (
        ElboTerms, elbo_terms, iwae_training_loss, kl_divergence, kl_weight, log_importance_weights, reconstruction_nll,
        training_loss,
    )
    from vae.priors import StandardNormalPrior, VampPrior
    from vae.sample_quality import frechet_distance


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
