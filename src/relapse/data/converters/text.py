"""Your own files (plain text, JSON or JSONL; named by split or given one by one) as a benchmark."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from relapse.data.benchmark import (
    FORGET_QA,
    HOLDOUT_QA,
    ICL,
    PLAIN_TEXT_SPLITS,
    RETAIN_QA,
    VERBMEM,
    Benchmark,
)
from relapse.data.converters.common import (
    FORMAT,
    JSON_EXTS,
    TEXT_SOURCE_SPLITS,
    PathsArg,
    empty_split_notes,
    find_file,
    finish,
    read_records,
    read_text,
    require_folder,
    split_documents,
    split_items,
    texts_of,
)
from relapse.errors import ConfigError, DataError

__all__ = ["FOLDER_SPLITS", "TEXT_FORMATS", "from_text", "from_text_folder"]

TEXT_FORMATS = ("auto", "text", "jsonl")


def _paths(value: PathsArg) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, str | os.PathLike):
        return [Path(value)]
    return [Path(v) for v in value]


def _text_file(path: Path, text_format: str, field: str, one_per_line: bool) -> list[str]:
    kind = text_format
    if kind == "auto":
        kind = "jsonl" if path.suffix.lower() in JSON_EXTS else "text"
    if kind == "jsonl":
        return texts_of(read_records(path), field)
    return split_documents(read_text(path), one_per_line)


def from_text(
    forget: PathsArg,
    retain: PathsArg = None,
    holdout: PathsArg = None,
    *,
    general: PathsArg = None,
    forget_qa: PathsArg = None,
    retain_qa: PathsArg = None,
    holdout_qa: PathsArg = None,
    icl: PathsArg = None,
    verbmem: PathsArg = None,
    field: str = "text",
    one_per_line: bool = False,
    text_format: str = "auto",
) -> Benchmark:
    """Build a :class:`Benchmark` from your own files; each argument is one path or a list of paths.

    Text files (forget, retain, holdout, general) are plain text, one document per blank-line-separated
    block (or per line with ``one_per_line``), or JSON/JSONL records holding ``field`` (or bare strings).
    ``text_format`` says which: ``"text"``, ``"jsonl"``, or ``"auto"`` by suffix (``.json``/``.jsonl`` are
    JSON). QA files (forget_qa, retain_qa, holdout_qa, icl) hold ``{"question", "answer"}`` and verbmem
    ``{"prompt", "gt"}`` records, as JSONL or a JSON list. Missing retain or holdout give empty splits
    (noted in ``meta``): the format allows them, and only the metrics that need them will complain.
    """
    if text_format not in TEXT_FORMATS:
        raise ConfigError(f"text_format must be one of {', '.join(TEXT_FORMATS)}, got {text_format!r}")
    if not isinstance(field, str) or not field:
        raise ConfigError(f"field must be a non-empty name, got {field!r}")
    sources = {
        "forget": _paths(forget),
        "retain": _paths(retain),
        "holdout": _paths(holdout),
        "general": _paths(general),
        "forget_qa": _paths(forget_qa),
        "retain_qa": _paths(retain_qa),
        "holdout_qa": _paths(holdout_qa),
        "icl": _paths(icl),
        "verbmem": _paths(verbmem),
    }
    if not sources["forget"]:
        raise ConfigError("a forget file is required")
    splits: dict[str, list[Any]] = {}
    for name, paths in sources.items():
        if name in TEXT_SOURCE_SPLITS:
            splits[name] = [t for p in paths for t in _text_file(p, text_format, field, one_per_line)]
        else:
            splits[name] = [item for p in paths for item in split_items(name, read_records(p), field)]
    notes = empty_split_notes(
        "file", has_retain=bool(sources["retain"]), has_holdout=bool(sources["holdout"])
    )
    files = {name: [str(p) for p in paths] for name, paths in sources.items() if paths}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "converted_from": "jsonl" if text_format == "jsonl" else "text",
        "source": str(sources["forget"][0]),
        "text_format": text_format,
        "documents": "one per line" if one_per_line else "blank-line-separated blocks",
        "field": field,
        "files": files,
        "notes": notes,
    }
    benchmark = Benchmark(**splits, meta=meta)
    return finish(benchmark, files)


#: The files :func:`from_text_folder` looks for, by split.
FOLDER_SPLITS = (*PLAIN_TEXT_SPLITS, FORGET_QA, RETAIN_QA, HOLDOUT_QA, ICL, VERBMEM)


def from_text_folder(
    folder: str | os.PathLike[str] | None,
    kind: str,
    *,
    overrides: dict[str, PathsArg] | None = None,
    field: str = "text",
    one_per_line: bool = False,
) -> Benchmark:
    """:func:`from_text` on a folder of files named by split, for ``relapse data convert --from text|jsonl``.

    ``kind="text"`` reads ``forget.txt``, ``retain.txt``, ``holdout.txt``, ``general.txt``; ``"jsonl"``
    reads ``forget.jsonl`` (or ``.json``) and so on. QA files are ``forget_qa.jsonl`` (or ``.json``),
    ``retain_qa``, ``holdout_qa``, ``icl`` and ``verbmem`` in both. ``overrides`` name files explicitly
    (and are the only source when ``folder`` is None).
    """
    if kind not in ("text", "jsonl"):
        raise ConfigError(f"kind must be 'text' or 'jsonl', got {kind!r}")
    chosen: dict[str, PathsArg] = {}
    if folder is not None:
        root = Path(folder)
        require_folder(root, f"--from {kind} source")
        for name in FOLDER_SPLITS:
            is_text = name in TEXT_SOURCE_SPLITS
            exts = (".txt",) if is_text and kind == "text" else (".jsonl", ".json")
            found = find_file(root, name, exts)
            if found is not None:
                chosen[name] = found
        if "forget" not in chosen and not (overrides or {}).get("forget"):
            expected = "forget.txt" if kind == "text" else "forget.jsonl"
            raise DataError(f"{root / expected}: file missing (the forget texts)")
    for name, value in (overrides or {}).items():
        if name not in FOLDER_SPLITS:
            raise ConfigError(f"unknown split {name!r}; choose from {', '.join(FOLDER_SPLITS)}")
        if value:
            chosen[name] = value
    if not chosen.get("forget"):
        raise ConfigError(
            f"--from {kind} needs a source folder holding forget.{'txt' if kind == 'text' else 'jsonl'} "
            "or a --forget file"
        )
    forget_value = chosen.pop("forget")
    benchmark = from_text(forget_value, field=field, one_per_line=one_per_line, text_format=kind, **chosen)
    if folder is not None:
        benchmark.meta["source"] = str(folder)
    return benchmark
