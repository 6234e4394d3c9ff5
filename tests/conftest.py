"""Shared fixtures: a small benchmark and a tiny model trained on it once per test session.

The suite runs on the CPU even on a machine with a GPU (``--device auto`` would pick the GPU): several
tests check bit-identical results (a resumed run, two processes against one) that hold on the CPU, and
the data-parallel test starts two processes that would share one GPU. ``benchmarks/gpu_check.py`` checks
the GPU. Set ``RELAPSE_TEST_GPU=1`` to run the suite with the GPU visible anyway.
"""

from __future__ import annotations

import os
from pathlib import Path

if not os.environ.get("RELAPSE_TEST_GPU"):
    # Before torch first asks the driver, and inherited by the subprocesses some tests start.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest
import torch

from relapse.data import synth_benchmark
from relapse.runtime import RunContext
from relapse.training.finetune import TrainConfig, train_model

#: A benchmark small enough to memorise in well under a minute on one core.
SMALL = {"people": 20, "facts_per_person": 3, "forget_frac": 0.2, "seed": 7}


def weight_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Euclidean distance between two state dicts with the same keys."""
    return sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5


#: How every refused command starts its one line on stderr (``relapse.cli.main``).
ERROR_PREFIX = "relapse: error: "


def one_error_line(err: str, *must_name: str) -> str:
    """The one line a refused command printed on stderr, checked: one line, ``relapse: error: ...``, no
    traceback, naming each of ``must_name``. Bad input must end this way, never in a stack trace."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got {err!r}"
    assert lines[0].startswith(ERROR_PREFIX), err
    for name in must_name:
        assert name in lines[0], lines[0]
    return lines[0]


def read_error_line(capsys: pytest.CaptureFixture[str], *must_name: str) -> str:
    """:func:`one_error_line` of what the test has printed on stderr since the last read."""
    return one_error_line(capsys.readouterr().err, *must_name)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's cache: every test sees a private RELAPSE_CACHE, one thread and one process
    (the tests of several processes say so)."""
    monkeypatch.setenv("RELAPSE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("RELAPSE_THREADS", "1")
    monkeypatch.setenv("RELAPSE_JOBS", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_benchmark_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "small"
    synth_benchmark(**SMALL).save(path)
    return path


def small_train_config(**overrides) -> TrainConfig:
    settings = {"eval_every": 25, "max_steps": 400, "checkpoint_every": 50, "seed": 1}
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="session")
def trained_small(small_benchmark_dir, tmp_path_factory):
    """The tiny target model trained on the small benchmark (forget + retain), once per session."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("models") / "target"
    return train_model(
        small_benchmark_dir, out, small_train_config(), run=RunContext(threads=1, progress=False)
    )
