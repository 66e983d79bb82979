"""Specification of Keras' RMSprop (its update by hand, epsilon inside the square root) and of Adam's update made
straight from a list of gradients."""

import copy
import math

import pytest
import torch

from vae.config import TrainConfig
from vae.engine import make_optimizer
from vae.optimizers import KerasRMSprop, fused_adam_update, updates_from_gradients


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


def adam_pair(**settings) -> tuple[list[torch.nn.Parameter], torch.optim.Adam, list[torch.nn.Parameter], torch.optim.Adam]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (4,), (2, 3)]
    weights = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    return weights, torch.optim.Adam(weights, **settings), copies, torch.optim.Adam(copies, **settings)


@pytest.mark.parametrize("settings", [{}, {"weight_decay": 0.1, "betas": (0.5, 0.9), "eps": 1e-3}, {"maximize": True}])
def test_fused_adam_update_of_gradients_makes_the_steps_of_torchs_fused_adam_bit_for_bit(settings):
    weights, optimizer, copies, direct = adam_pair(lr=0.01, fused=True, **settings)
    assert updates_from_gradients(direct)
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        gradients = [torch.randn(w.shape, generator=generator) for w in weights]
        # A transposed gradient as a layer's backward may return it: its memory is not in the parameter's order.
        gradients[0] = torch.randn(4, 3, generator=generator).t()
        optimizer.zero_grad()
        torch.autograd.backward(weights, gradients)  # into .grad as backward stores a gradient: in the parameter's layout
        optimizer.step()
        fused_adam_update(direct, gradients)
        assert all(torch.equal(w, c) for w, c in zip(weights, copies)), step
    assert all(c.grad is None for c in copies)
    for key, state in optimizer.state_dict()["state"].items():
        assert all(torch.equal(value, direct.state_dict()["state"][key][name]) for name, value in state.items())


def test_a_parameter_without_a_gradient_is_skipped_as_torchs_step_skips_it():
    weights, optimizer, copies, direct = adam_pair(lr=0.01, fused=True)
    for round_ in range(3):
        gradients = [torch.full(w.shape, 0.5 + round_) for w in weights]
        gradients[1] = None if round_ == 1 else gradients[1]
        optimizer.zero_grad()
        torch.autograd.backward(*zip(*((w, g) for w, g in zip(weights, gradients) if g is not None)))
        optimizer.step()
        fused_adam_update(direct, gradients)
        assert all(torch.equal(w, c) for w, c in zip(weights, copies))
    assert [direct.state[c]["step"].item() for c in copies] == [3.0, 2.0, 3.0]


def test_only_a_fused_adam_over_one_group_of_contiguous_trained_parameters_without_step_hooks_takes_gradient_lists():
    def weight():
        return torch.nn.Parameter(torch.zeros(2, 2))

    assert updates_from_gradients(torch.optim.Adam([weight()], fused=True))
    assert not updates_from_gradients(torch.optim.Adam([weight()]))  # the for-loop kernels
    assert not updates_from_gradients(torch.optim.Adam([weight()], fused=True, amsgrad=True))
    assert not updates_from_gradients(torch.optim.AdamW([weight()], fused=True))
    assert not updates_from_gradients(torch.optim.Adam([{"params": [weight()]}, {"params": [weight()]}], fused=True))
    assert not updates_from_gradients(torch.optim.Adam([torch.nn.Parameter(torch.zeros(2, 3).t())], fused=True))
    frozen = weight().requires_grad_(False)
    assert not updates_from_gradients(torch.optim.Adam([weight(), frozen], fused=True))
    hooked = torch.optim.Adam([weight()], fused=True)
    handle = hooked.register_step_pre_hook(lambda optimizer, args, kwargs: None)
    assert not updates_from_gradients(hooked)
    handle.remove()
    assert updates_from_gradients(hooked)
    assert not updates_from_gradients(KerasRMSprop([weight()]))
