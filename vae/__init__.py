"""Variational autoencoders in plain PyTorch: models, objectives, a training engine and likelihood evaluation."""

from vae.config import EvalConfig, ModelConfig, ObjectiveConfig, TrainConfig
from vae.data import ImageSet, binarize
from vae.engine import Callback, NonFiniteLossError, TrainingState, fit, load_checkpoint, resolve_device
from vae.evaluate import evaluate_elbo, iwae_bound
from vae.models import VAE, VAEOutput, build_model
from vae.objectives import ElboTerms, elbo_terms, kl_divergence, kl_weight, reconstruction_nll

__all__ = [
    "VAE", "Callback", "ElboTerms", "EvalConfig", "ImageSet", "ModelConfig", "NonFiniteLossError", "ObjectiveConfig",
    "TrainConfig", "TrainingState", "VAEOutput", "binarize", "build_model", "elbo_terms", "evaluate_elbo", "fit",
    "iwae_bound", "kl_divergence", "kl_weight", "load_checkpoint", "reconstruction_nll", "resolve_device",
]
