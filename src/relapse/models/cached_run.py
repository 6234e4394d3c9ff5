"""Opening a run that writes a model folder: the one recipe behind fine-tuning, unlearning, attacking and
fetching.

Every such run is named by a hash of what determines its result (its key). Before any work it claims its
output folder: a folder already holding this exact run is returned as is (the run is cached), one holding
anything else is refused unless overwriting. Only then does the work start, with torch's threads set and
every generator seeded, and the saved record names the seed, threads, device and package versions it ran
with. :func:`open_cached_run` and :class:`CachedRun` write that recipe once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from relapse.models.io import reuse_or_claim
from relapse.runtime import cache_dir, package_versions, seed_everything, set_threads


@dataclass
class CachedRun:
    """A claimed output folder: where the run writes, its key, and the record already there when the run
    is cached. :meth:`start` begins the work (threads, seed); :meth:`provenance` says what it ran with."""

    out: Path
    key: str
    existing: dict[str, Any] | None
    threads: int | None = None  # torch's threads in force once started

    @property
    def cached(self) -> bool:
        """Whether ``out`` already holds this exact run (``existing`` is its record)."""
        return self.existing is not None

    def start(self, threads: int | None, seed: int | None) -> int:
        """Set torch's threads (``None``: relapse's default) and, when ``seed`` is given, seed every
        generator; return the threads in force. Called once the run knows it has work to do, so that a
        cached run changes nothing."""
        self.threads = set_threads(threads)
        if seed is not None:
            seed_everything(seed)
        return self.threads

    def provenance(self, seed: int, device: torch.device, world_size: int | None = None) -> dict[str, Any]:
        """The record fields that say how the run ran: seed, threads, device, the data-parallel world
        (for runs that train, which a launcher may split) and package versions, in that order."""
        fields: dict[str, Any] = {"seed": seed, "threads": self.threads, "device": str(device)}
        if world_size is not None:
            fields["world_size"] = world_size
        fields["versions"] = package_versions()
        return fields


def open_cached_run(
    out: str | Path | None, key: str, record_name: str, overwrite: bool, cache: str | None = None
) -> CachedRun:
    """Claim the folder a run named ``key`` writes to (``out``, or ``$RELAPSE_CACHE/<cache>/<key>`` when
    ``out`` is None) before any work: see :func:`relapse.models.io.reuse_or_claim`. The run is cached
    when the folder's ``record_name`` already carries ``key``."""
    if out is None and cache is None:
        raise ValueError("open_cached_run needs an output folder or a cache to keep the run in")
    path = Path(out) if out is not None else cache_dir() / str(cache) / key
    return CachedRun(path, key, reuse_or_claim(path, key, record_name, overwrite))
