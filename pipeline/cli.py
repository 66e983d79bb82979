"""The command line (`python flows.py <command>`, or `vae-pipeline`): train, serve, sweep, evaluate, generate, promote, ui.

Each command imports what it needs when it runs: help and a bad option or config answer at once, and the commands
that need no Prefect (evaluate, generate, promote, ui) never start or reach a Prefect server.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import gc
import ipaddress
import json
import logging
import os
import sys
import traceback
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext, redirect_stdout, suppress
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import prefect_api
from pipeline.config import (
    DEFAULT_RETRAINING_CRON, LOCAL_WORKERS, PRESETS, ConfigError, RunConfig, load_config, parse_override, with_overrides,
)
from pipeline.redaction import redact

if TYPE_CHECKING:
    import pandas as pd
    from prefect.client.schemas.objects import State

    from flows import TrainingOutcome

NO_PREFECT_SERVER = """scheduled retraining needs a Prefect server, and PREFECT_API_URL names none (without one, Prefect
would use a temporary server that ends with this command, and nothing would ever run on schedule). Start one, point
PREFECT_API_URL at it, then serve again:
  prefect server start                                # in another terminal; listens on http://127.0.0.1:4200
  export PREFECT_API_URL=http://127.0.0.1:4200/api    # or: prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api"""


def _config_from(args: argparse.Namespace) -> RunConfig:
    overrides = dict(parse_override(text) for text in args.overrides)
    shortcuts = {"data.dataset": args.dataset, "train.epochs": args.epochs, "train.device": args.device}
    overrides.update({key: value for key, value in shortcuts.items() if value is not None})
    if args.resume is not None:
        from pipeline import tracking

        tracking.ensure_store()
        return with_overrides(tracking.run_config(args.resume), overrides)
    return load_config(args.preset, overrides, file=args.config)


def _checked_device(config: RunConfig) -> None:
    """Refuse a device this machine does not have (a RuntimeError naming it), before any work starts."""
    from vae.distributed import resolve_device

    resolve_device(config.train.device)


def _print_metrics(config: RunConfig, metrics: dict[str, float]) -> None:
    from pipeline.training import run_notes

    print(f"  test ELBO       {metrics['test_elbo_nats']:9.2f} nats  (reconstruction {metrics['test_reconstruction_nats']:.2f}, KL {metrics['test_kl_nats']:.2f})")
    if "test_nll_nats" in metrics:
        print(f"  test NLL (IWAE) {metrics['test_nll_nats']:9.2f} nats  ({metrics['test_bits_per_dim']:.4f} bits/dim, k={config.eval.iwae_samples})")
    if "test_fid" in metrics:
        print(f"  FID (samples)   {metrics['test_fid']:9.2f}       (reconstructions {metrics['test_reconstruction_fid']:.2f}, "
              f"{metrics['test_reconstruction_accuracy']:.2%} of them classified as their image)")
    for note in run_notes(config):
        print(f"  note            {note}")


def _print_outcome(config: RunConfig, outcome: TrainingOutcome) -> None:
    print(f"\n{config.preset} on {config.data.dataset}: {outcome.epochs_trained} epochs, {outcome.training_minutes:.1f} minutes of training")
    _print_metrics(config, outcome.metrics)
    for name, value in (outcome.tutorial_figures or {}).items():
        print(f"  {name:<15} {value:9.2f}       (epoch {outcome.epochs_trained}, in the tutorial's unit)")
    print(f"  MLflow run      {outcome.run_id} (experiment {config.experiment_name}, store {redact(outcome.tracking_uri)})")
    if outcome.version is not None:
        print(f"  registered      models:/{outcome.registered_model}/{outcome.version} as {outcome.alias}: {outcome.promotion_reason}")
    _print_ui(outcome.tracking_uri, outcome.experiment_id, outcome.run_id)


def _print_ui(tracking_uri: str, experiment_id: str, run_id: str) -> None:
    from pipeline import tracking

    address = tracking.ui_url(experiment_id, run_id, tracking_uri=tracking_uri)
    how = "" if tracking.is_tracking_server(tracking_uri) else "python flows.py ui, then "
    print(f"  open the UI     {how}{address}")


