"""Specification of the training engine: determinism, exact resume, checkpoints, NaN stops, early stopping, DDP."""

import math
import os
import pickle
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port
from vae.config import ModelConfig, ObjectiveConfig, TrainConfig
from vae.data import ImageSet, binarize
from vae.checkpoint import load_checkpoint
from vae.distributed import process_group, resolve_device
from vae.engine import Callback, NonFiniteLossError, fit, learning_rate
from vae.models import build_model

MODEL = ModelConfig(architecture="mlp", hidden_dims=(32,), latent_dim=4)
OBJECTIVE = ObjectiveConfig()


def images(n: int, seed: int) -> ImageSet:
    generator = torch.Generator().manual_seed(seed)
    return binarize(torch.rand(n, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator), "dynamic")


TRAIN, VALIDATION = images(384, 0), images(128, 1).fixed(5)


def train_config(**changes) -> TrainConfig:
    return TrainConfig(**({"batch_size": 64, "epochs": 3, "seed": 3, "device": "cpu"} | changes))


def run(config: TrainConfig, **kwargs):
    model = build_model(MODEL, seed=config.seed)
    state = fit(model, TRAIN, VALIDATION, OBJECTIVE, config, progress=False, **kwargs)
    return model, state


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_history_has_train_and_validation_terms_per_epoch():
    _, state = run(train_config())
    assert [sorted(entry) for entry in state.history] == [sorted([
        "train_loss", "train_elbo_nats", "train_reconstruction_nats", "train_kl_nats", "kl_weight",
        "val_elbo_nats", "val_reconstruction_nats", "val_kl_nats",
    ])] * 3
    for entry in state.history:
        assert entry["train_elbo_nats"] == pytest.approx(-(entry["train_reconstruction_nats"] + entry["train_kl_nats"]))
        assert entry["train_loss"] == pytest.approx(-entry["train_elbo_nats"], rel=0.05)
    assert state.history[-1]["val_elbo_nats"] > state.history[0]["val_elbo_nats"]
    assert state.epoch == 3 and len(state.epoch_seconds) == 3


def test_same_config_and_seed_give_bit_identical_parameters_and_metrics():
    model_a, state_a = run(train_config())
    model_b, state_b = run(train_config())
    assert_same_parameters(model_a, model_b)
    assert state_a.history == state_b.history
    model_c, state_c = run(train_config(seed=4))
    assert state_c.history != state_a.history


def test_resuming_from_a_checkpoint_ends_with_the_parameters_of_an_uninterrupted_run(tmp_path):
    uninterrupted, full = run(train_config())

    class Interrupt(Callback):
        def on_epoch_end(self, state):
            if state.epoch == 2:
                raise KeyboardInterrupt

    checkpoint = tmp_path / "run" / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        run(train_config(), checkpoint_path=checkpoint, callbacks=[Interrupt()])
    assert load_checkpoint(checkpoint)["epoch"] == 2
    resumed, state = run(train_config(), checkpoint_path=checkpoint, resume_from=checkpoint)
    assert_same_parameters(resumed, uninterrupted)
    assert state.history == full.history
    assert load_checkpoint(checkpoint)["epoch"] == 3


