"""Specification of the train and evaluate stages: a config and prepared data in, a model and test metrics out."""

import re

import torch

from pipeline.config import load_config
from pipeline.data import PreparedData
from pipeline.training import EpochReport, evaluate, likelihood_note, train
from vae.data import binarize

TINY = {
    "model.hidden_dims": [16], "model.latent_dim": 2, "train.batch_size": 32, "train.epochs": 2, "train.device": "cpu",
    "eval.iwae_samples": 3, "eval.batch_size": 40, "eval.iwae_batch_size": 40,
}


def tiny_data(validation: bool = True) -> PreparedData:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (200, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.arange(200) % 10
    sets = [binarize(images[i : i + 80], labels[i : i + 80], "static", seed=i) for i in (0, 80)]
    test = binarize(images[160:], labels[160:], "static", seed=2)
    return PreparedData(sets[0], sets[1] if validation else None, test, tuple("0123456789"), "mnist", "digest")


def test_training_draws_the_weights_with_the_training_seed_so_a_config_gives_one_model():
    config = load_config("default", TINY)
    first, state = train(config, tiny_data(), progress=False)
    second, _ = train(config, tiny_data(), progress=False)
    other, _ = train(load_config("default", TINY | {"train.seed": 1}), tiny_data(), progress=False)
    assert state.epoch == 2 and len(state.history) == 2
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))


def test_evaluation_reports_the_elbo_terms_and_the_iwae_nll_unless_its_samples_are_zero():
    model, _ = train(load_config("default", TINY), tiny_data(), progress=False)
    metrics = evaluate(model, tiny_data().test, load_config("default", TINY))
    assert set(metrics) == {"test_elbo_nats", "test_reconstruction_nats", "test_kl_nats", "test_nll_nats", "test_bits_per_dim"}
    assert metrics["test_elbo_nats"] == -(metrics["test_reconstruction_nats"] + metrics["test_kl_nats"])
    without = evaluate(model, tiny_data().test, load_config("default", TINY | {"eval.iwae_samples": 0}))
    assert without == {name: metrics[name] for name in ("test_elbo_nats", "test_reconstruction_nats", "test_kl_nats")}


def test_the_epoch_report_prints_one_line_per_epoch(capsys):
    _, state = train(load_config("default", TINY), tiny_data(), callbacks=[EpochReport()], progress=False)
    pattern = r"epoch (\d)/2: train ELBO (-\d+\.\d\d) nats \(KL (\d+\.\d\d)\), validation ELBO (-\d+\.\d\d), (\d+\.\d) s"
    shown = [re.fullmatch(pattern, line) for line in capsys.readouterr().out.splitlines()]
    assert [match.groups() if match else None for match in shown] == [
        (str(epoch), f"{m['train_elbo_nats']:.2f}", f"{m['train_kl_nats']:.2f}", f"{m['val_elbo_nats']:.2f}", f"{s:.1f}")
        for epoch, (m, s) in enumerate(zip(state.history, state.epoch_seconds), start=1)
    ]
    assert len(shown) == 2


def test_without_a_validation_set_the_epoch_report_leaves_it_out(capsys):
    config = load_config("default", TINY | {"data.validation_size": 0, "train.early_stopping_patience": None})
    _, state = train(config, tiny_data(validation=False), callbacks=[EpochReport()], progress=False)
    pattern = r"epoch (\d)/2: train ELBO (-\d+\.\d\d) nats \(KL (\d+\.\d\d)\), (\d+\.\d) s"
    shown = [re.fullmatch(pattern, line) for line in capsys.readouterr().out.splitlines()]
    assert [match.groups() if match else None for match in shown] == [
        (str(epoch), f"{m['train_elbo_nats']:.2f}", f"{m['train_kl_nats']:.2f}", f"{s:.1f}")
        for epoch, (m, s) in enumerate(zip(state.history, state.epoch_seconds), start=1)
    ]
    assert len(shown) == 2


def test_the_likelihood_note_says_when_the_nats_do_not_compare_with_published_likelihoods():
    assert likelihood_note(load_config("default")) == ""
    assert likelihood_note(load_config("tf-cvae-mnist")) == ""
    assert "not normalized log-likelihoods" in likelihood_note(load_config("tf-fashion-mlp"))
    assert "Gaussian density" in likelihood_note(load_config("matlab-conv-mnist"))
