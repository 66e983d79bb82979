"""Optimizers whose update differs from PyTorch's own (RMSprop as Keras 3 computes it), and Adam's own update made
without the Python of its step."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks


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


def updates_from_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`fused_adam_update` can make ``optimizer``'s steps: a fused ``torch.optim.Adam`` (no AMSGrad,
    no decoupled weight decay) over one group of contiguous parameters that all train, with no step hooks."""
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    unsupported = ("amsgrad", "capturable", "differentiable", "decoupled_weight_decay")
    hooks = optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
    return (
        bool(group["fused"]) and not any(group.get(key) for key in unsupported) and not hooks
        and not _global_optimizer_pre_hooks and not _global_optimizer_post_hooks
        and all(p.requires_grad and p.is_contiguous() for p in group["params"])
    )


def fused_adam_update(optimizer: torch.optim.Adam, gradients: Sequence[Tensor]) -> None:
    """``optimizer.step()`` with ``gradients`` as its parameters' gradients, in their order, by the kernel that step
    runs: the same bits, without the step's per-call Python (grouping tensors by device, hooks, the ``.grad``
    attributes and clearing them), which is about 5% of a step of a small MLP on a CPU. ``optimizer`` must pass
    :func:`updates_from_gradients`. The first step, which creates the optimizer's state, and a step where a parameter
    has no gradient (None: it skips that parameter) are PyTorch's own."""
    group = optimizer.param_groups[0]
    params = group["params"]
    # Contiguous as the .grad attributes are (the fused CPU kernel reads a tensor's memory in order, whatever its strides).
    gradients = [None if g is None else g.contiguous() for g in gradients]
    if any(g is None for g in gradients) or any(p not in optimizer.state for p in params):
        for p, g in zip(params, gradients):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return
    states = [optimizer.state[p] for p in params]
    steps = [state["step"] for state in states]
    torch._foreach_add_(steps, 1)
    beta1, beta2 = group["betas"]
    torch._fused_adam_(
        params, gradients, [state["exp_avg"] for state in states], [state["exp_avg_sq"] for state in states], [], steps,
        amsgrad=False, lr=group["lr"], beta1=float(beta1), beta2=float(beta2), weight_decay=group["weight_decay"],
        eps=group["eps"], maximize=group["maximize"], grad_scale=None, found_inf=None,
    )
