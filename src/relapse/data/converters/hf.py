"""A Hugging Face dataset (hub name, local folder, or ``"json"`` with ``data_files``) as a benchmark.

``datasets`` is imported only when converting, so relapse does not depend on it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from relapse.data.benchmark import Benchmark
from relapse.data.converters.common import FORMAT, empty_split_notes, finish, split_items
from relapse.errors import ConfigError, DataError

__all__ = ["from_hf"]


def _parse_specs(name: str, value: str | Sequence[str] | None) -> list[tuple[str | None, str]]:
    """``[config:]split`` specs, ``+``-joined or as a list, as (config, split) pairs."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    specs: list[tuple[str | None, str]] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(
                f"{name}: a split spec must be a string like 'forget' or 'raw:forget', got {item!r}"
            )
        for part in item.split("+"):
            part = part.strip()
            config, _, split = part.rpartition(":")
            if not split or (":" in part and not config) or not re.fullmatch(r"[\w.\-]+", split):
                raise ConfigError(
                    f"{name}: bad split spec {part!r}; use SPLIT or CONFIG:SPLIT, joined by '+'"
                )
            specs.append((config or None, split))
    return specs


def _jsonable(value: Any) -> Any:
    """``value`` as JSON can hold it (paths become strings), for recording ``data_files`` in ``meta``."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def from_hf(
    name: str,
    *,
    forget: str | Sequence[str],
    retain: str | Sequence[str] | None = None,
    holdout: str | Sequence[str] | None = None,
    general: str | Sequence[str] | None = None,
    forget_qa: str | Sequence[str] | None = None,
    retain_qa: str | Sequence[str] | None = None,
    holdout_qa: str | Sequence[str] | None = None,
    icl: str | Sequence[str] | None = None,
    verbmem: str | Sequence[str] | None = None,
    config: str | None = None,
    field: str = "text",
    revision: str | None = None,
    data_files: Any = None,
) -> Benchmark:
    """Build a :class:`Benchmark` from a Hugging Face dataset (hub name, local folder, or ``"json"``).

    Each split argument is a ``[config:]split`` spec (``"forget"``, ``"raw:retain1+raw:retain2"``); the
    config defaults to ``config``. Text splits read ``field`` from each row, QA splits ``question`` and
    ``answer``, verbmem ``prompt`` and ``gt``. ``data_files`` is passed through, so local files work too:
    ``from_hf("json", data_files={"forget": "f.jsonl", "retain": "r.jsonl"}, forget="forget", ...)``.
    ``datasets`` is imported only here, so relapse does not depend on it.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a dataset name is required, got {name!r}")
    if not isinstance(field, str) or not field:
        raise ConfigError(f"field must be a non-empty name, got {field!r}")
    args = {
        "forget": forget,
        "retain": retain,
        "holdout": holdout,
        "general": general,
        "forget_qa": forget_qa,
        "retain_qa": retain_qa,
        "holdout_qa": holdout_qa,
        "icl": icl,
        "verbmem": verbmem,
    }
    specs = {key: _parse_specs(key, value) for key, value in args.items()}
    if not specs["forget"]:
        raise ConfigError("forget: a split spec is required (e.g. 'forget' or 'raw:forget')")
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "--from hf needs the 'datasets' package: pip install datasets "
            "(or save the splits as files and use --from jsonl)"
        ) from None

    # datasets' own errors (a file that cannot be cast, a missing split) derive from DatasetsError only.
    datasets_error = getattr(getattr(datasets, "exceptions", None), "DatasetsError", OSError)
    load_errors = (OSError, ValueError, KeyError, datasets_error)

    def rows(config_name: str | None, split: str) -> list[tuple[str, Any]]:
        label = f"{name}" + (f" ({config_name})" if config_name else "") + f" split {split!r}"
        # Local files named per split are loaded one split at a time: loading them together makes
        # datasets cast every file to one schema, which fails when texts and QA pairs sit side by side.
        own_files = data_files
        if isinstance(data_files, dict) and split in data_files:
            own_files = {split: data_files[split]}
        try:
            data = datasets.load_dataset(
                name, config_name, split=split, revision=revision, data_files=own_files
            )
        except load_errors as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{label}: cannot load ({first})") from None
        return [(f"{label} row {i}", dict(row)) for i, row in enumerate(data, start=1)]

    splits: dict[str, list[Any]] = {}
    files: dict[str, list[str]] = {}
    for key, key_specs in specs.items():
        records = [r for cfg, split in key_specs for r in rows(cfg or config, split)]
        splits[key] = split_items(key, records, field)
        if key_specs:
            files[key] = [
                f"{cfg or config}:{split}" if (cfg or config) else split for cfg, split in key_specs
            ]
    notes = empty_split_notes("split", has_retain=bool(specs["retain"]), has_holdout=bool(specs["holdout"]))
    meta: dict[str, Any] = {
        "format": FORMAT,
        "converted_from": "hf",
        "source": name,
        "revision": revision,
        "data_files": _jsonable(data_files),
        "field": field,
        "files": files,
        "notes": notes,
    }
    benchmark = Benchmark(**splits, meta=meta)
    return finish(benchmark, files)
