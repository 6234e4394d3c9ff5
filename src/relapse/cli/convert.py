"""``relapse data convert``: MUSE, TOFU, text/JSONL files or a Hugging Face dataset into a benchmark folder.

Its options are the adapters' arguments, which are not one config dataclass (each source takes its own),
so they are plain argparse, with a check that no option is given to a source it does not apply to. Like
every relapse command, bad input ends in one ``DataError`` or ``ConfigError`` line (printed by
``relapse.cli.main``), and a folder holding something else is never overwritten without ``--overwrite``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from relapse.cli.common import add_overwrite
from relapse.errors import ConfigError

if TYPE_CHECKING:
    from relapse.data.benchmark import Benchmark

SOURCES = ("muse", "tofu", "text", "jsonl", "hf")

#: Split options shared by --from text, jsonl (file paths) and hf (split specs), by adapter argument name.
SPLIT_OPTIONS = {
    "forget": "--forget",
    "retain": "--retain",
    "holdout": "--holdout",
    "general": "--general",
    "forget_qa": "--forget-qa",
    "retain_qa": "--retain-qa",
    "holdout_qa": "--holdout-qa",
    "icl": "--icl",
    "verbmem": "--verbmem",
}

#: The files :meth:`Benchmark.save` writes only when not empty (besides the utility QA sets).
OPTIONAL_FILES = ("verbmem.jsonl", "mia_forget.jsonl", "mia_holdout.jsonl")

#: Which --from values each source-specific option applies to (an option given elsewhere is an error,
#: because silently ignoring it would convert something other than what the user asked for).
APPLIES_TO = {
    "fold": ("muse",),
    "corpus": ("muse",),
    "forget_split": ("tofu",),
    "field": ("jsonl", "hf"),
    "one_per_line": ("text",),
    "config": ("hf",),
    "revision": ("hf",),
    **{name: ("text", "jsonl", "hf") for name in SPLIT_OPTIONS},
}


HELP = "convert MUSE, TOFU, text/JSONL files or a Hugging Face dataset into a benchmark folder"


def add(data_subparsers) -> None:
    """Add ``convert`` to the ``relapse data`` subcommands; its ``func`` returns the exit status."""
    p = data_subparsers.add_parser(
        "convert",
        help=HELP,
        description="Write a benchmark folder in relapse's format (docs/data-format.md) from another layout. "
        "meta.json records where every split came from and each choice the conversion made.",
    )
    p.add_argument(
        "--from",
        dest="source_format",
        required=True,
        choices=SOURCES,
        help="the source layout: a MUSE corpus folder (news or books), a TOFU folder, a folder of text or "
        "JSONL files named by split, or a Hugging Face dataset name",
    )
    p.add_argument(
        "source",
        nargs="?",
        metavar="SRC",
        help="the source folder (muse, tofu; optional for text/jsonl when --forget is given) or dataset (hf)",
    )
    p.add_argument("--out", required=True, type=Path, help="folder to write the benchmark to")
    muse = p.add_argument_group("--from muse")
    muse.add_argument("--fold", help="scal/forget_N or sust/forget_N: these texts replace the forget texts")
    muse.add_argument(
        "--corpus", choices=("news", "books"), help="recorded in meta (default: the folder name)"
    )
    tofu = p.add_argument_group("--from tofu")
    tofu.add_argument("--forget-split", help="forget01, forget05 or forget10 (default forget10)")
    own = p.add_argument_group(
        "--from text, jsonl, hf",
        "For text/jsonl a FILE overrides the file found in SRC (repeat to concatenate); for hf a split spec "
        "[CONFIG:]SPLIT (join several with '+').",
    )
    for name, flag in SPLIT_OPTIONS.items():
        own.add_argument(flag, dest=name, action="append", metavar="FILE|SPEC", help=f"the {name} split")
    own.add_argument("--field", help="the text field of JSON/JSONL records and dataset rows (default: text)")
    own.add_argument(
        "--one-per-line", action="store_true", default=None, help="text: one document per line, not per block"
    )
    own.add_argument("--config", help="hf: the dataset configuration for specs without CONFIG:")
    own.add_argument("--revision", help="hf: the dataset revision (a commit, tag or branch)")
    add_overwrite(p, "a different benchmark already in --out")
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> int:
    """Convert, then write unless ``--out`` already holds exactly this benchmark."""
    _check_options(args)
    benchmark = convert_from_args(args)
    written = write_benchmark(benchmark, args.out, overwrite=args.overwrite)
    if not written:
        print(f"{args.out} already holds this benchmark (same source and options); nothing to do")
        return 0
    c = benchmark.meta["counts"]
    mia = f", {c['mia_forget']} mia_forget, {c['mia_holdout']} mia_holdout" if _has_mia(c) else ""
    print(
        f"wrote {args.out}: {c['forget']} forget, {c['retain']} retain, {c['holdout']} holdout texts; "
        f"{c['forget_qa']} forget and {c['retain_qa']} retain QA pairs; {c['icl']} icl, "
        f"{c['verbmem']} verbmem, {c['general']} general{mia} "
        f"(from {args.source_format} {benchmark.meta['source']})"
    )
    for note in benchmark.meta.get("notes", []):
        print(f"note: {note}")
    return 0


def _has_mia(counts: dict[str, int]) -> bool:
    return bool(counts.get("mia_forget") or counts.get("mia_holdout"))


def _check_options(args: argparse.Namespace) -> None:
    for name, sources in APPLIES_TO.items():
        if getattr(args, name, None) is not None and args.source_format not in sources:
            flag = SPLIT_OPTIONS.get(name, "--" + name.replace("_", "-"))
            raise ConfigError(
                f"{flag} applies to --from {' or '.join(sources)} only, not --from {args.source_format}"
            )
    if args.source_format in ("muse", "tofu", "hf") and not args.source:
        what = "dataset name" if args.source_format == "hf" else f"{args.source_format.upper()} folder"
        raise ConfigError(f"--from {args.source_format} needs SRC, the {what}")


def convert_from_args(args: argparse.Namespace) -> Benchmark:
    """The :class:`Benchmark` the parsed ``convert`` options describe (not yet written)."""
    from relapse.data.converters import from_hf, from_muse, from_text_folder, from_tofu

    fmt = args.source_format
    if fmt == "muse":
        return from_muse(args.source, args.fold, corpus=args.corpus)
    if fmt == "tofu":
        return from_tofu(args.source, args.forget_split or "forget10")
    splits = {name: getattr(args, name) for name in SPLIT_OPTIONS if getattr(args, name)}
    if fmt == "hf":
        if "forget" not in splits:
            raise ConfigError("--from hf needs --forget SPEC (a split such as forget or raw:forget)")
        return from_hf(
            args.source, config=args.config, field=args.field or "text", revision=args.revision, **splits
        )
    return from_text_folder(
        args.source,
        fmt,
        overrides=splits,
        field=args.field or "text",
        one_per_line=bool(args.one_per_line),
    )


def write_benchmark(benchmark: Benchmark, out: Path, *, overwrite: bool) -> bool:
    """Save ``benchmark`` to ``out``; False (and nothing written) when ``out`` already holds it exactly.

    A non-empty ``out`` holding anything else is refused without ``overwrite``. With it, a stale
    ``verbmem.jsonl``, ``mia_forget.jsonl``, ``mia_holdout.jsonl`` or ``utility_<name>_qa.jsonl`` (the
    files :meth:`Benchmark.save` writes only sometimes) is removed, so the new folder does not silently
    keep the old benchmark's.
    """
    from relapse.data.benchmark import utility_qa_files

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    written = benchmark.file_contents()
    stale = [out / name for name in OPTIONAL_FILES if name not in written and (out / name).is_file()]
    stale += [path for path in utility_qa_files(out) if path.name not in written and path.is_file()]
    if out.exists() and any(out.iterdir()):
        if benchmark.is_saved_in(out) and not stale:
            return False
        if not overwrite:
            raise ConfigError(f"{out} is not empty and holds something else; pass --overwrite to replace it")
    benchmark.save(out)
    for path in stale:
        path.unlink()
    return True
