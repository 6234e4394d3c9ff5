"""MUSE (news, books) into the benchmark format: ``raw/``, ``knowmem/``, ``verbmem/`` and ``privleak/``.

MUSE ships each corpus as a folder; this converter maps its files onto relapse's splits and records in
``meta["notes"]`` every choice the mapping makes (folds, which membership lists, what is left unused), so
the converted folder explains itself. See ``docs/data-format.md`` ("Converting other formats").
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from relapse.data.benchmark import Benchmark, QAPair, VerbMemItem
from relapse.data.converters.common import (
    FORMAT,
    JSON_EXTS,
    find_file,
    finish,
    qa_of,
    read_records,
    read_text,
    relative_name,
    require_folder,
    split_documents,
    texts_of,
    verbmem_of,
)
from relapse.errors import ConfigError, DataError

__all__ = ["from_muse"]

MUSE_FOLD_RE = re.compile(r"^(scal|sust)/forget_([1-9][0-9]*)$")
MUSE_TEXT_EXTS = (".json", ".txt")  # .json first: a list keeps document boundaries exactly


def _muse_texts(path: Path) -> list[str]:
    """A MUSE text file: a JSON list (of strings or ``{"text"}`` objects) or documents between blank lines."""
    if path.suffix == ".txt":
        return split_documents(read_text(path), one_per_line=False)
    return texts_of(read_records(path), "text")


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
    require_folder(root, "MUSE corpus")
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
        found = find_file(folder, stem, MUSE_TEXT_EXTS)
        if found is None:
            raise DataError(f"{folder / (stem + '.txt')}: file missing (nor {stem}.json); {hint}")
        return found

    # Retain: everything the target model saw and should keep.
    retain_paths = [
        p for p in (find_file(raw, "retain1", MUSE_TEXT_EXTS), find_file(raw, "retain2", MUSE_TEXT_EXTS)) if p
    ]
    if not retain_paths:
        single = find_file(raw, "retain", MUSE_TEXT_EXTS)
        if single is None:
            raise DataError(
                f"{raw}: missing retain1.txt and retain2.txt (or retain.txt); MUSE's retain texts"
            )
        retain_paths = [single]
    elif len(retain_paths) == 1:
        notes.append(f"only {relative_name(retain_paths[0], root)} found of raw/retain1 and raw/retain2")
    retain = [t for p in retain_paths for t in _muse_texts(p)]
    files["retain"] = [relative_name(p, root) for p in retain_paths]

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
    files["forget"] = [relative_name(forget_path, root)]
    files["holdout"] = [relative_name(holdout_path, root)]

    # Membership lists: PrivLeak's, when present, so membership AUCs match MUSE's.
    privleak = root / "privleak"
    mia: dict[str, list[str]] = {"forget": [], "holdout": []}
    if privleak.is_dir():
        for name in mia:
            found = find_file(privleak, name, MUSE_TEXT_EXTS)
            if found is None:
                notes.append(f"no privleak/{name}.json: membership inference uses the {name} texts")
                continue
            mia[name] = _muse_texts(found)
            if not mia[name]:
                raise DataError(f"{found}: no texts (the membership list mia_{name} would be empty)")
            files[f"mia_{name}"] = [relative_name(found, root)]
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
            found = find_file(knowmem, name, JSON_EXTS)
            if found is None:
                raise DataError(f"{knowmem / (name + '.json')}: file missing (knowmem/ exists but lacks it)")
            files[name] = [relative_name(found, root)]
            (forget_qa if name == "forget_qa" else retain_qa).extend(qa_of(read_records(found)))
        icl_path = find_file(knowmem, "forget_qa_icl", JSON_EXTS)
        if icl_path is not None:
            icl = qa_of(read_records(icl_path))
            files["icl"] = [relative_name(icl_path, root)]
        if find_file(knowmem, "retain_qa_icl", JSON_EXTS) is not None:
            notes.append(
                "knowmem/retain_qa_icl.json exists but relapse uses one few-shot list for both QA sets: "
                "icl.jsonl holds knowmem/forget_qa_icl.json"
            )
    else:
        notes.append(
            "no knowmem/ (as in MUSE books): forget_qa and retain_qa are empty, so no KnowMem scores"
        )

    verbmem: list[VerbMemItem] = []
    verbmem_path = find_file(root / "verbmem", "forget", JSON_EXTS)
    if verbmem_path is not None:
        verbmem = verbmem_of(read_records(verbmem_path))
        files["verbmem"] = [relative_name(verbmem_path, root)]
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
    return finish(benchmark, files)
