"""Specification of Keras' RMSprop: its update by hand, epsilon inside the square root."""

import copy
import math

import pytest
import torch

from vae.config import TrainConfig
from vae.engine import make_optimizer
from vae.optimizers import KerasRMSprop


def test_two_steps_follow_keras_update_with_epsilon_inside_the_square_root():
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = KerasRMSprop([weight], lr=0.01, rho=0.9, eps=1e-7)
    expected, velocity = [1.0, -2.0], [0.0, 0.0]
    for gradient in ([1e-4, 3.0], [-2e-4, 1.0]):
        weight.grad = torch.tensor(gradient, dtype=torch.float64)
        optimizer.step()
        for i, g in enumerate(gradient):
            velocity[i] = 0.9 * velocity[i] + 0.1 * g * g
            expected[i] -= 0.01 * g / math.sqrt(velocity[i] + 1e-7)
        assert weight.tolist() == pytest.approx(expected, rel=1e-12)


def test_a_small_gradient_moves_less_than_under_pytorchs_rmsprop():
    # |g| = 1e-4 is below sqrt(epsilon) ~ 3.2e-4: Keras' first step is lr * g / sqrt(0.1 g^2 + eps), about a third of
    # PyTorch's lr * g / (sqrt(0.1 g^2) + eps).
    steps = {}
    for name, make in (("keras", lambda p: KerasRMSprop([p], lr=0.01)), ("pytorch", lambda p: torch.optim.RMSprop([p], lr=0.01, alpha=0.9, eps=1e-7))):
        weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        weight.grad = torch.tensor([1e-4], dtype=torch.float64)
        make(weight).step()
        steps[name] = -weight.item()
    assert steps["keras"] == pytest.approx(0.01 * 1e-4 / math.sqrt(1e-9 + 1e-7))
    assert steps["pytorch"] == pytest.approx(0.01 * 1e-4 / (math.sqrt(1e-9) + 1e-7))
    assert steps["keras"] < steps["pytorch"] / 3


def test_state_round_trips_through_a_state_dict_so_a_resumed_run_continues_exactly():
    weights = [torch.nn.Parameter(torch.tensor([0.5, 1.5])) for _ in range(2)]
    optimizer = KerasRMSprop(weights)
    for p in weights:
        p.grad = torch.tensor([0.1, -0.2])
    optimizer.step()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in weights]
    restored = KerasRMSprop(copies)
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as read back from a checkpoint file
    for p, q in zip(weights, copies):
        p.grad, q.grad = torch.tensor([0.3, 0.4]), torch.tensor([0.3, 0.4])
    optimizer.step(), restored.step()
    assert all(torch.equal(p, q) for p, q in zip(weights, copies))


@pytest.mark.parametrize(
    ("name", "kind", "eps"),
    [("adam", torch.optim.Adam, 1e-8), ("rmsprop", torch.optim.RMSprop, 1e-7), ("keras_rmsprop", KerasRMSprop, 1e-7)],
)
def test_each_optimizer_setting_builds_its_optimizer_with_its_default_or_the_configured_epsilon(name, kind, eps):
    model = torch.nn.Linear(2, 1)
    built = make_optimizer(model, TrainConfig(optimizer=name, learning_rate=0.05))
    assert type(built) is kind and built.defaults["eps"] == eps and built.defaults["lr"] == 0.05
    assert make_optimizer(model, TrainConfig(optimizer=name, epsilon=1e-3)).defaults["eps"] == 1e-3


def test_bad_hyperparameters_are_refused_by_name():
    with pytest.raises(ValueError, match="KerasRMSprop needs lr > 0, eps > 0 and 0 <= rho < 1, got lr=0.001, rho=1.0, eps=1e-07"):
        KerasRMSprop([torch.nn.Parameter(torch.zeros(1))], rho=1.0)
