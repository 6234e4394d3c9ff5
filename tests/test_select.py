"""Utility-preserving selection: the learning-rate sweep keeps the run that forgets with least damage."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

from relapse.errors import ConfigError, DivergenceError
from relapse.methods.select import choose, select_run, utility_check
from relapse.methods.unlearn import UnlearnConfig, UnlearnResult, unlearn_model
from relapse.runtime import RunContext


def _row(lr, reached, forget, retain):
    return {"lr": lr, "reached_target": reached, "final": {"recall_forget": forget, "recall_retain": retain}}


def test_choose_prefers_the_highest_retain_among_runs_that_reached_the_target():
    rows = [_row(1e-3, True, 0.1, 0.5), _row(3e-4, True, 0.3, 0.8), _row(1e-4, False, 0.6, 0.95)]
    assert choose(rows)["lr"] == 3e-4  # 1e-4 keeps more but never forgot


def test_choose_breaks_a_retain_tie_towards_the_larger_rate():
    assert choose([_row(1e-4, True, 0.2, 0.9), _row(3e-4, True, 0.2, 0.9)])["lr"] == 3e-4


def test_choose_without_any_run_reaching_the_target_takes_the_one_that_forgot_most():
    assert choose([_row(1e-3, False, 0.5, 0.4), _row(1e-4, False, 0.7, 0.9)])["lr"] == 1e-3


def test_utility_check_against_the_floor():
    assert utility_check({"recall_retain": 0.9}, {"recall_retain": 0.80}, 0.9)["over_unlearned"] is True
    assert utility_check({"recall_retain": 0.9}, {"recall_retain": 0.81}, 0.9)["over_unlearned"] is False
    assert utility_check({}, {"recall_retain": 0.81}, 0.9)["over_unlearned"] is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"select_lr": []}, "at least one"),
        ({"select_lr": [1e-4, float("nan")]}, "positive, finite"),
        ({"select_lr": [-1e-4]}, "positive, finite"),
        ({"utility_floor": 0.0}, "utility-floor"),
        ({"utility_floor": 1.5}, "utility-floor"),
    ],
)
def test_bad_selection_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        UnlearnConfig(**settings)


def test_selection_key_ignores_lr_and_the_order_of_rates():
    a = UnlearnConfig(select_lr=[1e-4, 3e-4], lr=1e-5)
    b = UnlearnConfig(select_lr=[3e-4, 1e-4, 1e-4])
    assert a.key_fields() == b.key_fields()
    assert a.select_lr == [3e-4, 1e-4]
    # Without a selection, a new option at its default leaves the key as it was before it existed.
    assert "sam_rho" not in UnlearnConfig().key_fields()
    assert UnlearnConfig(sam_rho=0.05).key_fields()["sam_rho"] == 0.05


def test_selection_needs_a_forget_target(trained_small, small_benchmark_dir, tmp_path):
    config = UnlearnConfig(method="ga", select_lr=[1e-4], max_steps=2)
    with pytest.raises(ConfigError, match="forget target"):
        unlearn_model(
            trained_small.path, small_benchmark_dir, tmp_path / "sel", config, run=RunContext(progress=False)
        )


def test_selection_sweeps_records_and_keeps_the_best_run(trained_small, small_benchmark_dir, tmp_path):
    # 3e-3 forgets fast and breaks the retain set; 1e-4 forgets more gently; 1e-6 never reaches the
    # target in 12 steps, so 1e-7 is not run at all.
    config = UnlearnConfig(
        method="ga+gdr",
        select_lr=[1e-7, 3e-3, 1e-4, 1e-6],
        stop_forget_recall=0.5,
        max_steps=12,
        eval_every=3,
        batch_size=8,
        checkpoint_every=1000,
    )
    result = unlearn_model(
        trained_small.path, small_benchmark_dir, tmp_path / "sel", config, run=RunContext(progress=False)
    )
    selection = result.record["selection"]
    rows = {row["lr"]: row for row in selection["candidates"]}
    assert list(rows) == [3e-3, 1e-4, 1e-6, 1e-7]
    assert "skipped" in rows[1e-7] and not rows[1e-6]["reached_target"]
    ran = [rows[lr] for lr in (3e-3, 1e-4, 1e-6)]
    reached = [r for r in ran if r["reached_target"]]
    assert reached, "at least the largest rate reaches the forget target"
    best = max(reached, key=lambda r: (r["final"]["recall_retain"], r["lr"]))
    assert selection["chosen_lr"] == best["lr"] == result.record["config"]["lr"]
    for row in ran:  # each candidate's record is the one its folder holds
        saved = json.loads((Path(row["path"]) / "unlearn.json").read_text())
        assert saved["final"] == row["final"] and saved["config"]["lr"] == row["lr"]
    # The saved model is the chosen candidate's, bit for bit, and its record carries the sweep.
    chosen = load_file(str(Path(rows[best["lr"]]["path"]) / "model.safetensors"))
    saved = load_file(str(result.path / "model.safetensors"))
    assert chosen.keys() == saved.keys() and all((chosen[k] == saved[k]).all() for k in chosen)
    on_disk = json.loads((result.path / "unlearn.json").read_text())
    assert (
        on_disk["selection"]["chosen_lr"] == best["lr"] and on_disk["cache_key"] == result.record["cache_key"]
    )
    assert on_disk["utility"]["floor"] == 0.9
    # A second call reads the result instead of sweeping again.
    again = unlearn_model(
        trained_small.path, small_benchmark_dir, tmp_path / "sel", config, run=RunContext(progress=False)
    )
    assert again.cached and again.record["selection"]["chosen_lr"] == best["lr"]


def test_a_diverging_rate_is_recorded_and_the_next_one_tried(trained_small, tmp_path):
    # select_run with a stand-in for the runs: the largest rate diverges, the next one reaches the target.
    def run_one(config):
        if config.lr == 1e-2:
            raise DivergenceError("unlearn ga diverged: the loss is nan at step 2 of 6")
        record = {
            "steps": 4,
            "stopped_early": True,
            "final": {"recall_forget": 0.2, "recall_retain": 0.9},
            "wall_time_s": 1.0,
            "config": {"lr": config.lr},
        }
        return UnlearnResult(trained_small.path, record, cached=False)

    config = UnlearnConfig(method="ga", select_lr=[1e-2, 1e-4], stop_forget_recall=0.3)
    result = select_run("m", tmp_path, tmp_path / "out", "key", config, run_one)
    rows = result.record["selection"]["candidates"]
    assert rows[0] == {"lr": 1e-2, "diverged": "unlearn ga diverged: the loss is nan at step 2 of 6"}
    assert result.record["selection"]["chosen_lr"] == 1e-4 and rows[1]["reached_target"]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(DivergenceError, match="every learning rate"):
        select_run("m", tmp_path, tmp_path / "out2", "key", replace(config, select_lr=[1e-2]), run_one)
