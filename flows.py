"""The pipeline's Prefect flow and command line: data, training, evaluation, pictures and registry, tracked in MLflow."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE
from prefect.tasks import exponential_backoff

from pipeline import artifacts, data, registry, tracking, training
from pipeline.config import PRESETS, ConfigError, RunConfig, load_config, parse_override, with_overrides
from vae.engine import resolve_device

PROJECT_ROOT = Path(__file__).resolve().parent
SUMMARY_ARTIFACT_KEY = "vae-training-summary"

# Each stage is a plain function in pipeline/; here it becomes a Prefect task. Only data preparation is cached:
# the other tasks take models and tensors, which are neither worth hashing nor safe to skip.
fetch_data = task(
    data.fetch, name="fetch and verify data", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5), cache_policy=NO_CACHE
)
prepare_data = task(
    data.prepare_configured,
    name="prepare data",
    cache_policy=INPUTS + TASK_SOURCE,  # a second run with the same data settings reads the prepared sets back
    persist_result=True,
)
train_model = task(training.train, name="train", cache_policy=NO_CACHE)
evaluate_model = task(training.evaluate, name="evaluate on the test set", cache_policy=NO_CACHE)
make_artifacts = task(tracking.log_evaluation, name="make artifacts", cache_policy=NO_CACHE)
log_model = task(registry.log_model, name="log model", cache_policy=NO_CACHE)
register_model = task(registry.register_version, name="register", cache_policy=NO_CACHE)
promote_model = task(registry.assign_alias, name="promote", cache_policy=NO_CACHE)


@dataclass(frozen=True)
class TrainingOutcome:
    """What a training flow run produced: where its MLflow run is, its test metrics, and the registry decision."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    metrics: dict[str, float]
    epochs_trained: int
    registered_model: str | None
    version: str | None
    alias: str | None
    promotion_reason: str | None


@flow(name="train-vae", log_prints=True)
def train_flow(config: RunConfig = RunConfig(), resume_run_id: str | None = None) -> TrainingOutcome:
    """Fetch and prepare the data, train, evaluate on the test set, log pictures, register and promote the model.

    Everything is tracked in one MLflow run, whose checkpoint is updated after every epoch; with ``resume_run_id`` an
    interrupted (or finished) run continues from its last checkpoint up to ``config.train.epochs``. When any step
    fails the run ends FAILED with the error, and nothing is registered.
    """
    tracking_uri = tracking.ensure_store()
    run_name = f"{config.preset}-{config.data.dataset}"
    with tracking.start_run(config, run_name=run_name, resume_run_id=resume_run_id) as run:
        files = fetch_data(config.data.dataset, config.data.cache_dir)
        prepared = prepare_data(config.data, files)
        if resume_run_id is None:
            tracking.log_dataset(prepared, config)
        with tempfile.TemporaryDirectory() as scratch:
            checkpoint = Path(scratch) / "checkpoint.pt"
            if resume_run_id is not None:
                checkpoint = tracking.download_checkpoint(resume_run_id, Path(scratch))
            callbacks = [tracking.MLflowCallback(checkpoint_path=checkpoint)]
            model, state = train_model(
                config, prepared, callbacks=callbacks, checkpoint_path=checkpoint, resume=resume_run_id is not None
            )
        metrics = evaluate_model(model, prepared.test, config)
        make_artifacts(model, prepared.test, prepared.class_names, metrics)
        version = decision = None
        if config.registry.enabled:
            model_uri = log_model(model, prepared.test.pixels[:4])
            version = register_model(model_uri, config, metrics, run.info.run_id)
            decision = promote_model(config, metrics, version, margin=config.registry.promotion_margin_nats)
    outcome = TrainingOutcome(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        tracking_uri=tracking_uri,
        metrics=metrics,
        epochs_trained=state.epoch,
        registered_model=registry.registered_model_name(config.data.dataset) if version else None,
        version=version,
        alias=decision.alias if decision else None,
        promotion_reason=decision.reason if decision else None,
    )
    create_markdown_artifact(markdown=summary_markdown(config, outcome), key=SUMMARY_ARTIFACT_KEY, description="Test metrics, MLflow run and registry decision")
    return outcome


