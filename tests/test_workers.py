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


PARENT = """
import os, sys, time
from relapse.workers import Task, Workers
from tests.test_workers import report_pid_then_wait

with Workers(2, threads=1) as pool:
    pool.run([Task(report_pid_then_wait, (sys.argv[1],)), Task(report_pid_then_wait, (sys.argv[1],))])
"""


def report_pid_then_wait(folder: str, emit) -> None:
    """A task that writes its process id to ``folder`` and then runs far longer than the test waits."""
    import time

    with open(os.path.join(folder, f"{os.getpid()}.pid"), "w") as handle:
        handle.write("started")
    time.sleep(600)


def test_workers_end_when_the_process_that_started_them_is_killed(tmp_path):
    """A caller killed outright (SIGKILL runs no clean-up) leaves its workers orphaned: they must notice
    and end, not finish their tasks alone for a run nobody waits for."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "src")])}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], env=env, cwd=root)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
            assert parent.poll() is None, "the parent ended before its workers started"
            time.sleep(0.2)
        pids = [int(p.stem) for p in tmp_path.glob("*.pid")]
        assert len(pids) == 2
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [pid for pid in pids if _running(pid)]
        assert not alive, f"workers {alive} outlived their parent"
    finally:
        parent.kill()
        for pid in [int(p.stem) for p in tmp_path.glob("*.pid")]:
            if _running(pid):
                os.kill(pid, 9)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
