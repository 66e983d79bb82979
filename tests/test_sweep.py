"""Specification of a sweep's trials (grid, random sample, validation) and of its leaderboard."""

import math

import pandas as pd
import pytest

from pipeline import sweep
from pipeline.config import ConfigError, load_config

BASE = load_config("default", {"train.epochs": 1})


def trial(number, **values):
    return sweep.Trial(number, {name.replace("__", "."): value for name, value in values.items()}, BASE)


def finished(number, elbo, nll=None, minutes=None, validation=None, **values):
    metrics = {"test_elbo_nats": elbo, **({} if nll is None else {"test_nll_nats": nll})}
    return sweep.TrialResult(
        trial(number, **values), f"run{number}", metrics, f"models:/m-{number}", training_minutes=minutes,
        validation_elbo_nats=validation,
    )


def failed(number, error="NonFiniteLossError: non-finite loss (nan) at epoch 1, step 2", run_id="auto", **values):
    return sweep.TrialResult(trial(number, **values), f"run{number}" if run_id == "auto" else run_id, error=error)


# --- the grid on the command line ------------------------------------------------------------------------------------


def test_grid_values_are_split_at_commas_and_read_as_json_when_they_parse():
    grid = sweep.parse_grid(["model.latent_dim=2,10,20", "model.architecture=mlp, conv", "train.learning_rate=1e-3,3e-3"])
    assert grid == {"model.latent_dim": [2, 10, 20], "model.architecture": ["mlp", "conv"], "train.learning_rate": [0.001, 0.003]}


def test_list_values_are_written_as_json_lists_separated_by_commas():
    assert sweep.parse_grid(["model.hidden_dims=[400],[512,256]"]) == {"model.hidden_dims": [[400], [512, 256]]}


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (["model.latent_dim"], "--grid 'model.latent_dim' is not of the form section.field=value1,value2,..."),
        (["model.latent_dim="], "--grid 'model.latent_dim=' is not of the form section.field=value1,value2,..."),
        (["model.latent_dim=2,,3"], "--grid 'model.latent_dim=2,,3': a value is empty (values are separated by single commas)"),
        (["model.latent_dim=2", "model.latent_dim=3"], "model.latent_dim is swept twice: give all its values in one --grid"),
    ],
)
def test_a_malformed_grid_is_refused_saying_what_is_wrong(texts, message):
    with pytest.raises(ConfigError) as error:
        sweep.parse_grid(texts)
    assert str(error.value) == message


# --- trials ------------------------------------------------------------------------------------------------------------


def test_a_grid_gives_every_combination_with_the_first_field_varying_slowest():
    trials = sweep.trials(BASE, {"model.latent_dim": [2, 10], "objective.beta": [0.5, 1.0, 2.0]})
    assert [(t.number, t.values) for t in trials] == [
        (1, {"model.latent_dim": 2, "objective.beta": 0.5}),
        (2, {"model.latent_dim": 2, "objective.beta": 1.0}),
        (3, {"model.latent_dim": 2, "objective.beta": 2.0}),
        (4, {"model.latent_dim": 10, "objective.beta": 0.5}),
        (5, {"model.latent_dim": 10, "objective.beta": 1.0}),
        (6, {"model.latent_dim": 10, "objective.beta": 2.0}),
    ]
    assert [(t.config.model.latent_dim, t.config.objective.beta) for t in trials] == [(2, 0.5), (2, 1.0), (2, 2.0), (10, 0.5), (10, 1.0), (10, 2.0)]
    assert trials[0].config == load_config("default", {"train.epochs": 1, "model.latent_dim": 2, "objective.beta": 0.5})
    assert trials[3].describe() == "model.latent_dim=10, objective.beta=0.5"


def test_list_values_become_the_config_fields_they_set():
    (first, second) = sweep.trials(BASE, {"model.hidden_dims": [[400], [512, 256]]})
    assert (first.config.model.hidden_dims, second.config.model.hidden_dims) == ((400,), (512, 256))


def test_a_random_sample_is_distinct_combinations_of_the_grid_in_grid_order_and_the_seed_repeats_it():
    grid = {"model.latent_dim": [2, 10, 20], "objective.beta": [0.5, 1.0], "train.learning_rate": [1e-3, 3e-3]}
    every = [t.values for t in sweep.trials(BASE, grid)]
    drawn = [t.values for t in sweep.trials(BASE, grid, samples=4, seed=7)]
    assert [t.number for t in sweep.trials(BASE, grid, samples=4, seed=7)] == [1, 2, 3, 4]
    assert len(drawn) == 4
    assert all(values in every for values in drawn)
    assert sorted(every.index(values) for values in drawn) == [every.index(values) for values in drawn]
    assert [t.values for t in sweep.trials(BASE, grid, samples=4, seed=7)] == drawn
    assert len({str([t.values for t in sweep.trials(BASE, grid, samples=4, seed=seed)]) for seed in range(5)}) > 1
    assert [t.values for t in sweep.trials(BASE, grid, samples=12, seed=7)] == every


