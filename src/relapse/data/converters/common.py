"""What every converter shares: reading JSON/JSONL/text files into records, and the last step, ``finish``.

The converters (one module per source: :mod:`.muse`, :mod:`.tofu`, :mod:`.text`, :mod:`.hf`) differ in
where each split comes from; how a file is read, how a bad record is reported and how the result is
counted and validated is the same for all of them, so it lives here once. Every error names the file and
the line or item, as one :class:`~relapse.errors.DataError`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relapse.data.benchmark import (
    PLAIN_TEXT_SPLITS,
    SPLITS,
    Benchmark,
    QAPair,
    VerbMemItem,
    qa_variants,
    utility_split,
)
from relapse.errors import DataError

#: ``meta["format"]`` of every converted folder.
FORMAT = "relapse-benchmark"

#: One path or several, as the converters of your own files take them.
PathsArg = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None

JSON_EXTS = (".json", ".jsonl")

#: The splits a converter reads as texts (the others hold QA pairs or VerbMem items).
TEXT_SOURCE_SPLITS = PLAIN_TEXT_SPLITS

#: The order of ``meta["files"]``: the order of the benchmark's own files.
FILE_ORDER = SPLITS

_NOT_JSON = object()


# ------------------------------------------------------------------------------------------ file reading


def read_text(path: Path) -> str:
    """A UTF-8 file's text with ``\\r\\n`` made ``\\n``, or a DataError saying why it cannot be read."""
    if not path.exists():
        raise DataError(f"{path}: file missing")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def read_records(path: Path) -> list[tuple[str, Any]]:
    """The records of a JSON list or a JSONL file, each with where it sits (``FILE item 3``/``line 3``).

    Both shapes are accepted because the sources disagree: MUSE ships JSON lists, TOFU ships JSONL under a
    ``.json`` name, and users write either.
    """
    text = read_text(path)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = _NOT_JSON
    if isinstance(whole, list):
        return [(f"{path} item {i}", value) for i, value in enumerate(whole, start=1)]
    lines = text.split("\n")  # not splitlines(): U+2028 may sit inside a JSON string
    if whole is not _NOT_JSON and not (isinstance(whole, dict) and sum(1 for ln in lines if ln.strip()) == 1):
        raise DataError(
            f"{path}: expected a JSON list of records or one JSON record per line, "
            f"got a single JSON {type(whole).__name__}"
        )
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path} line {lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {lineno}: invalid JSON ({exc.msg})") from None
    return records


def split_documents(text: str, one_per_line: bool) -> list[str]:
    """Documents of a plain text file: blocks between blank lines (MUSE's ``raw/*.txt``), or lines."""
    if one_per_line:
        return [line.strip() for line in text.split("\n") if line.strip()]
    return [block.strip() for block in re.split(r"\n[ \t]*\n", text) if block.strip()]


def string_field(where: str, record: Any, name: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with {name!r}, got {type(record).__name__}")
    if name not in record:
        raise DataError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def texts_of(records: list[tuple[str, Any]], field: str) -> list[str]:
    """Texts from records that are strings or objects holding ``field``; empty texts are refused."""
    texts = []
    for where, record in records:
        if isinstance(record, str):
            if not record.strip():
                raise DataError(f"{where}: empty text")
            texts.append(record)
        elif isinstance(record, dict):
            texts.append(string_field(where, record, field))
        else:
            raise DataError(
                f"{where}: expected a string or an object with {field!r}, got {type(record).__name__}"
            )
    return texts


def qa_of(records: list[tuple[str, Any]]) -> list[QAPair]:
    """QA pairs of records with ``question`` and ``answer``, keeping TOFU's optional
    ``paraphrased_answer`` and ``perturbed_answer`` where a record has them."""
    return [
        QAPair(string_field(w, r, "question"), string_field(w, r, "answer"), *qa_variants(r, w))
        for w, r in records
    ]


def verbmem_of(records: list[tuple[str, Any]]) -> list[VerbMemItem]:
    return [VerbMemItem(string_field(w, r, "prompt"), string_field(w, r, "gt")) for w, r in records]


def find_file(folder: Path, stem: str, exts: Sequence[str]) -> Path | None:
    """The first of ``folder/stem{ext}`` that exists, in the order of ``exts``."""
    for ext in exts:
        path = folder / f"{stem}{ext}"
        if path.exists():
            return path
    return None


def require_folder(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise DataError(f"{path} is a file; give the {what} folder")
    if not path.is_dir():
        raise DataError(f"{what} folder {path} does not exist")


def relative_name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _counts(benchmark: Benchmark) -> dict[str, int]:
    counts = {name: len(getattr(benchmark, name)) for name in SPLITS}
    counts.update(
        {utility_split(name): len(benchmark.utility_qa[name]) for name in sorted(benchmark.utility_qa)}
    )
    return counts


def finish(benchmark: Benchmark, files: dict[str, list[str]]) -> Benchmark:
    """Count, then validate; a validation error also says which source files made the splits it names.

    Validation messages name the output files (``forget.jsonl``), which do not exist yet when converting,
    so the source files behind each split are appended to keep the message actionable.
    """
    order = [*FILE_ORDER, *(utility_split(name) for name in sorted(benchmark.utility_qa))]
    benchmark.meta["files"] = {name: files[name] for name in order if name in files}
    benchmark.meta["counts"] = _counts(benchmark)
    if not benchmark.forget:
        sources = " + ".join(files.get("forget", [])) or "the forget source"
        raise DataError(f"{sources}: no texts (the forget set would be empty)")
    try:
        benchmark.validate()
    except DataError as exc:
        origin = "; ".join(f"{name}.jsonl from {' + '.join(paths)}" for name, paths in files.items() if paths)
        raise DataError(f"{exc} (converted: {origin})") from None
    return benchmark


def split_items(name: str, records: list[tuple[str, Any]], field: str) -> list[Any]:
    """The items of split ``name`` from its records: texts (reading ``field``), VerbMem items or QA pairs."""
    if name in TEXT_SOURCE_SPLITS:
        return texts_of(records, field)
    if name == "verbmem":
        return verbmem_of(records)
    return qa_of(records)


def empty_split_notes(source: str, *, has_retain: bool, has_holdout: bool) -> list[str]:
    """The notes recorded when no retain or holdout ``source`` (``"file"``, ``"split"``) was given.

    Both are allowed, since only the metrics that need them will complain, but a converted folder should
    say why a split is empty.
    """
    notes = []
    if not has_retain:
        notes.append(f"no retain {source}: retain.jsonl is empty")
    if not has_holdout:
        notes.append(
            f"no holdout {source}: holdout.jsonl is empty, so PrivLeak and the membership attacks cannot run"
        )
    return notes