def test_a_run_can_be_extended_by_resuming_with_more_epochs(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    run(train_config(epochs=2), checkpoint_path=checkpoint)
    extended, state = run(train_config(epochs=3), resume_from=checkpoint)
    uninterrupted, _ = run(train_config(epochs=3))
    assert_same_parameters(extended, uninterrupted)
    assert state.epoch == 3


def test_checkpoint_is_written_atomically_and_loads_with_weights_only(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    model, _ = run(train_config(epochs=1), checkpoint_path=checkpoint, metadata={"run": {"preset": "test"}})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    payload = torch.load(checkpoint, weights_only=True)
    assert payload["epoch"] == 1 and payload["metadata"] == {"run": {"preset": "test"}}
    assert payload["train_config"] == train_config(epochs=1).model_dump(mode="json")
    restored = build_model(MODEL)
    restored.load_state_dict(payload["model"])
    assert_same_parameters(restored, model)


def test_resuming_with_other_training_settings_is_refused(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    run(train_config(epochs=1), checkpoint_path=checkpoint)
    with pytest.raises(ValueError, match=r"cannot resume with different training settings \(learning_rate, batch_size\)"):
        run(train_config(learning_rate=0.1, batch_size=32), resume_from=checkpoint)


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint.pt: not a readable checkpoint"):
        load_checkpoint(checkpoint)


def test_a_nan_loss_stops_training_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    class Poison(Callback):
        def on_epoch_end(self, state):
            if state.epoch == 1:
                with torch.no_grad():
                    state.model.decoder[-2].bias.fill_(math.nan)

    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 2, step 1: training stopped") as error:
        run(train_config(), checkpoint_path=checkpoint, callbacks=[Poison()])
    assert (error.value.epoch, error.value.step) == (2, 1)
    assert load_checkpoint(checkpoint)["epoch"] == 1
    again = pickle.loads(pickle.dumps(error.value))  # as it comes back from another process
    assert (type(again), str(again), again.epoch, again.step) == (NonFiniteLossError, str(error.value), 2, 1)


def test_an_exploding_learning_rate_is_reported_at_its_first_bad_step():
    with pytest.raises(NonFiniteLossError) as error:
        run(train_config(learning_rate=1e12, optimizer="rmsprop", epochs=5))
    assert error.value.epoch >= 1 and error.value.step >= 1
    assert f"at epoch {error.value.epoch}, step {error.value.step}" in str(error.value)


def test_early_stopping_restores_the_best_epoch_when_validation_gets_worse():
    ones = ImageSet(torch.ones(256, 1, 28, 28), torch.zeros(256, dtype=torch.long))
    zeros = ImageSet(torch.zeros(64, 1, 28, 28), torch.zeros(64, dtype=torch.long))
    snapshots = {}

    class Snapshot(Callback):
        def on_epoch_end(self, state):
            snapshots[state.epoch] = {k: v.clone() for k, v in state.model.state_dict().items()}

    model = build_model(MODEL, seed=0)
    config = train_config(epochs=10, early_stopping_patience=2)
    state = fit(model, ones, zeros, OBJECTIVE, config, callbacks=[Snapshot()], progress=False)
    values = [entry["val_elbo_nats"] for entry in state.history]
    assert values == sorted(values, reverse=True)  # every epoch is worse on the all-zero images
    assert (state.best_epoch, state.epoch, state.stopped_early) == (1, 3, True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshots[1][name]), name


def test_callbacks_are_called_at_start_every_epoch_and_end():
    calls = []

    class Record(Callback):
        def on_fit_start(self, state):
            calls.append(("start", state.epoch))

        def on_epoch_end(self, state):
            calls.append(("epoch", state.epoch, len(state.history)))

        def on_fit_end(self, state):
            calls.append(("end", state.epoch))

    run(train_config(), callbacks=[Record()])
    assert calls == [("start", 0), ("epoch", 1, 1), ("epoch", 2, 2), ("epoch", 3, 3), ("end", 3)]


def test_kl_warm_up_weight_is_recorded_per_epoch():
    model = build_model(MODEL, seed=0)
    state = fit(model, TRAIN, None, ObjectiveConfig(kl_warmup_epochs=2), train_config(batch_size=384), progress=False)
    assert [entry["kl_weight"] for entry in state.history] == [0.0, 0.5, 1.0]


def test_without_a_terminal_there_is_no_progress_output(capsys):
    model = build_model(MODEL, seed=0)
    fit(model, TRAIN, None, OBJECTIVE, train_config(epochs=1))
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "")


def test_bf16_autocast_trains_on_the_cpu():
    _, state = run(train_config(precision="bf16", epochs=2))
    assert all(math.isfinite(entry["train_loss"]) for entry in state.history)


def test_auto_device_is_the_cpu_here_and_an_absent_gpu_is_a_clear_error():
    assert resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device 'cuda' was asked for, but CUDA is not available"):
            resolve_device("cuda")


def test_early_stopping_without_validation_data_is_refused():
    with pytest.raises(ValueError, match="early_stopping_patience needs a validation set"):
        fit(build_model(MODEL), TRAIN, None, OBJECTIVE, train_config(early_stopping_patience=1), progress=False)


def test_torch_compile_trains_to_the_losses_of_eager_mode():
    _, eager = run(train_config(epochs=2))
    _, compiled = run(train_config(epochs=2, compile=True))
    for a, b in zip(eager.history, compiled.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_elbo_nats"] == pytest.approx(a["val_elbo_nats"], rel=1e-4)


# --- the importance-weighted bound, learned priors, two stochastic layers, schedules and time limits -------------------

IWAE = ObjectiveConfig(bound="iwae", samples=3)
HIERARCHICAL = ModelConfig(
    stochastic_layers=2, hidden_dims=(16, 16), latent_dim=4, top_latent_dim=3, activation="gated", prior="vamp",
    prior_components=10, logvar_limits=(-6.0, 2.0),
)


def test_importance_weighted_training_with_one_sample_follows_the_elbo_with_a_monte_carlo_kl():
    # Both draw the binarization, then one noise vector per image, from the same generator: the same steps, computed
    # in two ways (log q as log N(eps) - sum(log std) against log N(z; mu, std)), so float rounding apart.
    elbo_model, iwae_model = build_model(MODEL, seed=3), build_model(MODEL, seed=3)
    elbo = fit(elbo_model, TRAIN, VALIDATION, ObjectiveConfig(kl="monte_carlo"), train_config(), progress=False)
    # (kl="monte_carlo" in both so that the validation ELBOs, which use the ELBO's KL estimator, compare too.)
    iwae = fit(iwae_model, TRAIN, VALIDATION, ObjectiveConfig(bound="iwae", kl="monte_carlo"), train_config(), progress=False)
    torch.testing.assert_close(iwae_model.state_dict(), elbo_model.state_dict(), rtol=1e-4, atol=1e-5)
    for a, b in zip(elbo.history, iwae.history):
        assert b == pytest.approx(a, rel=1e-5)


def test_importance_weighted_training_records_a_loss_below_the_mean_sample_elbo():
    model = build_model(MODEL, seed=0)
    state = fit(model, TRAIN, VALIDATION, IWAE, train_config(), progress=False)  # 384 images: six full batches
    for entry in state.history:
        assert entry["train_loss"] < -entry["train_elbo_nats"]  # -log mean w <= mean -log w, on the same samples
        assert entry["train_elbo_nats"] == pytest.approx(-(entry["train_reconstruction_nats"] + entry["train_kl_nats"]))
    assert state.history[-1]["val_elbo_nats"] > state.history[0]["val_elbo_nats"]


def test_a_hierarchical_vamp_prior_model_trains_deterministically_and_resumes_exactly(tmp_path):
    def hierarchical(config, **kwargs):
        model = build_model(HIERARCHICAL, seed=config.seed)
        return model, fit(model, TRAIN, VALIDATION, IWAE, config, progress=False, **kwargs)

    model_a, state_a = hierarchical(train_config())
    model_b, state_b = hierarchical(train_config())
    assert_same_parameters(model_a, model_b)
    assert state_a.history == state_b.history
    assert state_a.history[-1]["val_elbo_nats"] > state_a.history[0]["val_elbo_nats"]
    checkpoint = tmp_path / "checkpoint.pt"
    hierarchical(train_config(epochs=2), checkpoint_path=checkpoint)
    resumed, _ = hierarchical(train_config(), resume_from=checkpoint)
    assert_same_parameters(resumed, model_a)


def test_an_analytic_kl_is_refused_for_a_model_without_one():
    model = build_model(ModelConfig(hidden_dims=(16,), latent_dim=3, prior="vamp", prior_components=4), seed=0)
    with pytest.raises(ValueError, match="objective.kl='analytic' needs one stochastic layer under the standard normal prior"):
        fit(model, TRAIN, None, ObjectiveConfig(), train_config(), progress=False)


def test_bf16_autocast_trains_the_importance_weighted_two_layer_model():
    model = build_model(HIERARCHICAL, seed=0)
    state = fit(model, TRAIN, VALIDATION, IWAE, train_config(precision="bf16", epochs=2), progress=False)
    assert all(math.isfinite(value) for entry in state.history for value in entry.values())


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_its_final_fraction():
    config = train_config(learning_rate=1e-3, epochs=10, lr_schedule="cosine", lr_warmup_epochs=2, lr_final_fraction=0.1)
    assert learning_rate(config, 0.0) == 0.0
    assert learning_rate(config, 1.0) == pytest.approx(0.5 * 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.1))))
    assert learning_rate(config, 5.0) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert learning_rate(config, 10.0) == pytest.approx(1e-4)
    assert learning_rate(train_config(learning_rate=1e-3, lr_warmup_epochs=1), 0.5) == 5e-4
    assert learning_rate(train_config(learning_rate=1e-3), 2.5) == 1e-3


