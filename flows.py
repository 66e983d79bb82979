"""The pipeline's wiring and command line: config, then data, then training, then test-set evaluation."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from pipeline import data
from pipeline.config import PRESETS, ConfigError, RunConfig, load_config, parse_override
from vae.engine import NonFiniteLossError, fit, resolve_device
from vae.evaluate import evaluate_elbo, iwae_bound
from vae.models import build_model

PROJECT_ROOT = Path(__file__).resolve().parent


def train_and_evaluate(config: RunConfig, output_dir: Path, *, resume: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """Fetch and prepare the data, train, evaluate on the test set; write config, checkpoint and metrics to ``output_dir``."""
    raw = data.load(config.data.dataset, config.data.cache_dir)
    prepared = data.prepare(
        raw,
        validation_size=config.data.validation_size,
        split_seed=config.data.split_seed,
        binarization=config.data.binarization,
        binarization_seed=config.data.binarization_seed,
        train_subset=config.data.train_subset,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(config.model_dump_json(indent=2) + "\n")
    checkpoint = output_dir / "checkpoint.pt"
    model = build_model(config.model, seed=config.train.seed)
    state = fit(
        model,
        prepared.train,
        prepared.validation,
        config.objective,
        config.train,
        checkpoint_path=checkpoint,
        resume_from=checkpoint if resume and checkpoint.exists() else None,
        metadata={"run_config": config.model_dump(mode="json"), "dataset_digest": raw.digest},
        progress=progress,
    )
    test = prepared.test.to(state.device)
    metrics = {f"test_{name}": value for name, value in evaluate_elbo(model, test, config.objective, batch_size=config.eval.batch_size, seed=config.eval.seed).items()}
    if config.eval.iwae_samples > 0:
        bound = iwae_bound(
            model, test, config.objective, samples=config.eval.iwae_samples,
            chunk_size=config.eval.iwae_chunk_size, batch_size=config.eval.iwae_batch_size, seed=config.eval.seed,
        )
        metrics.update(test_nll_nats=bound["nll_nats"], test_bits_per_dim=bound["bits_per_dim"], iwae_samples=config.eval.iwae_samples)
    summary = {
        "preset": config.preset,
        "dataset": config.data.dataset,
        "dataset_digest": raw.digest,
        "device": str(state.device),
        "torch_version": torch.__version__,
        "epochs_trained": state.epoch,
        "best_epoch": state.best_epoch,
        "stopped_early": state.stopped_early,
        "train_seconds": sum(state.epoch_seconds),
        "likelihood_note": _likelihood_note(config),
        **metrics,
        "history": state.history,
    }
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _likelihood_note(config: RunConfig) -> str:
    """Why the nats of this run do not compare with published binarized-MNIST likelihoods, if they do not."""
    if config.objective.likelihood == "gaussian":
        return "a Gaussian density on grayscale pixels: not comparable with likelihoods of binary images"
    if config.data.binarization == "none":
        return "grayscale pixels under a Bernoulli likelihood: the ELBO and NLL are not normalized log-likelihoods"
    return ""


def _config_from(args: argparse.Namespace) -> RunConfig:
    overrides = dict(parse_override(text) for text in args.overrides)
    shortcuts = {"data.dataset": args.dataset, "train.epochs": args.epochs, "train.device": args.device}
    overrides.update({key: value for key, value in shortcuts.items() if value is not None})
    return load_config(args.preset, overrides, file=args.config)


def _print_summary(summary: dict[str, Any], output_dir: Path) -> None:
    print(f"\n{summary['preset']} on {summary['dataset']}: {summary['epochs_trained']} epochs on {summary['device']} in {summary['train_seconds']:.1f} s")
    print(f"  test ELBO       {summary['test_elbo_nats']:9.2f} nats  (reconstruction {summary['test_reconstruction_nats']:.2f}, KL {summary['test_kl_nats']:.2f})")
    if "test_nll_nats" in summary:
        print(f"  test NLL (IWAE) {summary['test_nll_nats']:9.2f} nats  ({summary['test_bits_per_dim']:.4f} bits/dim, k={summary['iwae_samples']})")
    if summary["likelihood_note"]:
        print(f"  note            {summary['likelihood_note']}")
    print(f"  written to      {output_dir}/ (metrics.json, checkpoint.pt, config.json)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flows.py", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train and evaluate a VAE (a preset plus overrides)")
    train.add_argument("--preset", default="default", choices=sorted(PRESETS), help="the starting config (default: %(default)s)")
    train.add_argument("--config", type=Path, help="a TOML or JSON file of settings applied over the preset")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override one setting, e.g. --set model.latent_dim=2 (repeatable)")
    train.add_argument("--dataset", choices=["mnist", "fashion-mnist"], help="shortcut for --set data.dataset=...")
    train.add_argument("--epochs", type=int, help="shortcut for --set train.epochs=...")
    train.add_argument("--device", help="shortcut for --set train.device=... (auto, cpu, cuda, mps)")
    train.add_argument("--output-dir", type=Path, help="where to write (default: outputs/<preset>)")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output directory")
    args = parser.parse_args(argv)

    try:
        config = _config_from(args)
        resolve_device(config.train.device)
    except (ConfigError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output_dir = args.output_dir or PROJECT_ROOT / "outputs" / config.preset
    try:
        summary = train_and_evaluate(config, output_dir, resume=args.resume)
    except (data.DataError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    _print_summary(summary, output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
