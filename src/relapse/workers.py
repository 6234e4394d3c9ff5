"""Independent work in several processes: the audit's models, an experiment's training and unlearning runs.

A tiny model keeps one core busy at one thread, and on a 2-core machine one process with two threads
runs several times slower than two processes with one thread each (see :func:`relapse.runtime.
default_threads`), so the way to use a small machine's cores is processes, not threads. :class:`Workers`
runs tasks in ``jobs`` spawned processes (or in the calling process when ``jobs`` is 1, the same code
path without a pool), hands each task's return value to the caller as it finishes, and relays the events
a task emits while it runs (an audit cell finished), so that the caller alone writes the results file:
one writer, atomic writes, and a killed run resumes from the last event like a single process would.

Each worker sets its torch threads once and, on a machine with several GPUs, takes its own GPU
(``torch.cuda.set_device``), so that ``--device auto`` or ``cuda`` in task *i* means that worker's GPU.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from relapse.errors import ConfigError, RelapseError

#: Seconds between looks at the event queue while tasks run.
_POLL_SECONDS = 0.2


def default_jobs(device: str = "auto") -> int:
    """Processes to use when the user did not say: ``$RELAPSE_JOBS``; else, on the CPU of a machine with
    at most 2 cores (where each process runs one thread), one per core; else 1 (one process with one
    thread per core on a larger CPU, or the one GPU it runs on)."""
    env = os.environ.get("RELAPSE_JOBS")
    if env:
        try:
            return check_jobs(int(env))
        except ValueError:
            raise ConfigError(f"RELAPSE_JOBS must be a whole number, got {env!r}") from None
    import torch

    on_gpu = device != "cpu" and torch.cuda.is_available()
    cores = os.cpu_count() or 1
    return cores if not on_gpu and cores <= 2 else 1


def check_jobs(jobs: int) -> int:
    """``jobs`` if it is a whole number >= 1, else a one-line :class:`ConfigError`."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs must be a whole number >= 1, got {jobs!r}")
    return jobs


@dataclass(frozen=True)
class Task:
    """One call ``function(*arguments, emit=...)``; ``function`` must be importable (a module-level
    function), since a worker process receives it by name. ``emit(event)`` sends a picklable event to the
    caller's ``on_event`` while the task runs."""

    function: Callable[..., Any]
    arguments: tuple[Any, ...] = ()
    inline: bool = False  # quick (a model found in the cache): run in the calling process, start no worker