def test_the_schedule_sets_the_optimizer_rate_at_every_step_and_is_recorded_per_epoch():
    config = train_config(lr_schedule="cosine", learning_rate=1e-3, epochs=3)
    _, state = run(config)
    last_step = 5 / 6  # six steps per epoch: the recorded rate is the last step's
    assert [entry["learning_rate"] for entry in state.history] == [learning_rate(config, epoch + last_step) for epoch in range(3)]
    assert state.optimizer.param_groups[0]["lr"] == learning_rate(config, 2 + last_step)
    _, constant = run(train_config())
    assert "learning_rate" not in constant.history[0]


def test_training_stops_before_an_epoch_that_would_end_past_max_minutes(monkeypatch):
    clock = iter(range(0, 10_000, 30))  # every reading of the clock is 30 s after the last one
    monkeypatch.setattr("vae.engine.time.perf_counter", lambda: next(clock))
    _, state = run(train_config(epochs=10, max_minutes=2.5))  # each epoch: 30 s training + 30 s validation
    # After 2 epochs (2 minutes) a third one would end at 3 > 2.5 minutes.
    assert (state.epoch, state.training_minutes) == (2, 2.0)
    assert state.epoch_seconds == state.validation_seconds == [30, 30]


# --- several processes: DistributedDataParallel over Gloo, in fresh processes joined as torchrun joins them ----------