@pytest.mark.parametrize("samples", [0, 5])
def test_a_sample_size_outside_the_grid_is_refused(samples):
    with pytest.raises(ConfigError, match=f"samples must be between 1 and the grid's 4 combinations, got {samples}"):
        sweep.trials(BASE, {"model.latent_dim": [2, 10], "objective.beta": [0.5, 1.0]}, samples=samples)


def test_a_bad_value_fails_the_whole_sweep_naming_the_trial_and_the_field():
    with pytest.raises(ConfigError) as error:
        sweep.trials(BASE, {"objective.beta": [1.0], "model.latent_dim": [2, -1, 10]})
    assert str(error.value) == (
        "trial 2 of 3 (objective.beta=1.0, model.latent_dim=-1): invalid config:\n"
        "  model.latent_dim: Input should be greater than 0 (got -1)"
    )


def test_an_unknown_field_fails_the_sweep_naming_it():
    with pytest.raises(ConfigError, match="model.latent: Extra inputs are not permitted"):
        sweep.trials(BASE, {"model.latent": [2, 10]})


def test_a_combination_that_breaks_a_rule_across_fields_fails_the_sweep():
    with pytest.raises(ConfigError, match=r"trial 2 of 2 \(data.validation_size=0\): invalid config:\n  config: Value error, "
                       "train.early_stopping_patience needs a validation set"):
        sweep.trials(BASE, {"data.validation_size": [100, 0]})


@pytest.mark.parametrize("field", ["data.dataset", "data.binarization", "objective.likelihood", "eval.iwae_samples", "data"])
def test_fields_that_decide_what_the_test_score_measures_cannot_be_swept(field):
    with pytest.raises(ConfigError) as error:
        sweep.trials(BASE, {field: ["a", "b"]})
    assert str(error.value) == (
        f"{field} cannot be swept: the trials' test scores compare only when they are measured alike, and it decides "
        "what they measure (pipeline.config.SCORE_FIELDS): set it for the whole sweep with --set"
    )


@pytest.mark.parametrize(
    ("field", "reason"),
    [
        ("registry.enabled", "only the best trial is registered: set registry.* for the whole sweep with --set"),
        ("preset", "the preset is the base config: set it with --preset"),
    ],
)
def test_the_sweeps_own_settings_cannot_be_swept(field, reason):
    with pytest.raises(ConfigError) as error:
        sweep.trials(BASE, {field: ["a", "b"]})
    assert str(error.value) == f"{field} cannot be swept: {reason}"


def test_an_empty_grid_a_field_without_values_and_a_repeated_value_are_refused():
    with pytest.raises(ConfigError, match="a sweep needs at least one swept field"):
        sweep.trials(BASE, {})
    with pytest.raises(ConfigError, match=r"model.latent_dim: a swept field needs a non-empty list of values, got \[\]"):
        sweep.trials(BASE, {"model.latent_dim": []})
    with pytest.raises(ConfigError, match=r"model.hidden_dims: the value \[400\] is listed twice"):
        sweep.trials(BASE, {"model.hidden_dims": [[400], [64], [400]]})


# --- the leaderboard ---------------------------------------------------------------------------------------------------


def test_the_leaderboard_ranks_by_nll_lowest_first_with_failed_trials_last_in_trial_order():
    results = [
        failed(1, model__latent_dim=2),
        finished(2, -110.0, 104.0, model__latent_dim=10),
        failed(3, error="RuntimeError: boom", run_id=None, model__latent_dim=20),
        finished(4, -100.0, 106.0, model__latent_dim=50),
        finished(5, -120.0, 101.5, model__latent_dim=100),
    ]
    board = sweep.leaderboard(results)
    assert list(board.columns) == ["trial", "run_id", "status", "model.latent_dim", "test_elbo_nats", "test_nll_nats", "error"]
    assert board["trial"].tolist() == [5, 2, 4, 1, 3]
    assert board["status"].tolist() == ["finished", "finished", "finished", "failed", "failed"]
    assert board["run_id"].fillna("").tolist() == ["run5", "run2", "run4", "run1", ""]
    assert board["model.latent_dim"].tolist() == [100, 10, 50, 2, 20]
    assert board["test_nll_nats"].tolist()[:3] == [101.5, 104.0, 106.0]
    assert board["test_elbo_nats"].tolist()[:3] == [-120.0, -110.0, -100.0]
    assert board[["test_elbo_nats", "test_nll_nats"]].iloc[3:].isna().all().all()
    assert board["error"].fillna("").tolist() == ["", "", "", "NonFiniteLossError: non-finite loss (nan) at epoch 1, step 2", "RuntimeError: boom"]
    assert sweep.best(results) is results[4]