def summary_markdown(config: RunConfig, outcome: TrainingOutcome) -> str:
    """The flow run's report: test metrics, the MLflow run and how to open it, and the registry outcome."""
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in outcome.metrics.items())
    note = training.likelihood_note(config)
    if outcome.version is None:
        registry_text = "Not registered (`registry.enabled` is false)."
    else:
        registry_text = (
            f"Registered as **{outcome.registered_model}** version **{outcome.version}**, alias "
            f"**{outcome.alias}**: {outcome.promotion_reason}."
        )
    return f"""# {config.preset} on {config.data.dataset}

{outcome.epochs_trained} epochs, binarization `{config.data.binarization}`, {config.model.architecture} with latent size {config.model.latent_dim}.

| test metric | value |
| --- | ---: |
{rows}
{f"{chr(10)}Note: {note}.{chr(10)}" if note else ""}
## MLflow

Run `{outcome.run_id}` in experiment `{outcome.experiment_id}` of `{outcome.tracking_uri}`.
Open it with `python flows.py ui` and follow the experiment `vae-{config.data.dataset}`.

## Registry

{registry_text}
"""


def _config_from(args: argparse.Namespace) -> RunConfig:
    overrides = dict(parse_override(text) for text in args.overrides)
    shortcuts = {"data.dataset": args.dataset, "train.epochs": args.epochs, "train.device": args.device}
    overrides.update({key: value for key, value in shortcuts.items() if value is not None})
    if args.resume is not None:
        tracking.ensure_store()
        return with_overrides(tracking.run_config(args.resume), overrides)
    return load_config(args.preset, overrides, file=args.config)


def _print_metrics(config: RunConfig, metrics: dict[str, float]) -> None:
    print(f"  test ELBO       {metrics['test_elbo_nats']:9.2f} nats  (reconstruction {metrics['test_reconstruction_nats']:.2f}, KL {metrics['test_kl_nats']:.2f})")
    if "test_nll_nats" in metrics:
        print(f"  test NLL (IWAE) {metrics['test_nll_nats']:9.2f} nats  ({metrics['test_bits_per_dim']:.4f} bits/dim, k={config.eval.iwae_samples})")
    if note := training.likelihood_note(config):
        print(f"  note            {note}")


def _print_outcome(config: RunConfig, outcome: TrainingOutcome) -> None:
    print(f"\n{config.preset} on {config.data.dataset}: {outcome.epochs_trained} epochs")
    _print_metrics(config, outcome.metrics)
    print(f"  MLflow run      {outcome.run_id} (experiment vae-{config.data.dataset}, store {outcome.tracking_uri})")
    if outcome.version is not None:
        print(f"  registered      models:/{outcome.registered_model}/{outcome.version} as {outcome.alias}: {outcome.promotion_reason}")
    print("  open the UI     python flows.py ui")


def _train(args: argparse.Namespace) -> int:
    try:
        config = _config_from(args)
        resolve_device(config.train.device)
    except (ConfigError, RuntimeError) as error:
        return _fail(error, 2)
    outcome = train_flow(config, resume_run_id=args.resume, return_state=True)
    if outcome.is_failed():
        print(f"error: the training flow failed: {outcome.message}", file=sys.stderr)
        return 1
    _print_outcome(config, outcome.result())
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    tracking.ensure_store()
    try:
        device = resolve_device(args.device)
        loaded = registry.load(args.model, device=device)
        overrides = {"eval.iwae_samples": args.iwae_samples} if args.iwae_samples is not None else {}
        config = with_overrides(loaded.config, overrides)
        prepared = data.prepare_configured(config.data, data.fetch(config.data.dataset, config.data.cache_dir))
    except (ConfigError, RuntimeError, LookupError, data.DataError) as error:
        return _fail(error, 1)
    metrics = training.evaluate(loaded.model, prepared.test, config)
    if args.json:
        print(json.dumps({"model": loaded.uri, "run_id": loaded.run_id, "iwae_samples": config.eval.iwae_samples, **metrics}))
    else:
        print(f"{loaded.uri} (run {loaded.run_id}) on the {config.data.dataset} test set:")
        _print_metrics(config, metrics)
    return 0


