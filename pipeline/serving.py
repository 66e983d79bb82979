"""MLflow's pyfunc loader for the models this pipeline logs: the network rebuilt by vae/ code from safetensors weights
and a validated config (nothing unpickled), predicting reconstructions of images."""

from __future__ import annotations

import numpy as np
import torch

from vae import export
from vae.models import VAE, HierarchicalVAE

LOADER_MODULE = __name__  # the "loader_module" of the logged model's MLmodel: this very module


class Reconstructions:
    """What ``mlflow.pyfunc.load_model(uri)`` wraps: ``predict(images)`` gives their mean reconstructions."""

    def __init__(self, model: VAE | HierarchicalVAE):
        self.model = model

    def predict(self, data: np.ndarray, params: dict | None = None) -> np.ndarray:
        """Images [N, C, H, W] in [0, 1] (float32, as the signature says) in, reconstructions of that shape out."""
        return self.model.reconstruct(torch.as_tensor(np.asarray(data, dtype=np.float32))).numpy()


def _load_pyfunc(data_path: str) -> Reconstructions:
    """Called by ``mlflow.pyfunc.load_model`` with the logged model's data directory."""
    return Reconstructions(export.load(data_path))