def test_with_a_validation_elbo_for_every_finished_trial_the_leaderboard_ranks_by_it_whatever_the_test_scores_say():
    results = [
        finished(1, -100.0, 95.0, validation=-104.0, model__latent_dim=2),
        failed(2, model__latent_dim=10),
        finished(3, -110.0, 104.0, validation=-101.5, model__latent_dim=20),
        finished(4, -105.0, 99.0, validation=-103.0, model__latent_dim=50),
    ]
    board = sweep.leaderboard(results)
    assert list(board.columns) == ["trial", "run_id", "status", "model.latent_dim", "val_elbo_nats", "test_elbo_nats", "test_nll_nats", "error"]
    assert board["trial"].tolist() == [3, 4, 1, 2]
    assert board["val_elbo_nats"].tolist()[:3] == [-101.5, -103.0, -104.0] and math.isnan(board.at[3, "val_elbo_nats"])
    assert board["test_nll_nats"].tolist()[:3] == [104.0, 99.0, 95.0]
    assert sweep.best(results) is results[2]


def test_when_a_finished_trial_has_no_finite_validation_elbo_the_leaderboard_ranks_by_the_test_metric():
    for missing in (None, math.nan):
        results = [finished(1, -100.0, 99.0, validation=-101.0, objective__beta=0.5), finished(2, -95.0, 97.0, validation=missing, objective__beta=1.0)]
        assert sweep.leaderboard(results)["trial"].tolist() == [2, 1]
        assert sweep.best(results) is results[1]


def test_without_an_nll_the_leaderboard_ranks_by_elbo_highest_first_and_has_no_nll_column():
    results = [finished(1, -120.0, objective__beta=0.5), finished(2, -95.5, objective__beta=1.0), finished(3, -101.0, objective__beta=2.0)]
    board = sweep.leaderboard(results)
    assert list(board.columns) == ["trial", "run_id", "status", "objective.beta", "test_elbo_nats", "error"]
    assert board["trial"].tolist() == [2, 3, 1]
    assert board["test_elbo_nats"].tolist() == [-95.5, -101.0, -120.0]
    assert sweep.best(results) is results[1]


def test_the_leaderboard_shows_each_trials_training_minutes_when_trials_report_them():
    results = [finished(1, -110.0, 104.0, 12.5, objective__samples=1), finished(2, -100.0, 99.0, 30.25, objective__samples=5), failed(3, objective__samples=50)]
    board = sweep.leaderboard(results)
    assert list(board.columns) == ["trial", "run_id", "status", "objective.samples", "test_elbo_nats", "test_nll_nats", "training_minutes", "error"]
    assert board["training_minutes"].tolist()[:2] == [30.25, 12.5] and math.isnan(board.at[2, "training_minutes"])


def test_equal_scores_keep_trial_order():
    results = [finished(1, -100.0, 100.0, objective__beta=0.5), finished(2, -90.0, 99.0, objective__beta=1.0), finished(3, -95.0, 100.0, objective__beta=2.0)]
    assert sweep.leaderboard(results)["trial"].tolist() == [2, 1, 3]


def test_when_every_trial_failed_the_leaderboard_lists_them_in_trial_order_and_there_is_no_best():
    results = [failed(2, model__latent_dim=10), failed(1, model__latent_dim=2)]
    board = sweep.leaderboard(results)
    assert list(board.columns) == ["trial", "run_id", "status", "model.latent_dim", "test_elbo_nats", "error"]
    assert board["trial"].tolist() == [1, 2]
    assert board["status"].tolist() == ["failed", "failed"]
    assert all(math.isnan(value) for value in board["test_elbo_nats"])
    assert sweep.best(results) is None


def test_the_leaderboard_reads_back_from_csv_as_it_was_written(tmp_path):
    results = [finished(1, -110.0, 104.0, model__hidden_dims=[64, 32]), failed(2, model__hidden_dims=[400])]
    path = tmp_path / "leaderboard.csv"
    sweep.leaderboard(results).to_csv(path, index=False)
    back = pd.read_csv(path)
    assert back["trial"].tolist() == [1, 2]
    assert back["model.hidden_dims"].tolist() == ["[64, 32]", "[400]"]
    assert back["test_nll_nats"].tolist()[0] == 104.0 and math.isnan(back["test_nll_nats"].tolist()[1])
