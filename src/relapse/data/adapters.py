"""Adapters: MUSE, TOFU, plain text/JSONL files and Hugging Face datasets into the one benchmark format.

Every other part of relapse reads only :class:`~relapse.data.benchmark.Benchmark` folders, so published
benchmarks are converted once, here, instead of being special-cased in training, attacks and metrics. Each
adapter records in ``meta`` where every split came from and every choice it had to make (``notes``), so a
converted folder explains itself. See ``docs/data-format.md`` ("Converting other formats").

Bad input is reported as one :class:`~relapse.errors.DataError` line naming the file (and line or item);
a bad option as a :class:`~relapse.errors.ConfigError`. The result is validated like a loaded folder, so
overlapping forget/retain texts are refused by :meth:`Benchmark.validate`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relapse.data.benchmark import (
    FORGET_QA,
    HOLDOUT_QA,
    ICL,
    PLAIN_TEXT_SPLITS,
    RETAIN_QA,
    SPLITS,
    VERBMEM,
    Benchmark,
    QAPair,
    VerbMemItem,
)
from relapse.errors import ConfigError, DataError

__all__ = ["FORMAT", "from_hf", "from_muse", "from_text", "from_text_folder", "from_tofu"]

#: ``meta["format"]`` of every converted folder.
FORMAT = "relapse-benchmark"

PathsArg = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None

MUSE_FOLD_RE = re.compile(r"^(scal|sust)/forget_([1-9][0-9]*)$")
TOFU_FORGET_RE = re.compile(r"^forget([0-9]{2})$")
MUSE_TEXT_EXTS = (".json", ".txt")  # .json first: a list keeps document boundaries exactly
JSON_EXTS = (".json", ".jsonl")
TEXT_FORMATS = ("auto", "text", "jsonl")

#: The order of ``meta["files"]``: the order of the benchmark's own files.
FILE_ORDER = SPLITS

_NOT_JSON = object()


# ------------------------------------------------------------------------------------------ file reading


def _read_text(path: Path) -> str:
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


def _read_records(path: Path) -> list[tuple[str, Any]]:
    """The records of a JSON list or a JSONL file, each with where it sits (``FILE item 3``/``line 3``).

    Both shapes are accepted because the sources disagree: MUSE ships JSON lists, TOFU ships JSONL under a
    ``.json`` name, and users write either.
    """
    text = _read_text(path)
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


def _split_documents(text: str, one_per_line: bool) -> list[str]:
    """Documents of a plain text file: blocks between blank lines (MUSE's ``raw/*.txt``), or lines."""
    if one_per_line:
        return [line.strip() for line in text.split("\n") if line.strip()]
    return [block.strip() for block in re.split(r"\n[ \t]*\n", text) if block.strip()]


def _string_field(where: str, record: Any, name: str) -> str:
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


def _texts_of(records: list[tuple[str, Any]], field: str) -> list[str]:
    """Texts from records that are strings or objects holding ``field``; empty texts are refused."""
    texts = []
    for where, record in records:
        if isinstance(record, str):
            if not record.strip():
                raise DataError(f"{where}: empty text")
            texts.append(record)
        elif isinstance(record, dict):
            texts.append(_string_field(where, record, field))
        else:
            raise DataError(
                f"{where}: expected a string or an object with {field!r}, got {type(record).__name__}"
            )
    return texts


def _qa_of(records: list[tuple[str, Any]]) -> list[QAPair]:
    return [QAPair(_string_field(w, r, "question"), _string_field(w, r, "answer")) for w, r in records]


def _verbmem_of(records: list[tuple[str, Any]]) -> list[VerbMemItem]:
    return [VerbMemItem(_string_field(w, r, "prompt"), _string_field(w, r, "gt")) for w, r in records]


def _find(folder: Path, stem: str, exts: Sequence[str]) -> Path | None:
    """The first of ``folder/stem{ext}`` that exists, in the order of ``exts``."""
    for ext in exts:
        path = folder / f"{stem}{ext}"
        if path.exists():
            return path
    return None


def _require_folder(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise DataError(f"{path} is a file; give the {what} folder")
    if not path.is_dir():
        raise DataError(f"{what} folder {path} does not exist")


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _counts(benchmark: Benchmark) -> dict[str, int]:
    return {name: len(getattr(benchmark, name)) for name in SPLITS}


def _finish(benchmark: Benchmark, files: dict[str, list[str]]) -> Benchmark:
    """Count, then validate; a validation error also says which source files made the splits it names.

    Validation messages name the output files (``forget.jsonl``), which do not exist yet when converting,
    so the source files behind each split are appended to keep the message actionable.
    """
    benchmark.meta["files"] = {name: files[name] for name in FILE_ORDER if name in files}
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


# ------------------------------------------------------------------------------------------------ MUSE


def _muse_texts(path: Path) -> list[str]:
    """A MUSE text file: a JSON list (of strings or ``{"text"}`` objects) or documents between blank lines."""
    if path.suffix == ".txt":
        return _split_documents(_read_text(path), one_per_line=False)
    return _texts_of(_read_records(path), "text")


def from_muse(
    path: str | os.PathLike[str],
    fold: str | None = None,
    *,
    corpus: str | None = None,
) -> Benchmark:
    """Convert one MUSE corpus folder (``news`` or ``books``) into a :class:`Benchmark`.

    Args:
        path: the corpus folder holding ``raw/`` (and ``knowmem/``, ``verbmem/``, ``privleak/``).
        fold: ``scal/forget_N`` or ``sust/forget_N``: these texts replace the forget texts (MUSE's
            scalability and sustainability runs); knowmem, verbmem, icl and the membership lists keep
            referring to the base forget set, as in MUSE's own evaluation of the folds.
        corpus: ``news`` or ``books``, recorded in ``meta`` (default: the folder's name when it is one).

    The forget texts are ``raw/forget`` (MUSE's unlearning data; the fold when given), the holdout texts
    ``raw/holdout`` and the retain texts ``raw/retain1`` + ``raw/retain2`` (or ``raw/retain``). When
    ``privleak/`` exists, its ``forget`` and ``holdout`` lists become ``mia_forget`` and ``mia_holdout``:
    the texts membership inference (PrivLeak, the MIA family) compares, so membership AUCs match MUSE's
    while unlearning uses all of ``raw/forget``. ``privleak/forget`` is a sample of ``raw/forget`` by
    design, so it is not checked for overlap. ``privleak/retain`` is not used. MUSE has no general text and
    two few-shot lists; ``icl`` takes ``knowmem/forget_qa_icl``. No ``knowmem_prompt`` is written: MUSE's
    few-shot prompt is relapse's default.
    """
    root = Path(path)
    _require_folder(root, "MUSE corpus")
    raw = root / "raw"
    if not raw.is_dir():
        raise DataError(
            f"{raw}: folder missing (a MUSE corpus folder holds raw/, knowmem/, verbmem/ and privleak/; "
            "give the news or books folder itself)"
        )
    if corpus is None and root.name.lower() in ("news", "books"):
        corpus = root.name.lower()
    if corpus is not None and corpus not in ("news", "books"):
        raise ConfigError(f"corpus must be 'news' or 'books', got {corpus!r}")

    files: dict[str, list[str]] = {}
    notes: list[str] = []

    def need(folder: Path, stem: str, hint: str) -> Path:
        found = _find(folder, stem, MUSE_TEXT_EXTS)
        if found is None:
            raise DataError(f"{folder / (stem + '.txt')}: file missing (nor {stem}.json); {hint}")
        return found

    # Retain: everything the target model saw and should keep.
    retain_paths = [
        p for p in (_find(raw, "retain1", MUSE_TEXT_EXTS), _find(raw, "retain2", MUSE_TEXT_EXTS)) if p
    ]
    if not retain_paths:
        single = _find(raw, "retain", MUSE_TEXT_EXTS)
        if single is None:
            raise DataError(
                f"{raw}: missing retain1.txt and retain2.txt (or retain.txt); MUSE's retain texts"
            )
        retain_paths = [single]
    elif len(retain_paths) == 1:
        notes.append(f"only {_rel(retain_paths[0], root)} found of raw/retain1 and raw/retain2")
    retain = [t for p in retain_paths for t in _muse_texts(p)]
    files["retain"] = [_rel(p, root) for p in retain_paths]

    # Forget and holdout: MUSE's unlearning data (or a fold), always from raw/.
    if fold is not None:
        match = MUSE_FOLD_RE.match(fold.strip().strip("/"))
        if not match:
            raise ConfigError(f"fold must look like scal/forget_2 or sust/forget_3, got {fold!r}")
        fold = f"{match.group(1)}/forget_{match.group(2)}"
        forget_path = need(root / match.group(1), f"forget_{match.group(2)}", f"MUSE's {match.group(1)} fold")
        notes.append(
            f"forget texts are the fold {fold} (replacing the base forget set); forget_qa, verbmem, icl and "
            "mia_forget still refer to MUSE's base forget set, as in MUSE's own evaluation of the folds"
        )
    else:
        forget_path = need(raw, "forget", "MUSE's forget texts")
    holdout_path = need(raw, "holdout", "MUSE's holdout texts (never trained on)")
    forget = _muse_texts(forget_path)
    holdout = _muse_texts(holdout_path)
    files["forget"] = [_rel(forget_path, root)]
    files["holdout"] = [_rel(holdout_path, root)]

    # Membership lists: PrivLeak's, when present, so membership AUCs match MUSE's.
    privleak = root / "privleak"
    mia: dict[str, list[str]] = {"forget": [], "holdout": []}
    if privleak.is_dir():
        for name in mia:
            found = _find(privleak, name, MUSE_TEXT_EXTS)
            if found is None:
                notes.append(f"no privleak/{name}.json: membership inference uses the {name} texts")
                continue
            mia[name] = _muse_texts(found)
            if not mia[name]:
                raise DataError(f"{found}: no texts (the membership list mia_{name} would be empty)")
            files[f"mia_{name}"] = [_rel(found, root)]
        taken = [f"privleak/{name}" for name in mia if mia[name]]
        if taken:
            notes.append(
                f"membership inference (PrivLeak, MIA) compares {' and '.join(taken)} (mia_*.jsonl), the "
                "lists MUSE's PrivLeak compares, so membership AUCs match MUSE's while unlearning uses all "
                "of the forget texts; privleak/forget is a sample of raw/forget by design"
            )
        notes.append("privleak/retain.json is not used (relapse's MIA compares forget with holdout)")
    else:
        notes.append("no privleak/ folder: membership inference compares the forget and holdout texts")

    # KnowMem: absent for books.
    knowmem = root / "knowmem"
    forget_qa: list[QAPair] = []
    retain_qa: list[QAPair] = []
    icl: list[QAPair] = []
    if knowmem.is_dir():
        for name in ("forget_qa", "retain_qa"):
            found = _find(knowmem, name, JSON_EXTS)
            if found is None:
                raise DataError(f"{knowmem / (name + '.json')}: file missing (knowmem/ exists but lacks it)")
            files[name] = [_rel(found, root)]
            (forget_qa if name == "forget_qa" else retain_qa).extend(_qa_of(_read_records(found)))
        icl_path = _find(knowmem, "forget_qa_icl", JSON_EXTS)
        if icl_path is not None:
            icl = _qa_of(_read_records(icl_path))
            files["icl"] = [_rel(icl_path, root)]
        if _find(knowmem, "retain_qa_icl", JSON_EXTS) is not None:
            notes.append(
                "knowmem/retain_qa_icl.json exists but relapse uses one few-shot list for both QA sets: "
                "icl.jsonl holds knowmem/forget_qa_icl.json"
            )
    else:
        notes.append(
            "no knowmem/ (as in MUSE books): forget_qa and retain_qa are empty, so no KnowMem scores"
        )

    verbmem: list[VerbMemItem] = []
    verbmem_path = _find(root / "verbmem", "forget", JSON_EXTS)
    if verbmem_path is not None:
        verbmem = _verbmem_of(_read_records(verbmem_path))
        files["verbmem"] = [_rel(verbmem_path, root)]
    else:
        notes.append("no verbmem/forget.json: relapse derives VerbMem prompts from the forget texts")
    notes.append("MUSE has no general text: perplexity needs a general.jsonl added to this folder")
    if corpus is not None:
        notes.append(f"PrivLeak's reference without a retrained model of your own: --retrained-auc {corpus}")

    meta: dict[str, Any] = {
        "format": FORMAT,
        "converted_from": "muse",
        "source": str(path),
        "muse_corpus": corpus,
        "fold": fold,
        "files": files,
        "notes": notes,
    }
    benchmark = Benchmark(
        forget=forget,
        retain=retain,
        holdout=holdout,
        forget_qa=forget_qa,
        retain_qa=retain_qa,
        icl=icl,
        verbmem=verbmem,
        mia_forget=mia["forget"],
        mia_holdout=mia["holdout"],
        meta=meta,
    )
    return _finish(benchmark, files)


# ------------------------------------------------------------------------------------------------ TOFU


def _tofu_text(pair: QAPair) -> str:
    return f"{pair.question} {pair.answer}"


def from_tofu(path: str | os.PathLike[str], forget: str = "forget10") -> Benchmark:
    """Convert a TOFU folder (``forget10.json``, ``retain90.json``, ...) into a :class:`Benchmark`.

    TOFU is QA only, so each pair is also a text, ``f"{question} {answer}"``. forget_qa is ``forgetNN``,
    retain_qa its complement ``retain{100-NN}`` (or ``full`` minus the forget questions). The holdout is
    ``holdoutNN`` when present (OpenUnlearning's fictitious authors never trained on, which its TOFU release
    adds for membership inference); else it stays empty and PrivLeak/MIA need a holdout.jsonl from the
    user. The ``*_perturbed`` files are not used as holdout: they ask about the same, trained-on authors.
    ``real_authors`` and ``world_facts`` (TOFU's utility sets) become the general texts for perplexity.
    """
    root = Path(path)
    _require_folder(root, "TOFU")
    match = TOFU_FORGET_RE.match(forget)
    if not match or not 1 <= int(match.group(1)) <= 99:
        raise ConfigError(
            f"the TOFU forget split must look like forget01, forget05 or forget10, got {forget!r}"
        )
    share = int(match.group(1))
    files: dict[str, list[str]] = {}
    notes: list[str] = []

    forget_path = _find(root, forget, JSON_EXTS)
    if forget_path is None:
        present = sorted(p.name for p in root.glob("forget[0-9][0-9].json*"))
        raise DataError(
            f"{root / (forget + '.json')}: file missing (TOFU forget splits here: "
            f"{', '.join(present) or 'none'})"
        )
    forget_qa = _qa_of(_read_records(forget_path))
    files["forget"] = files["forget_qa"] = [forget_path.name]

    retain_name = f"retain{100 - share:02d}"
    retain_path = _find(root, retain_name, JSON_EXTS)
    if retain_path is not None:
        retain_qa = _qa_of(_read_records(retain_path))
        files["retain"] = files["retain_qa"] = [retain_path.name]
    else:
        full_path = _find(root, "full", JSON_EXTS)
        if full_path is None:
            raise DataError(f"{root / (retain_name + '.json')}: file missing (nor full.json to take it from)")
        forget_questions = {qa.question.strip() for qa in forget_qa}
        retain_qa = [
            qa for qa in _qa_of(_read_records(full_path)) if qa.question.strip() not in forget_questions
        ]
        files["retain"] = files["retain_qa"] = [full_path.name]
        notes.append(f"no {retain_name}.json: retain is {full_path.name} minus the {forget} questions")

    holdout_name = f"holdout{share:02d}"
    holdout_path = _find(root, holdout_name, JSON_EXTS)
    holdout_qa: list[QAPair] = []
    if holdout_path is not None:
        holdout_qa = _qa_of(_read_records(holdout_path))
        files["holdout"] = files["holdout_qa"] = [holdout_path.name]
        notes.append(
            f"holdout texts and holdout_qa are {holdout_path.name}: fictitious authors never trained on"
        )
    else:
        notes.append(
            f"no {holdout_name}.json: TOFU's original release has no authors held out of training, so "
            "holdout.jsonl is empty and PrivLeak and the membership attacks need holdout texts from you "
            "(OpenUnlearning's TOFU adds holdout01/05/10.json; *_perturbed files ask about trained-on "
            "authors and real_authors/world_facts about real ones, so neither is a holdout)"
        )

    general: list[str] = []
    for name in ("real_authors", "world_facts"):
        found = _find(root, name, JSON_EXTS)
        if found is not None:
            general.extend(_tofu_text(qa) for qa in _qa_of(_read_records(found)))
            files.setdefault("general", []).append(found.name)
    if general:
        notes.append("general texts (for perplexity) are real_authors and world_facts, as question answer")
    else:
        notes.append("no real_authors.json or world_facts.json: no general text for perplexity")
    notes.append("texts are each QA pair as 'question answer'; TOFU has no few-shot list, so icl is empty")
    notes.append("TOFU has no VerbMem set: relapse derives VerbMem prompts from the forget texts")

    meta: dict[str, Any] = {
        "format": FORMAT,
        "converted_from": "tofu",
        "source": str(path),
        "forget_split": forget,
        "text_form": "{question} {answer}",
        "files": files,
        "notes": notes,
    }
    benchmark = Benchmark(
        forget=[_tofu_text(qa) for qa in forget_qa],
        retain=[_tofu_text(qa) for qa in retain_qa],
        holdout=[_tofu_text(qa) for qa in holdout_qa],
        forget_qa=forget_qa,
        retain_qa=retain_qa,
        general=general,
        holdout_qa=holdout_qa,
        meta=meta,
    )
    return _finish(benchmark, files)


# ---------------------------------------------------------------------------------------- text / JSONL


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
        return _texts_of(_read_records(path), field)
    return _split_documents(_read_text(path), one_per_line)


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
        if name in PLAIN_TEXT_SPLITS:
            splits[name] = [t for p in paths for t in _text_file(p, text_format, field, one_per_line)]
        elif name == "verbmem":
            splits[name] = [item for p in paths for item in _verbmem_of(_read_records(p))]
        else:
            splits[name] = [qa for p in paths for qa in _qa_of(_read_records(p))]
    notes = []
    if not sources["retain"]:
        notes.append("no retain file: retain.jsonl is empty")
    if not sources["holdout"]:
        notes.append(
            "no holdout file: holdout.jsonl is empty, so PrivLeak and the membership attacks cannot run"
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
    return _finish(benchmark, files)


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
        _require_folder(root, f"--from {kind} source")
        for name in FOLDER_SPLITS:
            is_text = name in PLAIN_TEXT_SPLITS
            exts = (".txt",) if is_text and kind == "text" else (".jsonl", ".json")
            found = _find(root, name, exts)
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


# -------------------------------------------------------------------------------------- Hugging Face


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

    def rows(config_name: str | None, split: str) -> list[tuple[str, Any]]:
        label = f"{name}" + (f" ({config_name})" if config_name else "") + f" split {split!r}"
        try:
            data = datasets.load_dataset(
                name, config_name, split=split, revision=revision, data_files=data_files
            )
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{label}: cannot load ({first})") from None
        return [(f"{label} row {i}", dict(row)) for i, row in enumerate(data, start=1)]

    splits: dict[str, list[Any]] = {}
    files: dict[str, list[str]] = {}
    for key, key_specs in specs.items():
        records = [r for cfg, split in key_specs for r in rows(cfg or config, split)]
        if key in PLAIN_TEXT_SPLITS:
            splits[key] = _texts_of(records, field)
        elif key == "verbmem":
            splits[key] = _verbmem_of(records)
        else:
            splits[key] = _qa_of(records)
        if key_specs:
            files[key] = [
                f"{cfg or config}:{split}" if (cfg or config) else split for cfg, split in key_specs
            ]
    notes = []
    if not specs["retain"]:
        notes.append("no retain split: retain.jsonl is empty")
    if not specs["holdout"]:
        notes.append(
            "no holdout split: holdout.jsonl is empty, so PrivLeak and the membership attacks cannot run"
        )
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
    return _finish(benchmark, files)