def _train(args: argparse.Namespace) -> int:
    starts_group = args.processes > 1 and "WORLD_SIZE" not in os.environ  # else one of a group, or alone
    if starts_group and args.resume is not None:
        return _fail(ValueError("--resume continues a run in one process: leave out --processes"), 2)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.resume is not None:
        return _fail(ValueError("--resume continues a run in one process: launch it without torchrun"), 2)
    try:
        config = _config_from(args)
    except ConfigError as error:
        return _fail(error, 2)
    # The process that runs the flow (rank 0 of a group, or this one alone) starts its Prefect server (unless
    # PREFECT_API_URL names one) before it imports torch, MLflow and the flows, so that the server starts meanwhile.
    runs_flow = os.environ.get("RANK", "0") == "0" and not starts_group
    server = prefect_api.start_private_server() if runs_flow else None
    try:
        with _imports():
            _checked_device(config)
        if args.resume is not None:  # a run still training in another process: refused before any work
            from pipeline import tracking

            tracking.check_not_running(args.resume)
    except RuntimeError as error:
        return _fail(error, 2)
    if starts_group:  # each process runs this same command; a bad value was reported once, above
        from vae.launch import launch

        flows_py = Path(__file__).resolve().parent.parent / "flows.py"
        return launch([sys.executable, str(flows_py), *args.argv], args.processes)
    with _imports():  # every process that trains: torch.optim imports it, and sympy, when it makes the first optimizer
        import torch._dynamo  # noqa: F401
    from vae.distributed import process_group

    with process_group() as (rank, _):  # under --processes or torchrun: every process of the group; else this one
        if rank != 0:
            return _train_shard(config)
        with _imports():
            from flows import train_flow

        _wait_for(server)
        with _flow_errors_reported_once():
            state = train_flow(config, resume_run_id=args.resume, return_state=True)
        if state.is_failed():
            return _flow_failed("the training flow", state)
        _print_outcome(config, state.result())
        return 0


def _wait_for(server: prefect_api.PrivateServer | None) -> None:
    """Wait until the private Prefect server (if this command started one) is ready, and meanwhile ready the MLflow
    store (the flow's own call is then free): on a new machine, creating it overlaps the server's start. A store that
    fails here fails again in the flow, which reports it."""
    if server is None:
        return
    from pipeline import tracking

    with suppress(Exception):
        tracking.ensure_store()
    server.wait_until_ready()


