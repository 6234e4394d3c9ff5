"""Several processes: results in order, events relayed before their task's result, errors passed on."""

from __future__ import annotations

import os

import pytest
import torch

from relapse.errors import ConfigError
from relapse.workers import Task, Workers, check_jobs, default_jobs


def where_am_i(value: int, emit) -> dict:
    """A task: the square of ``value``, the process it ran in and its torch threads; emits two events."""
    emit(("started", value))
    emit(("square", value, value * value))
    return {"square": value * value, "pid": os.getpid(), "threads": torch.get_num_threads()}


def fails_on_three(value: int, emit) -> int:
    if value == 3:
        raise ConfigError("three is not allowed")
    return value


def test_one_job_runs_in_the_calling_process_in_order():
    events, done = [], []
    with Workers(1) as pool:
        results = pool.run(
            [Task(where_am_i, (v,)) for v in (2, 3)],
            on_result=lambda i, r: done.append(i),
            on_event=events.append,
        )
    assert [r["square"] for r in results] == [4, 9]
    assert {r["pid"] for r in results} == {os.getpid()}
    assert done == [0, 1]
    assert events == [("started", 2), ("square", 2, 4), ("started", 3), ("square", 3, 9)]


def test_two_jobs_run_in_two_other_processes_and_relay_every_event():
    events, done = [], []
    with Workers(2, threads=1) as pool:
        tasks = [Task(where_am_i, (v,)) for v in range(6)]
        results = pool.run(
            tasks, on_result=lambda i, r: done.append((i, len(events))), on_event=events.append
        )
        again = pool.run([Task(where_am_i, (10,)), Task(where_am_i, (11,))])
    assert [r["square"] for r in results] == [v * v for v in range(6)]  # in the tasks' order
    pids = {r["pid"] for r in results + again}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2  # the same two workers serve both runs
    assert {r["threads"] for r in results} == {1}
    assert sorted(index for index, _ in done) == list(range(6))
    assert sorted(events) == sorted(
        [("started", v) for v in range(6)] + [("square", v, v * v) for v in range(6)]
    )
    for index, seen in done:  # a task's events reach the caller before its result does
        assert ("square", index, index * index) in events[:seen]


def test_inline_tasks_run_here_and_a_single_remaining_task_starts_no_worker():
    with Workers(2, threads=1) as pool:
        mixed = pool.run(
            [Task(where_am_i, (1,), inline=True), Task(where_am_i, (2,)), Task(where_am_i, (3,))]
        )
        assert mixed[0]["pid"] == os.getpid() and {r["pid"] for r in mixed[1:]}.isdisjoint({os.getpid()})
    with Workers(2, threads=1) as pool:
        lone = pool.run([Task(where_am_i, (1,), inline=True), Task(where_am_i, (2,))])
        assert {r["pid"] for r in lone} == {os.getpid()} and pool._executor is None


def test_an_error_in_a_worker_reaches_the_caller_with_its_message():
    with Workers(2, threads=1) as pool, pytest.raises(ConfigError, match="three is not allowed"):
        pool.run([Task(fails_on_three, (v,)) for v in (1, 2, 3, 4)])


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True, "2"])
def test_jobs_must_be_a_whole_number_of_at_least_one(jobs):
    with pytest.raises(ConfigError, match="jobs must be a whole number >= 1"):
        check_jobs(jobs)


def test_default_jobs(monkeypatch):
    monkeypatch.setenv("RELAPSE_JOBS", "3")
    assert default_jobs() == 3
    monkeypatch.setenv("RELAPSE_JOBS", "two")
    with pytest.raises(ConfigError, match="RELAPSE_JOBS must be a whole number"):
        default_jobs()
    monkeypatch.delenv("RELAPSE_JOBS")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert default_jobs("cpu") == 2  # both cores of a small CPU, one thread each
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert default_jobs("cpu") == 1  # a larger CPU: one process, one thread per core