ODD_TRAIN = images(235, 2)  # batches of 64, 64, 64 and 43 images: the last one splits into shards of 21 and 22
MONTE_CARLO = ObjectiveConfig(kl="monte_carlo")  # the reparameterization noise enters the KL term as well


def in_process_group(rank: int, world_size: int, port: int, work, directory: Path) -> None:
    """``work(rank, directory)`` in process ``rank`` of a group joined by :func:`process_group`, as under torchrun."""
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with process_group() as (group_rank, group_size):
        assert (group_rank, group_size) == (rank, world_size)
        work(rank, directory)


def run_in_two_processes(work, directory: Path, timeout: float = 180.0) -> dict[int, dict]:
    """What ``work`` saved in each of two processes; fails the test if they are not done after ``timeout`` seconds."""
    context = torch.multiprocessing.start_processes(
        in_process_group, args=(2, free_port(), work, directory), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"two processes still running after {timeout} s: one waits in a collective the other skips")
    return {rank: torch.load(directory / f"rank{rank}.pt") for rank in range(2)}


def fit_and_save(rank: int, directory: Path) -> None:
    calls = []

    class Record(Callback):
        def on_fit_start(self, state):
            calls.append("start")

        def on_epoch_end(self, state):
            calls.append(f"epoch {state.epoch}")

        def on_fit_end(self, state):
            calls.append("end")

    checkpoint = directory / f"checkpoint{rank}.pt"
    model = build_model(MODEL, seed=3)
    config = train_config(epochs=2)
    state = fit(model, ODD_TRAIN, VALIDATION, MONTE_CARLO, config, callbacks=[Record()], checkpoint_path=checkpoint)
    saved = {"parameters": model.state_dict(), "history": state.history, "callbacks": calls}
    torch.save(saved | {"checkpoint": checkpoint.exists()}, directory / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict[int, dict]:
    """Two processes fitting ODD_TRAIN (dynamic binarization, Monte Carlo KL) for 2 epochs: what each one ended with."""
    return run_in_two_processes(fit_and_save, tmp_path_factory.mktemp("two-processes"))


def test_two_processes_end_with_the_parameters_and_metrics_of_one_process_training_on_the_same_batches(two_processes):
    model = build_model(MODEL, seed=3)
    state = fit(model, ODD_TRAIN, VALIDATION, MONTE_CARLO, train_config(epochs=2), progress=False)
    for rank in (0, 1):
        # The same numbers summed in another order (shards, then across processes): float32 rounding, no more.
        torch.testing.assert_close(two_processes[rank]["parameters"], model.state_dict(), rtol=1e-5, atol=1e-6)
        assert len(two_processes[rank]["history"]) == 2
        for shared, alone in zip(two_processes[rank]["history"], state.history):
            assert shared == pytest.approx(alone, rel=1e-6)


def test_every_process_ends_with_the_same_parameters_and_history(two_processes):
    for name, value in two_processes[0]["parameters"].items():
        assert torch.equal(two_processes[1]["parameters"][name], value), name
    assert two_processes[1]["history"] == two_processes[0]["history"]


def test_only_rank_0_calls_the_callbacks_and_writes_the_checkpoint(two_processes):
    assert two_processes[0]["callbacks"] == ["start", "epoch 1", "epoch 2", "end"]
    assert two_processes[1]["callbacks"] == []
    assert (two_processes[0]["checkpoint"], two_processes[1]["checkpoint"]) == (True, False)


def fit_with_a_nan_on_rank_0(rank: int, directory: Path) -> None:
    class PoisonRank0(Callback):  # callbacks run on rank 0 only: rank 1's parameters stay finite
        def on_epoch_end(self, state):
            if state.epoch == 1:
                with torch.no_grad():
                    state.model.decoder[-2].bias.fill_(math.nan)

    model = build_model(MODEL, seed=3)
    config = train_config(batch_size=len(TRAIN))  # one step per epoch: rank 1's own loss is finite all through epoch 2
    try:
        fit(model, TRAIN, VALIDATION, OBJECTIVE, config, callbacks=[PoisonRank0()])
        stopped = None
    except NonFiniteLossError as error:
        stopped = (error.epoch, error.step)
    torch.save({"stopped": stopped}, directory / f"rank{rank}.pt")


def test_a_nan_loss_on_one_process_stops_every_process_at_the_same_step(tmp_path):
    ranks = run_in_two_processes(fit_with_a_nan_on_rank_0, tmp_path)
    assert (ranks[0]["stopped"], ranks[1]["stopped"]) == ((2, 1), (2, 1))


def fit_hierarchical_and_save(rank: int, directory: Path) -> None:
    model = build_model(HIERARCHICAL, seed=3)
    state = fit(model, ODD_TRAIN, VALIDATION, IWAE, train_config(epochs=2), progress=False)
    torch.save({"parameters": model.state_dict(), "history": state.history}, directory / f"rank{rank}.pt")


def test_two_processes_train_the_importance_weighted_two_layer_model_as_one_process_does(tmp_path):
    # Each process draws the noise of all k samples of the whole batch and keeps its shard's rows: the losses and the
    # parameters are one process's, up to float rounding.
    ranks = run_in_two_processes(fit_hierarchical_and_save, tmp_path)
    model = build_model(HIERARCHICAL, seed=3)
    state = fit(model, ODD_TRAIN, VALIDATION, IWAE, train_config(epochs=2), progress=False)
    for rank in (0, 1):
        for shared, alone in zip(ranks[rank]["history"], state.history):
            assert shared == pytest.approx(alone, rel=1e-5)  # measured: within 5e-6
        # Float rounding of the shard sums, which Adam's normalization magnifies in weights whose gradients are near
        # zero: measured at most 6.6e-5 here, a fifteenth of one step at this learning rate (1e-3).
        torch.testing.assert_close(ranks[rank]["parameters"], model.state_dict(), rtol=1e-4, atol=2e-4)