def _train_shard(config: RunConfig) -> int:
    """A process of rank > 0: the same data, its shard of every batch; no Prefect, MLflow or checkpoint."""
    with _imports():
        from pipeline import data, training
        from vae.engine import NonFiniteLossError

    # Rank 0 reports the download (each process fetches, into the same cache); here it would only repeat it.
    files = data.fetch(config.data.dataset, config.data.cache_dir, progress=False)
    prepared = data.prepare_configured(config.data, files)
    try:
        training.train(config, prepared)
    except NonFiniteLossError as error:
        # Rank 0 stopped at the same step and ends its MLflow run FAILED with the error, then exits 1. Exiting 1
        # here first would make torchrun stop rank 0 before it has.
        print(f"error: {error} (rank 0 records it)", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        config = _config_from(args)
        with _imports():
            _checked_device(config)
    except (ConfigError, RuntimeError) as error:
        return _fail(error, 2)
    with _imports():
        import flows
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL

        from pipeline import tracking

    try:
        schedule = flows.retraining_schedule(args.cron, args.timezone)
    except ConfigError as error:
        return _fail(error, 2)
    api_url = PREFECT_API_URL.value()
    if not api_url:
        print(f"error: {NO_PREFECT_SERVER}", file=sys.stderr)
        return 2
    with get_client(sync_client=True) as client:
        unreachable = client.api_healthcheck()
    if unreachable is not None:
        print(redact(f"error: no Prefect server answers at PREFECT_API_URL={api_url} ({unreachable}); start it with "
                     "`prefect server start`, or point PREFECT_API_URL at a running one"), file=sys.stderr)
        return 2
    tracking_uri = tracking.ensure_store()
    name = args.name or f"scheduled-retraining-{config.preset}"
    deployment = f"{flows.train_flow.name}/{name}"
    print(f"deployment      {deployment} on the Prefect server at {redact(api_url)}")
    print(f"  schedule      {schedule.cron} ({schedule.timezone}), next run {flows.next_run_time(schedule):%Y-%m-%d %H:%M %Z}")
    print(f"  each run      {config.preset} on {config.data.dataset}, {config.train.epochs} epochs: a new MLflow run in "
          f"experiment {config.experiment_name} of {redact(tracking_uri)}, registered as a new version of {config.model_name} "
          "that competes for champion")
    print(f"  run it now    prefect deployment run '{deployment}'")
    print("This process runs the deployment's flow runs: keep it running (Ctrl-C stops it and pauses the schedule).", flush=True)
    flows.serve_retraining(config, schedule, name)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from pipeline import sweep

    try:
        base = _config_from(args)
        grid = sweep.parse_grid(args.grid)
        sweep.trials(base, grid, samples=args.samples, seed=args.seed)  # every trial's config, checked before any work
    except ConfigError as error:
        return _fail(error, 2)
    if args.dask_address and (warning := dask_address_warning(args.dask_address)):
        print(f"warning: {warning}", file=sys.stderr)
    server = prefect_api.start_private_server()
    with _imports():
        import flows
    _wait_for(server)
    runner = flows.dask_task_runner(args.dask_address, args.workers or LOCAL_WORKERS)
    with _flow_errors_reported_once():
        state = flows.sweep_flow.with_options(task_runner=runner)(base, grid, samples=args.samples, seed=args.seed, return_state=True)
    if state.is_failed():
        return _flow_failed("the sweep", state)
    outcome: flows.SweepOutcome = state.result()
    print(f"\n{len(outcome.leaderboard)} trials of {base.preset} on {base.data.dataset}, best first:")
    print(outcome.leaderboard.fillna({"error": ""}).to_string(index=False, max_colwidth=80))
    print(f"  MLflow run      {outcome.run_id} with the trials nested (experiment {base.experiment_name}, store {redact(outcome.tracking_uri)})")
    print(f"  best            trial {outcome.best_trial}, run {outcome.best_run_id}")
    if outcome.version is not None:
        print(f"  registered      models:/{outcome.registered_model}/{outcome.version} as {outcome.alias}: {outcome.promotion_reason}")
    _print_ui(outcome.tracking_uri, outcome.experiment_id, outcome.run_id)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    with _imports():
        from pipeline import data, registry, tracking, training
        from vae.distributed import resolve_device
        from vae.export import ModelFileError

    tracking.ensure_store()
    try:
        device = resolve_device(args.device)
        loaded = registry.load(args.model, device=device)
        overrides = {"eval.iwae_samples": args.iwae_samples} if args.iwae_samples is not None else {}
        config = with_overrides(loaded.config, overrides)
        files = data.fetch(config.data.dataset, config.data.cache_dir)
        prepared = data.prepare_configured(config.data, files)
    except (ConfigError, RuntimeError, LookupError, data.DataError, ModelFileError) as error:
        return _fail(error, 1)
    # With --json, stdout holds the one JSON object: what the work prints (progress lines, a classifier trained first)
    # goes to stderr.
    with redirect_stdout(sys.stderr) if args.json else nullcontext():
        metrics = training.evaluate(loaded.model, prepared.test, config)
        if config.eval.fid:  # the registered classifier of the run's data set and recipe (trained first if there is none)
            from pipeline import sample_quality

            classifier = sample_quality.ensure_classifier(config.data.dataset, files, config.classifier, device=args.device, lock_dir=config.data.cache_dir)
            metrics |= sample_quality.score(loaded.model, classifier.classifier, files, prepared.test, config)
    if args.json:
        print(json.dumps({"model": loaded.uri, "run_id": loaded.run_id, "iwae_samples": config.eval.iwae_samples, **metrics}))
    else:
        print(f"{loaded.uri} (run {loaded.run_id}) on the {config.data.dataset} test set:")
        _print_metrics(config, metrics)
    return 0


def _generate(args: argparse.Namespace) -> int:
    with _imports():
        import torch

        from pipeline import pictures, registry, tracking
        from vae.export import ModelFileError

    tracking.ensure_store()
    try:
        loaded = registry.load(args.model)
    except (LookupError, ModelFileError) as error:
        return _fail(error, 1)
    images = loaded.model.sample(args.n, generator=torch.Generator().manual_seed(args.seed))
    pictures.image_grid(images, *pictures.grid_shape(args.n)).save(args.output)
    print(f"{args.n} samples of {loaded.uri} written to {args.output}")
    return 0


def _leaderboard(args: argparse.Namespace) -> int:
    with _imports():
        from pipeline import registry, tracking

    tracking.ensure_store()
    try:
        board = registry.leaderboard(args.name)
    except LookupError as error:
        return _fail(error, 1)
    if args.csv:
        print(board.to_csv(index=False), end="")
    elif args.json:
        print(board.to_json(orient="records", date_format="iso"))
    elif board.empty:
        print(f"no registered versions in {tracking.default_tracking_uri()}")
    else:
        print(leaderboard_text(board))
    return 0


def leaderboard_text(board: pd.DataFrame) -> str:
    """The leaderboard as a person reads it: one block per model, numbers rounded, empty cells blank."""
    import pandas as pd

    shown = board.assign(
        registered=board["registered"].dt.strftime("%Y-%m-%d %H:%M"),
        run_id=board["run_id"].str[:12],
    ).rename(columns={
        "test_nll_nats": "NLL (nats)", "test_elbo_nats": "ELBO (nats)", "test_bits_per_dim": "bits/dim",
        "test_fid": "FID", "training_minutes": "minutes", "registered": "registered (UTC)", "run_id": "run",
    })
    formats = {"NLL (nats)": "{:.2f}", "ELBO (nats)": "{:.2f}", "bits/dim": "{:.4f}", "FID": "{:.2f}", "epochs": "{:.0f}", "minutes": "{:.1f}"}
    for column, pattern in formats.items():
        shown[column] = shown[column].map(lambda value, pattern=pattern: "" if pd.isna(value) else pattern.format(value))
    blocks = []
    for model, rows in shown.groupby("model", sort=False):
        blocks.append(f"{model}\n{rows.drop(columns='model').to_string(index=False)}")
    return "\n\n".join(blocks)


def _promote(args: argparse.Namespace) -> int:
    with _imports():
        from pipeline import registry, tracking

    tracking.ensure_store()
    try:
        registry.promote(args.name, args.version, args.reason)
    except LookupError as error:
        return _fail(error, 1)
    print(f"models:/{args.name}@{registry.CHAMPION} is now version {args.version} ({args.reason})")
    return 0


UI_UNAUTHENTICATED = (
    "MLflow's UI has no authentication: whoever reaches it can read every run and model, and change or delete them"
)


def _ui(args: argparse.Namespace) -> int:
    from pipeline import tracking

    uri = tracking.default_tracking_uri()
    if tracking.is_tracking_server(uri):
        print(f"MLFLOW_TRACKING_URI is a tracking server, which serves the UI itself: open {redact(uri)}")
        return 0
    if not (args.host == "localhost" or _is_loopback(args.host)):
        if not args.allow_remote:
            print(f"error: --host {args.host} would serve the UI beyond this machine, and {UI_UNAUTHENTICATED}. Add "
                  "--allow-remote to do it anyway, on a network you trust, or reach the UI through an SSH tunnel "
                  f"(ssh -L {args.port}:127.0.0.1:{args.port} <this host>).", file=sys.stderr)
            return 2
        print(f"warning: serving the UI on {args.host} beyond this machine: {UI_UNAUTHENTICATED}.", file=sys.stderr)
    command = tracking.ui_command(tracking.ensure_store(uri), host=args.host, port=args.port)
    # What the UI shows as RUNNING should be running: runs whose process died on this host are marked KILLED first.
    tracking.mark_dead_runs()
    address = f"http://{args.host}:{args.port}"
    print(f"MLflow UI on {address} over {redact(uri)} (Ctrl-C stops it); the runs of each experiment:", flush=True)
    for name, experiment_id in tracking.experiments().items():
        print(f"  {name:<20} {tracking.ui_url(experiment_id, tracking_uri=uri, ui=address)}", flush=True)
    # The UI needs none of MLflow's server-side jobs (GenAI scoring, trace archival), which would otherwise start a job
    # runner and six worker processes of about 240 MB each; MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true keeps them.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(command[0], command)


def dask_address_warning(address: str) -> str | None:
    """What to tell the user about the scheduler at ``address``, if it is reached in plain TCP beyond this machine."""
    scheme, _, rest = address.rpartition("://")
    host = urllib.parse.urlsplit(f"//{rest}").hostname or ""
    if scheme not in ("", "tcp") or host == "localhost" or _is_loopback(host):
        return None
    return (
        f"the Dask scheduler at {address} is reached without TLS: Dask runs the pickled functions any client sends, "
        "without authentication, so whoever can reach the scheduler or a worker can run code on every worker. Start "
        "the cluster with TLS (tls:// addresses; see the README's Operations section) unless every machine that can "
        "reach it is trusted."
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def _fail(error: BaseException, code: int) -> int:
    print(redact(f"error: {error}"), file=sys.stderr)
    return code


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says all a user needs to act on (the file, the field, the epoch): no traceback for them."""
    from pipeline.data import DataError
    from pipeline.sweep import SweepError
    from vae.engine import NonFiniteLossError

    return ConfigError, DataError, NonFiniteLossError, SweepError, LookupError, FileNotFoundError


def _flow_failed(flow: str, state: State) -> int:
    """Report a failed flow run once: the error's message, with its traceback only when the error was not foreseen."""
    error = state.result(raise_on_failure=False)
    if not isinstance(error, BaseException):  # failed without an exception of its own (e.g. crashed infrastructure)
        lines = [f"error: {flow} failed: {state.message}"]
    elif isinstance(error, _expected_errors()):
        lines = [f"error: {flow} failed: {error}"]
    else:
        trace = "".join(traceback.format_exception(error)).rstrip()
        lines = [trace, f"error: {flow} failed: {type(error).__name__}: {error}"]
    lines += [f"  {note}" for note in getattr(error, "__notes__", [])]  # e.g. which run to resume, if the store was down
    print(redact("\n".join(lines)), file=sys.stderr)  # a URL in the error may hold a password
    return 1


class _NoRunErrors(logging.Filter):
    """Keeps Prefect's records of failing flow and task runs off the console, where one failure would otherwise be
    shown four times (a traceback and a final state holding the message, for the task and again for the flow); the
    Prefect server still receives them all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return True
        return record.levelno < logging.ERROR and not record.getMessage().startswith(
            ("Finished in state Failed", "Finished in state Crashed")
        )


@contextmanager
def _flow_errors_reported_once() -> Iterator[None]:
    """While a flow runs, its failure is shown by :func:`_flow_failed` alone, not also by Prefect's console logging."""
    from prefect.logging.handlers import PrefectConsoleHandler

    consoles = [handler for handler in logging.getLogger().handlers if isinstance(handler, PrefectConsoleHandler)]
    quiet = _NoRunErrors()
    for handler in consoles:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in consoles:
            handler.removeFilter(quiet)


# glibc hands a freed block above its mmap threshold (at most 32 MB by itself) back to the kernel, and the next tensor of
# that size is faulted in again page by page: evaluate's IWAE loop, which makes and frees tensors of tens of MB for
# every chunk of samples, spent 10 to 15% of its time so. With these, such blocks come from the heap and stay there.
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": (-3, 256 << 20), "MALLOC_TRIM_THRESHOLD_": (-1, 1 << 30)}  # (mallopt's M_*, bytes)


def keep_freed_memory() -> None:
    """Have glibc keep freed blocks of up to 256 MB for reuse (:data:`MALLOC_SETTINGS`) in this process, set with
    mallopt, and in the processes it starts (Dask workers, torchrun's, Prefect's), which read the environment; values
    the environment already holds are kept. Nothing happens without glibc."""
    for name, (_, default) in MALLOC_SETTINGS.items():
        os.environ.setdefault(name, str(default))
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no glibc (macOS, Windows)
        return
    for name, (option, default) in MALLOC_SETTINGS.items():
        value = os.environ[name]
        mallopt(option, int(value) if value.isdigit() else default)


# Modules, classes and functions live until the process ends, yet the cyclic garbage collector walks them again and
# again: while imports grow the heap (torch, MLflow, Prefect and matplotlib: about 1 s of its full passes here) and in
# the interpreter's teardown (about 1.4 s more). The program (run) has the heavy imports made with the collector paused
# (_imports), freezes what they made (gc.freeze: out of every later pass) and freezes everything before it exits; so
# does each process Prefect starts to run one served flow run (flows_imports). Code that calls main itself (tests,
# other programs) keeps its collector as it was.
_FREEZING_IMPORTS = False


def run() -> None:
    """The program (`python flows.py`, `vae-pipeline`): :func:`main` in a process of its own, whose collector skips
    the imports and whose teardown skips the heap (see :data:`_FREEZING_IMPORTS`); exits with the command's code."""
    global _FREEZING_IMPORTS
    _FREEZING_IMPORTS = True
    code = main()
    gc.freeze()
    sys.exit(code)


@contextmanager
def _imports() -> Iterator[None]:
    """Around a command's heavy imports: in the program, with the collector paused, and what they made frozen after;
    elsewhere nothing changes."""
    if not _FREEZING_IMPORTS:
        yield
        return
    was_collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_collecting:
            gc.enable()


@contextmanager
def flows_imports() -> Iterator[None]:
    """Around flows.py's imports: in the program, as any command's heavy imports (:func:`_imports`). In a process
    Prefect started to run one flow run (:func:`pipeline.prefect_api.is_flow_run_process`, the runs of `flows.py
    serve`, or of a Prefect worker), what :func:`run` and :func:`main` give the program: freed memory kept
    (:func:`keep_freed_memory`), the imports, and torch's compiler stack that the training optimizer's first use
    imports, made with the collector paused and frozen after, and the heap frozen at exit. Elsewhere nothing changes."""
    global _FREEZING_IMPORTS
    flow_run_process = not _FREEZING_IMPORTS and prefect_api.is_flow_run_process()
    if flow_run_process:
        _FREEZING_IMPORTS = True
        atexit.register(gc.freeze)
        keep_freed_memory()
    with _imports():
        yield
        if flow_run_process:
            import torch._dynamo  # noqa: F401


def main(argv: Sequence[str] | None = None) -> int:
    prefect_api.disable_telemetry()  # before any command imports Prefect or MLflow
    keep_freed_memory()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # downloads here are a few small files
    parser = argparse.ArgumentParser(prog="flows.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    config_options = argparse.ArgumentParser(add_help=False)  # the run config, shared by train, serve and sweep
    config_options.add_argument("--preset", default="default", choices=sorted(PRESETS), help="the starting config (default: %(default)s)")
    config_options.add_argument("--config", type=Path, help="a TOML or JSON file of settings applied over the preset")
    config_options.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override one setting, e.g. --set model.latent_dim=2 (repeatable)")
    config_options.add_argument("--dataset", choices=["mnist", "fashion-mnist"], help="shortcut for --set data.dataset=...")
    config_options.add_argument("--epochs", type=int, help="shortcut for --set train.epochs=...")
    config_options.add_argument("--device", help="shortcut for --set train.device=... (auto, cpu, cuda, mps)")

    train = commands.add_parser("train", parents=[config_options], help="run the training flow (a preset plus overrides)")
    train.add_argument("--resume", metavar="RUN_ID", help="continue an MLflow run from its last checkpoint, with its config (plus --epochs, --set)")
    train.add_argument("--processes", type=int, default=1, metavar="N", help="train in N processes on this machine with DistributedDataParallel (one per GPU, or per group of CPU cores), every socket on 127.0.0.1 (default: %(default)s)")
    train.set_defaults(handler=_train)

    serve = commands.add_parser(
        "serve", parents=[config_options],
        help="retrain on a cron schedule: create a deployment of the training flow on the Prefect server and run it",
        description="Create a deployment of the training flow with a cron schedule on the Prefect server that "
        "PREFECT_API_URL names, and run its flow runs in this process until Ctrl-C (which pauses the schedule). "
        "Each run is a new MLflow run and a new registered version that competes for champion.",
    )
    serve.add_argument("--cron", default=DEFAULT_RETRAINING_CRON, help="when to retrain: minute hour day-of-month month day-of-week (default: %(default)r, Mondays at 03:00)")
    serve.add_argument("--timezone", default="UTC", help="the IANA time zone the cron expression is read in (default: %(default)s)")
    serve.add_argument("--name", help="the deployment's name (default: scheduled-retraining-<preset>)")
    serve.set_defaults(handler=_serve, resume=None)

    sweeps = commands.add_parser(
        "sweep", parents=[config_options],
        help="train a grid (or a random sample) of configs in parallel on Dask, nested under one MLflow run; register the best",
        description="Train every combination of the --grid values over the base config (--preset, --config, --set) as "
        "Prefect tasks on Dask, each trial an MLflow run nested under the sweep's run. The leaderboard goes to the "
        "sweep's run as leaderboard.csv and to Prefect as a table artifact, best first by the validation ELBO (by the "
        "test metric without a validation set); the best trial is registered and competes for champion. A failing trial "
        "is a failed row and does not stop the others.",
    )
    sweeps.add_argument("--grid", action="append", required=True, metavar="SECTION.FIELD=V1,V2,...", help="a swept field and its values, read as JSON when they parse, e.g. --grid model.latent_dim=2,10,20 or --grid model.hidden_dims=[400],[512,256] (repeatable: the trials are every combination)")
    sweeps.add_argument("--samples", type=int, metavar="N", help="train N distinct combinations drawn at random instead of all of them")
    sweeps.add_argument("--seed", type=int, default=0, help="seed of the --samples draws (default: %(default)s)")
    sweeps.add_argument("--dask-address", metavar="ADDRESS", help="run the trials on an existing Dask scheduler, e.g. tcp://127.0.0.1:8786 (default: a local cluster)")
    sweeps.add_argument("--workers", type=int, help=f"worker processes of the local cluster, one trial at a time each (default: {LOCAL_WORKERS})")
    sweeps.set_defaults(handler=_sweep, resume=None)

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

    board = commands.add_parser(
        "leaderboard", help="the registered versions of a model (or of all), best first: read it before promote",
        description="The registered versions of a model, or of every VAE family, best first by test NLL (then test "
        "ELBO): version, aliases, preset, NLL, ELBO, bits/dim, FID, epochs, training minutes, when, run id.",
    )
    board.add_argument("name", nargs="?", help="a registered model, e.g. vae-mnist (default: every vae-* model)")
    formats = board.add_mutually_exclusive_group()
    formats.add_argument("--csv", action="store_true", help="print CSV, for scripts")
    formats.add_argument("--json", action="store_true", help="print a JSON list of rows, for scripts")
    board.set_defaults(handler=_leaderboard)

    promote = commands.add_parser("promote", help="move the champion alias to a version by hand, recording why")
    promote.add_argument("name", help="the registered model, e.g. vae-mnist")
    promote.add_argument("version", help="the version that becomes champion")
    promote.add_argument("--reason", required=True, help="why, recorded on the version")
    promote.set_defaults(handler=_promote)

    ui = commands.add_parser("ui", help="start the MLflow UI over the tracking store and print its address")
    ui.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: %(default)s); another than loopback needs --allow-remote")
    ui.add_argument("--allow-remote", action="store_true", help="serve the UI on a --host other machines reach, although it has no authentication")
    ui.add_argument("--port", type=int, default=5000, help="(default: %(default)s)")
    ui.set_defaults(handler=_ui)

    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what each process of `train --processes N` runs
    if getattr(args, "processes", 1) < 1:
        parser.error("--processes must be at least 1")
    if getattr(args, "n", 1) < 1:
        parser.error("-n must be at least 1")
    if getattr(args, "workers", None) is not None and (args.workers < 1 or args.dask_address):
        parser.error("--workers sizes the local cluster: at least 1, and not with --dask-address (whose workers run the trials)")
    return args.handler(args)


