"""Specification of the main job's command line: train and evaluate end to end, and clear errors on bad input."""

import gzip
import json
import os
import re
import shutil
from pathlib import Path

import pytest

import flows
from pipeline import data

needs_mirror = pytest.mark.skipif(not os.environ.get("VAE_DATA_MIRROR"), reason="needs the data mirror (CI sets VAE_DATA_MIRROR)")
QUICK = ["--set", "data.train_subset=2000", "--set", "data.validation_size=1000", "--set", "eval.iwae_samples=20", "--device", "cpu"]


@needs_mirror
def test_train_writes_config_checkpoint_and_test_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert flows.main(["train", "--epochs", "2", "--output-dir", str(out), *QUICK]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_trained"] == 2 and len(metrics["history"]) == 2
    assert metrics["test_elbo_nats"] == pytest.approx(-(metrics["test_reconstruction_nats"] + metrics["test_kl_nats"]))
    assert metrics["test_nll_nats"] <= -metrics["test_elbo_nats"] + 1.0  # the IWAE bound is tighter than the ELBO
    assert metrics["dataset_digest"] == data.DATASETS["mnist"].digest and metrics["iwae_samples"] == 20
    assert json.loads((out / "config.json").read_text())["data"]["train_subset"] == 2000
    printed = capsys.readouterr().out
    assert "test ELBO" in printed and "test NLL (IWAE)" in printed and str(out) in printed


@needs_mirror
def test_resume_continues_a_run_to_more_epochs(tmp_path):
    out = tmp_path / "run"
    assert flows.main(["train", "--epochs", "1", "--output-dir", str(out), *QUICK]) == 0
    assert flows.main(["train", "--epochs", "2", "--resume", "--output-dir", str(out), *QUICK]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    fresh_out = tmp_path / "fresh"
    assert flows.main(["train", "--epochs", "2", "--output-dir", str(fresh_out), *QUICK]) == 0
    assert resumed["history"] == json.loads((fresh_out / "metrics.json").read_text())["history"]


def test_a_bad_config_value_fails_before_any_work_naming_the_field(tmp_path, capsys):
    out = tmp_path / "run"
    assert flows.main(["train", "--set", "train.learning_rate=-0.001", "--output-dir", str(out)]) == 2
    assert "train.learning_rate: Input should be greater than 0 (got -0.001)" in capsys.readouterr().err
    assert not out.exists()


def test_a_corrupt_download_is_reported_with_file_and_hashes_and_nothing_is_cached(tmp_path, monkeypatch, capsys):
    mirror = tmp_path / "mirror" / "mnist"
    mirror.mkdir(parents=True)
    for name in data.FILE_NAMES:
        (mirror / f"{name}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(4)))
    spec = data.DATASETS["mnist"]
    monkeypatch.setitem(data.DATASETS, "mnist", data.DatasetSpec(spec.name, ("http://127.0.0.1:9/",), spec.sha256, spec.class_names))
    monkeypatch.setenv("VAE_DATA_MIRROR", str(tmp_path / "mirror"))
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="train-images-idx3-ubyte from .*: decompressed sha256 is"):
        code = flows.main(["train", "--epochs", "1", "--set", f"data.cache_dir={json.dumps(str(cache))}", "--output-dir", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert code == 1
    assert "could not fetch train-images-idx3-ubyte" in error
    assert f"expected {spec.sha256['train-images-idx3-ubyte']}" in error
    assert list((cache / "mnist").iterdir()) == []


@needs_mirror
def test_a_malformed_cached_file_is_refetched_from_the_mirror(tmp_path):
    cache = tmp_path / "cache"
    files = data.fetch("mnist", cache)
    shutil.copyfile(files["t10k-labels-idx1-ubyte"], tmp_path / "good")
    files["t10k-labels-idx1-ubyte"].write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="t10k-labels-idx1-ubyte has sha256"):
        raw = data.load("mnist", cache)
    assert len(raw.test_labels) == 10_000
    assert Path(files["t10k-labels-idx1-ubyte"]).read_bytes() == (tmp_path / "good").read_bytes()


@needs_mirror
def test_a_nan_loss_fails_the_run_naming_epoch_and_step_and_writes_no_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    code = flows.main(["train", "--epochs", "3", "--output-dir", str(out), *QUICK, "--set", "train.optimizer=rmsprop", "--set", "train.learning_rate=1e12"])
    assert code == 1
    assert re.search(r"^error: non-finite loss \((nan|inf|-inf)\) at epoch \d+, step \d+: training stopped", capsys.readouterr().err)
    assert not (out / "metrics.json").exists()
