"""Optimizers whose update differs from PyTorch's own: RMSprop as Keras 3 computes it."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class KerasRMSprop(torch.optim.Optimizer):
    """RMSprop with Keras 3's update, which puts epsilon inside the square root (PyTorch, and TF 2's Keras, add it to
    the root):

    v <- rho * v + (1 - rho) * g^2;  w <- w - lr * g / sqrt(v + epsilon),  v starting at 0.

    With Keras' epsilon of 1e-7 the step of a parameter whose gradients are small (|g| below about sqrt(epsilon),
    3e-4) is damped where PyTorch's would not be. Keras' defaults: lr 1e-3, rho 0.9, epsilon 1e-7; no momentum.
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, rho: float = 0.9, eps: float = 1e-7):
        if lr <= 0 or eps <= 0 or not 0 <= rho < 1:
            raise ValueError(f"KerasRMSprop needs lr > 0, eps > 0 and 0 <= rho < 1, got lr={lr}, rho={rho}, eps={eps}")
        super().__init__(params, {"lr": lr, "rho": rho, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            velocities = []
            for p in params:
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                velocities.append(state["velocity"])
            # One multi-tensor kernel per operation over all parameters, as PyTorch's own foreach optimizers do.
            torch._foreach_mul_(velocities, group["rho"])
            torch._foreach_addcmul_(velocities, grads, grads, value=1 - group["rho"])
            denominators = torch._foreach_add(velocities, group["eps"])
            torch._foreach_sqrt_(denominators)
            torch._foreach_addcdiv_(params, grads, denominators, value=-group["lr"])
        return loss
