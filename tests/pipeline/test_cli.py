"""Specification of the command line's own behaviour: what it imports before it answers, the memory it keeps, its
garbage collector, and the leaderboard."""

import gc
import json
import os
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

import flows
from pipeline import cli
from pipeline.config import load_config
from pipeline.registry import LEADERBOARD_COLUMNS, assign_alias, leaderboard, log_model, register_version
from tests.conftest import PROJECT_ROOT, TINY_RUN, needs_data
from vae.config import ModelConfig
from vae.models import build_model

HEAVY = ("torch", "mlflow", "prefect", "pandas", "matplotlib")


def modules_imported_by(*arguments: str) -> tuple[int, set[str]]:
    """The exit code of `python flows.py ARGUMENTS`, and which of the heavy libraries it imported before exiting."""
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['flows.py', *{list(arguments)!r}]\n"
        "try:\n"
        "    runpy.run_path('flows.py', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        f"    print(exit.code, sorted(name for name in {HEAVY!r} if name in sys.modules))\n"
    )
    finished = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    code, imported = finished.stdout.strip().splitlines()[-1].split(" ", 1)
    return int(code), set(json.loads(imported.replace("'", '"')))


@pytest.mark.parametrize(
    "arguments",
    [["--help"], ["train", "--help"], ["train", "--set", "model.latent_dim=0"], ["train", "--preset", "nope"], ["sweep"]],
    ids=["help", "command-help", "bad-config", "unknown-preset", "missing-option"],
)
def test_help_and_bad_input_answer_without_importing_torch_mlflow_or_prefect(arguments):
    code, imported = modules_imported_by(*arguments)
    assert code in (0, 2)
    assert imported == set()


@pytest.fixture
def registered(mlflow_store):
    """A store with one logged tiny model registered as three versions of vae-mnist, with test NLLs 90, 88 and 89.5."""
    model = build_model(ModelConfig(hidden_dims=(16,), latent_dim=2), seed=0)
    config = load_config("default")
    with mlflow.start_run(experiment_id=MlflowClient().create_experiment("runs")) as run:
        uri = log_model(model, ModelConfig(hidden_dims=(16,), latent_dim=2), torch.rand(2, 1, 28, 28))
        mlflow.log_metrics({"epochs_trained": 4, "training_minutes": 1.5})
    for nll in (90.0, 88.0, 89.5):
        metrics = {"test_nll_nats": nll, "test_elbo_nats": -nll - 5, "test_bits_per_dim": nll / 543.43}
        assign_alias(config, metrics, register_version(uri, config, metrics, run.info.run_id))
    return run.info.run_id


