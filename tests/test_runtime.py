"""Run-time helpers: atomic writes, stable hashes, threads, the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from relapse.errors import ConfigError
from relapse.runtime import (
    atomic_write_json,
    default_threads,
    hash_files,
    replace_dir,
    set_threads,
    stable_hash,
)
from relapse.training.loop import LoopConfig, lr_at


def test_stable_hash_ignores_key_order_but_not_values():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_hash_files_sees_content(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("x")
    first = hash_files([a])
    a.write_text("y")
    assert hash_files([a]) != first


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"v": 1})
    atomic_write_json(tmp_path / "r.json", {"v": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert (tmp_path / "r.json").read_text().strip().endswith("}")


def test_replace_dir(tmp_path):
    old, new = tmp_path / "out", tmp_path / "new"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    replace_dir(new, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in old.iterdir()] == ["b"]


def test_threads(monkeypatch):
    monkeypatch.setenv("RELAPSE_THREADS", "1")
    assert default_threads() == 1
    assert set_threads(None) == 1
    monkeypatch.setenv("RELAPSE_THREADS", "many")
    with pytest.raises(ConfigError):
        default_threads()
    with pytest.raises(ConfigError):
        set_threads(0)
    torch.set_num_threads(1)


def test_learning_rate_schedules():
    config = LoopConfig(lr=1.0, max_steps=110, warmup_steps=10, schedule="cosine")
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(10, config) == pytest.approx(1.0)
    assert lr_at(60, config) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    linear = LoopConfig(lr=2.0, max_steps=100, schedule="linear")
    assert lr_at(50, linear) == pytest.approx(1.0)
    assert lr_at(5, LoopConfig(lr=3.0, max_steps=10)) == 3.0


@pytest.mark.parametrize("bad", [{"lr": 0}, {"max_steps": 0}, {"schedule": "step"}, {"batch_size": 0}])
def test_loop_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        LoopConfig(**bad)
