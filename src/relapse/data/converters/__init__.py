"""Converters: MUSE, TOFU, your own text/JSONL files and Hugging Face datasets into the one benchmark format.

Every other part of relapse reads only :class:`~relapse.data.benchmark.Benchmark` folders, so published
benchmarks are converted once, here, instead of being special-cased in training, attacks and metrics. Each
source has its own module (:mod:`.muse`, :mod:`.tofu`, :mod:`.text`, :mod:`.hf`); what they share (reading
files, reporting bad records, the final count and validation) is in :mod:`.common`. Each converter records
in ``meta`` where every split came from and every choice it had to make (``notes``), so a converted folder
explains itself. See ``docs/data-format.md`` ("Converting other formats").

Bad input is reported as one :class:`~relapse.errors.DataError` line naming the file (and line or item);
a bad option as a :class:`~relapse.errors.ConfigError`. The result is validated like a loaded folder, so
overlapping forget/retain texts are refused by :meth:`Benchmark.validate`.

The modules import only the standard library, so importing them all here costs nothing noticeable; the
one expensive dependency, ``datasets``, is imported inside :func:`from_hf` when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from relapse.data.benchmark import Benchmark
from relapse.data.converters.common import FORMAT
from relapse.data.converters.hf import from_hf
from relapse.data.converters.muse import from_muse
from relapse.data.converters.text import from_text, from_text_folder
from relapse.data.converters.tofu import from_tofu

__all__ = [
    "FORMAT",
    "SOURCES",
    "Source",
    "from_hf",
    "from_muse",
    "from_text",
    "from_text_folder",
    "from_tofu",
]


@dataclass(frozen=True)
class Source:
    """One layout ``relapse data convert --from NAME`` reads, and the function that converts it."""

    name: str
    convert: Callable[..., Benchmark]
    summary: str


#: The sources, by their ``--from`` name, in the order the CLI lists them.
SOURCES: dict[str, Source] = {
    source.name: source
    for source in (
        Source("muse", from_muse, "a MUSE corpus folder (news or books)"),
        Source("tofu", from_tofu, "a TOFU folder (forgetNN.json, retainNN.json, ...)"),
        Source("text", from_text_folder, "a folder of plain text files named by split"),
        Source("jsonl", from_text_folder, "a folder of JSON/JSONL files named by split"),
        Source("hf", from_hf, "a Hugging Face dataset (hub name, local folder or 'json')"),
    )
}
