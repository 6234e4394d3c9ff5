"""Run-time plumbing shared by every command: seeds, threads, devices, versions, hashing, atomic writes,
the cache.

These are small pure helpers; nothing here keeps global state beyond what torch itself keeps.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relapse.errors import ConfigError

#: Packages whose versions are recorded in every result file.
RECORDED_PACKAGES = ("relapse", "torch", "transformers", "tokenizers", "safetensors", "numpy")


#: What ``--device`` accepts (besides ``cuda:N``).
DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RunContext:
    """How a command runs, as opposed to what it computes: none of these enter a cache key or change a
    number, so they travel together through every entry point (train, unlearn, attack, fetch, eval,
    audit, experiment, demo) instead of as five loose arguments.

    Attributes:
        threads: torch's intra-op threads (``None``: :func:`default_threads`).
        progress: show progress bars (on a terminal).
        overwrite: replace a different result already at the output path; without it, refuse.
        log: where the audit, the experiment and the demo write their lines (``None``: nowhere).
        device: ``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``; ``None`` means
            ``auto``, except that an experiment then keeps its file's ``device`` (an audit's device is
            ``AuditConfig.device``, part of what it sweeps).
    """

    threads: int | None = None
    progress: bool = True
    overwrite: bool = False
    log: Callable[[str], object] | None = print
    device: str | None = None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that a run is repeatable on the same machine and versions.

    ``torch.manual_seed`` seeds the generators of every device, CUDA's included (lazily, so it is safe
    on machines without a GPU). relapse draws its own random numbers (initial weights, batch order,
    attack noise) from CPU generators, so they are the same whichever device the model is on.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def check_device_name(name: str | None) -> str:
    """``name`` normalised (``None`` means ``"auto"``), or a one-line :class:`ConfigError` if it is not
    ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. Checks the spelling only, not that the device exists, so
    that an experiment file written for a GPU machine can be read (and validated) anywhere."""
    text = "auto" if name is None else str(name).strip().lower()
    if text in DEVICE_CHOICES:
        return text
    kind, _, index = text.partition(":")
    if kind == "cuda" and index.isdigit():
        return f"cuda:{int(index)}"
    raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")


def resolve_device(name: str | None = "auto") -> torch.device:
    """The torch device to run on: ``auto`` (or ``None``) is the GPU when torch sees one, else the CPU.

    ``cuda`` without an index means the current GPU, or this process's GPU (``LOCAL_RANK``) under a
    data-parallel launcher, so that every process of a group gets its own; the result always carries an
    index (``cuda:0``), so that it compares equal to the device parameters report. Asking for a GPU
    that torch cannot see raises a one-line :class:`ConfigError` instead of failing deep inside torch.
    """
    text = check_device_name(name)
    if text == "cpu" or (text == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", built without CUDA")
        raise ConfigError(f"device {text}: CUDA is not available ({build}); use --device cpu or auto")
    count = torch.cuda.device_count()
    if text in ("auto", "cuda"):
        local_rank = os.environ.get("LOCAL_RANK")
        in_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and local_rank is not None
        index = int(local_rank) % count if in_group else torch.cuda.current_device()
    else:
        index = int(text.partition(":")[2])
        if index >= count:
            raise ConfigError(f"device {text}: this machine has {count} CUDA device(s), cuda:0..{count - 1}")
    return torch.device("cuda", index)


def default_threads() -> int:
    """Threads to use when the user did not say: ``$RELAPSE_THREADS``, else 1 on machines with at most 2
    cores, else torch's own default (one per physical core).

    On the 2-core development machines a single idle process trained a tiny model about 1.9x faster with
    2 threads than with 1, but as soon as a second busy process shared the cores, 2 threads ran several
    times slower than 1 (oversubscription). One thread is the choice that never collapses there;
    ``benchmarks/threads.py`` measures both on the machine at hand.
    """
    env = os.environ.get("RELAPSE_THREADS")
    if env:
        try:
            return int(env)
        except ValueError:
            raise ConfigError(f"RELAPSE_THREADS must be a whole number, got {env!r}") from None
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else torch.get_num_threads()


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (``None``: :func:`default_threads`) and return the count in force."""
    if threads is None:
        threads = default_threads()
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def package_versions(names: Iterable[str] = RECORDED_PACKAGES) -> dict[str, str]:
    """Versions of the packages that determine a result, plus Python's, for provenance records."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def stable_hash(obj: Any) -> str:
    """A short SHA-256 of a JSON-serialisable object, independent of dict order."""
    payload = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def hash_files(paths: Iterable[Path]) -> str:
    """SHA-256 over the names and bytes of files, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a torn one.

    The file gets the permissions a plain ``open`` would give it (0666 less the umask), not the
    owner-only mode of the temporary file, so that reports can be served or shared.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory ``src`` into place at ``dst``, replacing what is there.

    Directory renames are atomic only onto a missing target, so an existing ``dst`` is first moved aside
    and removed after the rename; a crash in between leaves either the old or the new directory intact.
    """
    src, dst = Path(src), Path(dst)
    aside = None
    if dst.exists():
        aside = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, aside)
    os.replace(src, dst)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


#: The errors of a full disk, a read-only or immutable place, or missing permissions: the user's
#: environment, said in one line by the CLI rather than as a traceback.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def check_writable(path: str | Path, what: str) -> None:
    """Fail at once, with one line, when ``path`` (or the nearest existing folder above it, where it would
    be made) cannot be written: a run should not train for an hour and then fail to save. Probes by
    creating and removing a file, which also catches read-only and immutable file systems and root."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        if existing == path:
            return  # an existing file: whoever writes it says what is wrong with it
        raise ConfigError(f"cannot write {what} {path}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".relapse-write-check-")
    except OSError as exc:
        raise ConfigError(f"cannot write {what} {path}: {exc.strerror} ({existing})") from None
    os.close(fd)
    os.unlink(probe)


def cache_dir() -> Path:
    """Where trained models and generated data are cached: ``$RELAPSE_CACHE`` or ``~/.cache/relapse``."""
    env = os.environ.get("RELAPSE_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "relapse"
    return root.expanduser()


def cached_json(kind: str, key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()``, kept in the cache under ``kind`` by a hash of ``key`` (JSON), so that a value many
    runs need (a starting model's metrics) is computed once. An unreadable entry is computed again."""
    path = cache_dir() / kind / f"{stable_hash(key)}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            pass
    value = compute()
    atomic_write_json(path, value)
    return value


LOCK_NAME = ".relapse.lock"


@contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold ``folder`` for one run of ``what`` (an audit): a second run into it while the first is alive
    is refused, naming the first. A lock left by a process that no longer exists is taken over."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    mine = json.dumps({"pid": os.getpid(), "what": what, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None and holder.get("pid") != os.getpid() and _alive(holder.get("pid")):
                raise ConfigError(
                    f"another {holder.get('what', 'run')} is running in {folder} (pid {holder['pid']}, "
                    f"started {holder.get('started', '?')}); wait for it or choose another --out"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(mine)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