class Workers:
    """``jobs`` worker processes (spawned, each with ``threads`` torch threads), or the calling process
    itself when ``jobs`` is 1. Use as a context manager; the processes start on the first parallel
    :meth:`run` and serve every later one, so their start-up (importing torch) is paid once."""

    def __init__(self, jobs: int, threads: int | None = None) -> None:
        self.jobs = check_jobs(jobs)
        self.threads = threads
        self._executor: ProcessPoolExecutor | None = None
        self._events: Any = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close(cancel=exc_info[0] is not None)

    def close(self, cancel: bool = False) -> None:
        """Stop the workers; ``cancel`` also ends tasks still running (after an error or an interrupt)."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        if cancel:
            # A worker busy with a long task would otherwise keep the caller waiting for it to finish.
            for process in list(getattr(executor, "_processes", {}).values()):
                process.terminate()
        executor.shutdown(wait=True, cancel_futures=True)

    def _start(self) -> ProcessPoolExecutor:
        if self._executor is None:
            context = multiprocessing.get_context("spawn")  # fork would copy torch's threads and locks
            # A SimpleQueue writes at once (no feeder thread), so a task's events are all readable here
            # before its result is: the caller sees a cell before the task that computed it ends.
            self._events = context.SimpleQueue()
            slots = context.SimpleQueue()
            for slot in range(self.jobs):
                slots.put(slot)
            self._executor = ProcessPoolExecutor(
                max_workers=self.jobs,
                mp_context=context,
                initializer=_start_worker,
                initargs=(self.threads, slots, self._events, _logging_setup()),
            )
        return self._executor

    def run(
        self,
        tasks: Sequence[Task],
        on_result: Callable[[int, Any], None] | None = None,
        on_event: Callable[[Any], None] | None = None,
    ) -> list[Any]:
        """Run ``tasks``; returns their results in order. ``on_result(index, result)`` is called as each
        task finishes (in the order they finish), ``on_event(event)`` for every event a task emits, both
        in the calling process. The first task to fail stops the rest and its error is raised here."""
        results: list[Any] = [None] * len(tasks)
        here = [i for i, task in enumerate(tasks) if task.inline or self.jobs == 1]
        elsewhere = [i for i in range(len(tasks)) if i not in here]
        if len(elsewhere) == 1:  # a pool for one task would only add its start-up
            here, elsewhere = sorted(here + elsewhere), []
        for index in here:
            task = tasks[index]
            results[index] = task.function(*task.arguments, emit=on_event or _ignore)
            if on_result is not None:
                on_result(index, results[index])
        if not elsewhere:
            return results
        executor = self._start()
        pending: dict[Future, int] = {
            executor.submit(_run_task, tasks[index].function, tasks[index].arguments): index
            for index in elsewhere
        }
        try:
            while pending:
                done, _ = wait(pending, timeout=_POLL_SECONDS, return_when=FIRST_COMPLETED)
                self._relay(on_event)
                for future in done:
                    index = pending.pop(future)
                    results[index] = future.result()
                    if on_result is not None:
                        on_result(index, results[index])
        except BrokenProcessPool:
            self.close(cancel=True)
            raise RelapseError(
                "a worker process died (out of memory?); run the command again to resume, or pass --jobs 1"
            ) from None
        except BaseException:
            self._relay(on_event)  # what finished before the failure is kept
            self.close(cancel=True)
            raise
        self._relay(on_event)
        return results

    def _relay(self, on_event: Callable[[Any], None] | None) -> None:
        for event in _drain(self._events):
            if on_event is not None:
                on_event(event)


def _ignore(event: Any) -> None:
    """The ``emit`` of a task whose caller listens to no events."""


def _drain(events: Any) -> Iterator[Any]:
    while events is not None and not events.empty():
        yield events.get()


#: The event queue of this worker process (set once by :func:`_start_worker`; ``None`` in the caller).
_worker_events: Any = None


def _logging_setup() -> tuple[int, str | None, int | None]:
    """The caller's logging (root level and format, transformers' verbosity), for its workers to copy:
    a spawned process starts with Python's defaults, and its warnings would read differently."""
    import logging
    import sys

    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.formatter is not None), None)
    fmt = handler.formatter._fmt if handler is not None else None  # the format string it was given
    verbosity = None
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
    return root.level, fmt, verbosity


def _start_worker(threads: int | None, slots: Any, events: Any, logging_setup: tuple) -> None:
    """Each worker's set-up: its torch threads, its GPU where there are several, its event queue, and
    the caller's logging."""
    global _worker_events
    import logging

    import torch

    from relapse.runtime import set_threads

    level, fmt, verbosity = logging_setup
    if fmt is not None:
        logging.basicConfig(level=level, format=fmt)
    if verbosity is not None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(verbosity)
        hf_logging.disable_progress_bar()
    _worker_events = events
    _exit_with_parent()
    set_threads(threads)
    slot = slots.get()
    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(slot % torch.cuda.device_count())


#: How often a worker checks that the process that started it is still alive, in seconds.
_PARENT_CHECK_SECONDS = 1.0


def _exit_with_parent() -> None:
    """End this worker when the process that started it dies. A caller killed outright (SIGKILL, or a
    SIGTERM, whose default action skips Python's clean-up) cannot stop its workers, and a worker would
    otherwise finish its task alone, burning CPU and writing to the cache for a run nobody waits for.
    An orphan is adopted by another process, so its parent id changes: a daemon thread watches it."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_CHECK_SECONDS)
        os._exit(1)  # no clean-up to run: the task's outputs are written atomically or not at all

    threading.Thread(target=watch, name="relapse-parent-watch", daemon=True).start()


def _run_task(function: Callable[..., Any], arguments: tuple[Any, ...]) -> Any:
    return function(*arguments, emit=_worker_events.put)


@contextmanager
def workers(jobs: int | None, threads: int | None = None, device: str = "auto") -> Iterator[Workers]:
    """A :class:`Workers` for ``jobs`` processes (``None``: :func:`default_jobs` for ``device``)."""
    pool = Workers(default_jobs(device) if jobs is None else jobs, threads)
    with pool:
        yield pool