def _generate(args: argparse.Namespace) -> int:
    tracking.ensure_store()
    try:
        loaded = registry.load(args.model)
    except LookupError as error:
        return _fail(error, 1)
    images = loaded.model.sample(args.n, generator=torch.Generator().manual_seed(args.seed))
    artifacts.image_grid(images, *artifacts.grid_shape(args.n)).save(args.output)
    print(f"{args.n} samples of {loaded.uri} written to {args.output}")
    return 0


def _promote(args: argparse.Namespace) -> int:
    tracking.ensure_store()
    try:
        registry.promote(args.name, args.version, args.reason)
    except LookupError as error:
        return _fail(error, 1)
    print(f"models:/{args.name}@{registry.CHAMPION} is now version {args.version} ({args.reason})")
    return 0


def _ui(args: argparse.Namespace) -> int:
    uri = tracking.default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        print(f"MLFLOW_TRACKING_URI is a tracking server, which serves the UI itself: open {uri}")
        return 0
    command = tracking.ui_command(tracking.ensure_store(uri), host=args.host, port=args.port)
    print(f"MLflow UI on http://{args.host}:{args.port} over {uri} (Ctrl-C stops it)", flush=True)
    os.execv(command[0], command)


def _fail(error: BaseException, code: int) -> int:
    print(f"error: {error}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # downloads here are a few small files
    parser = argparse.ArgumentParser(prog="flows.py", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run the training flow (a preset plus overrides)")
    train.add_argument("--preset", default="default", choices=sorted(PRESETS), help="the starting config (default: %(default)s)")
    train.add_argument("--config", type=Path, help="a TOML or JSON file of settings applied over the preset")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override one setting, e.g. --set model.latent_dim=2 (repeatable)")
    train.add_argument("--dataset", choices=["mnist", "fashion-mnist"], help="shortcut for --set data.dataset=...")
    train.add_argument("--epochs", type=int, help="shortcut for --set train.epochs=...")
    train.add_argument("--device", help="shortcut for --set train.device=... (auto, cpu, cuda, mps)")
    train.add_argument("--resume", metavar="RUN_ID", help="continue an MLflow run from its last checkpoint, with its config (plus --epochs, --set)")
    train.set_defaults(handler=_train)

    model_help = "models:/<name>@<alias>, models:/<name>/<version>, runs:/<run id>/model, a registered model name or a run id"
    evaluate = commands.add_parser("evaluate", help="evaluate a registered model or a run's model on its test set")
    evaluate.add_argument("model", help=model_help)
    evaluate.add_argument("--iwae-samples", type=int, help="importance samples of the NLL estimate (published numbers use 5000; default: the run's)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: %(default)s)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    evaluate.set_defaults(handler=_evaluate)

    generate = commands.add_parser("generate", help="decode images from the prior of a model into a PNG grid")
    generate.add_argument("model", help=model_help)
    generate.add_argument("-n", type=int, default=64, help="how many images (default: %(default)s)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the latent draws (default: %(default)s)")
    generate.add_argument("-o", "--output", type=Path, default=Path("samples.png"), help="the PNG to write (default: %(default)s)")
    generate.set_defaults(handler=_generate)

    promote = commands.add_parser("promote", help="move the champion alias to a version by hand, recording why")
    promote.add_argument("name", help="the registered model, e.g. vae-mnist")
    promote.add_argument("version", help="the version that becomes champion")
    promote.add_argument("--reason", required=True, help="why, recorded on the version")
    promote.set_defaults(handler=_promote)

    ui = commands.add_parser("ui", help="start the MLflow UI over the tracking store and print its address")
    ui.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: %(default)s)")
    ui.add_argument("--port", type=int, default=5000, help="(default: %(default)s)")
    ui.set_defaults(handler=_ui)

    args = parser.parse_args(argv)
    if getattr(args, "n", 1) < 1:
        parser.error("-n must be at least 1")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