def page_faults_of_twenty_40_mb_tensors(kept: bool, environment: dict[str, str]) -> int:
    """Minor page faults while a fresh process makes and frees a 40 MB tensor twenty times (after
    :func:`pipeline.cli.keep_freed_memory` when asked)."""
    probe = (
        "import resource, torch\n"
        "from pipeline.cli import keep_freed_memory\n"
        f"if {kept}:\n"
        "    keep_freed_memory()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20):\n"
        "    torch.ones(10 << 20).sum()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    finished = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True, check=True)
    return int(finished.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the settings are glibc's")
def test_commands_keep_freed_memory_for_the_next_tensor_instead_of_faulting_its_pages_in_again(monkeypatch):
    pages = (40 << 20) // 4096
    environment = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    assert page_faults_of_twenty_40_mb_tensors(False, environment) > 19 * pages  # glibc's default: every tensor afresh
    # Kept: after the first few (glibc settles its heap), every tensor reuses the pages of the one before.
    assert page_faults_of_twenty_40_mb_tensors(True, environment) < 10 * pages
    for name in cli.MALLOC_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    cli.keep_freed_memory()
    assert {name: os.environ[name] for name in cli.MALLOC_SETTINGS} == {
        "MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    }  # and so for the processes a command starts
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    cli.keep_freed_memory()
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"  # what the user set stays


def collector_at_exit_of(*arguments: str, environment: dict[str, str]) -> tuple[int, bool, int, int]:
    """The exit code of the program (`python flows.py ARGUMENTS`), whether its garbage collector was on when it exited,
    and how many of the objects it tracks were frozen by then, and how many not."""
    probe = (
        "import atexit, gc, runpy, sys\n"
        "atexit.register(lambda: print(gc.isenabled(), gc.get_freeze_count(), len(gc.get_objects())))  # runs last\n"
        f"sys.argv = ['flows.py', *{list(arguments)!r}]\n"
        "try:\n"
        "    runpy.run_path('flows.py', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    print(exit.code)\n"
    )
    finished = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True, check=True)
    code, state = finished.stdout.strip().splitlines()[-2:]
    enabled, frozen, unfrozen = state.split()
    return int(code), enabled == "True", int(frozen), int(unfrozen)


def test_the_program_freezes_its_heap_before_it_exits_with_the_collector_on(mlflow_store):
    code, enabled, frozen, unfrozen = collector_at_exit_of("leaderboard", environment=dict(os.environ))
    assert code == 0 and enabled
    assert frozen > 100_000  # MLflow's and pandas' modules, classes and functions...
    assert unfrozen < 100  # ...and what the command made after them: the teardown's collections skip them all


@needs_data
def test_a_served_flow_runs_process_keeps_freed_memory_and_freezes_the_flows_imports_and_its_heap_at_exit(prefect_server, mlflow_store):
    """Each run of `flows.py serve` (or of a Prefect worker) is a `python -m prefect.engine` process that imports
    flows.py itself: it gets what the program gets, though it never runs pipeline.cli.run."""
    parameters = {"config": load_config("default", TINY_RUN).model_dump(mode="json")}
    deployment = flows.train_flow.to_deployment(name="collector", parameters=parameters).apply()
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.create_flow_run_from_deployment(deployment)
        probe = (  # what `python -m prefect.engine` runs, as the Runner of `flows.py serve` starts it
            "import atexit, gc, os, runpy\n"
            "atexit.register(lambda: print(gc.isenabled(), gc.get_freeze_count(), len(gc.get_objects()),\n"
            "                              os.environ.get('MALLOC_TRIM_THRESHOLD_')))  # runs last\n"
            "runpy.run_module('prefect.engine', run_name='__main__', alter_sys=True)\n"
        )
        environment = {name: value for name, value in os.environ.items() if name not in cli.MALLOC_SETTINGS}
        environment |= {"PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT__FLOW_RUN_ID": str(flow_run.id)}
        finished = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True)
        assert prefect.read_flow_run(flow_run.id).state.is_completed(), finished.stderr[-3000:]
    enabled, frozen, unfrozen, trim_threshold = finished.stdout.strip().splitlines()[-1].split()
    assert trim_threshold == str(cli.MALLOC_SETTINGS["MALLOC_TRIM_THRESHOLD_"][1])  # freed memory kept, as in the program
    assert enabled == "True"
    assert int(frozen) > 100_000  # torch's, MLflow's and Prefect's modules, classes and functions...
    assert int(unfrozen) < 100  # ...and what the run made: the teardown's collections skip them all


def test_in_the_program_heavy_imports_run_with_the_collector_paused_and_stay_frozen(monkeypatch):
    monkeypatch.setattr(cli, "_FREEZING_IMPORTS", True)  # as under cli.run
    frozen = gc.get_freeze_count()
    try:
        with cli._imports():
            assert not gc.isenabled()
            made = [[number] for number in range(1000)]
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(made)
    finally:
        gc.unfreeze()


def test_main_called_by_other_code_leaves_its_garbage_collector_alone(mlflow_store, capsys):
    frozen = gc.get_freeze_count()
    assert cli.main(["leaderboard", "--json"]) == 0
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_the_leaderboard_lists_versions_best_first_with_their_aliases_and_training(registered):
    board = leaderboard("vae-mnist")

    assert list(board.columns) == LEADERBOARD_COLUMNS
    assert board["version"].tolist() == [2, 3, 1]
    assert board["test_nll_nats"].tolist() == [88.0, 89.5, 90.0]
    assert board["aliases"].tolist() == ["champion", "challenger", ""]
    assert board["test_fid"].isna().all()
    assert board[["epochs", "training_minutes"]].values.tolist() == [[4, 1.5]] * 3
    assert (board["run_id"] == registered).all() and (board["preset"] == "default").all()


def test_the_leaderboard_command_prints_a_table_csv_or_json(registered, capsys):
    when = {
        int(version.version): pd.Timestamp(version.creation_timestamp, unit="ms", tz="UTC").strftime("%Y-%m-%d %H:%M").split()
        for version in MlflowClient().search_model_versions("name = 'vae-mnist'")
    }
    assert cli.main(["leaderboard"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "vae-mnist"
    assert lines[1].split() == ["version", "aliases", "preset", "NLL", "(nats)", "ELBO", "(nats)", "bits/dim", "FID", "epochs", "minutes", "registered", "(UTC)", "run"]
    assert [line.split() for line in lines[2:]] == [
        ["2", "champion", "default", "88.00", "-93.00", "0.1619", "4", "1.5", *when[2], registered[:12]],
        ["3", "challenger", "default", "89.50", "-94.50", "0.1647", "4", "1.5", *when[3], registered[:12]],
        ["1", "default", "90.00", "-95.00", "0.1656", "4", "1.5", *when[1], registered[:12]],
    ]

    assert cli.main(["leaderboard", "vae-mnist", "--csv"]) == 0
    csv = capsys.readouterr().out
    assert csv.splitlines()[0] == ",".join(LEADERBOARD_COLUMNS)
    assert [row.split(",")[1] for row in csv.splitlines()[1:]] == ["2", "3", "1"]

    assert cli.main(["leaderboard", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["version"], row["aliases"], row["test_nll_nats"]) for row in rows] == [(2, "champion", 88.0), (3, "challenger", 89.5), (1, "", 90.0)]


def test_the_leaderboard_of_an_unknown_model_fails_naming_it(mlflow_store, capsys):
    assert cli.main(["leaderboard", "vae-cifar"]) == 1
    assert capsys.readouterr().err.startswith("error: no registered model 'vae-cifar' in sqlite:///")
    assert cli.main(["leaderboard"]) == 0
    assert capsys.readouterr().out.startswith("no registered versions in sqlite:///")
