"""The one benchmark format every part of relapse reads, and its validating loader.

A benchmark is a folder (see ``docs/data-format.md``)::

    forget.jsonl  retain.jsonl  holdout.jsonl     {"text": ...} per line
    forget_qa.jsonl  retain_qa.jsonl              {"question": ..., "answer": ...} per line, optionally
                                                  with "paraphrased_answer" and "perturbed_answer" (a list)
    icl.jsonl        (optional) few-shot QA examples
    general.jsonl    (optional) text for perplexity
    holdout_qa.jsonl (optional) QA about the holdout texts
    verbmem.jsonl    (optional) {"prompt": ..., "gt": ...}: VerbMem's prompts and true continuations
    mia_forget.jsonl, mia_holdout.jsonl (optional) {"text": ...}: the texts membership inference compares,
                     when they differ from forget/holdout (MUSE's privleak/ lists)
    utility_<name>_qa.jsonl (optional, any number) general-knowledge QA, each record with "perturbed_answer":
                     TOFU's real_authors and world_facts sets, for its model utility
    meta.json        (optional) provenance; ``knowmem_prompt`` says how KnowMem asks (see prompts.py)

Bad input is reported as one :class:`~relapse.errors.DataError` line naming the file and line number.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relapse.errors import DataError
from relapse.runtime import atomic_write_text

# The split names, defined here once: each is a Benchmark field and, with ``.jsonl``, a file name.
FORGET, RETAIN, HOLDOUT, GENERAL = "forget", "retain", "holdout", "general"
FORGET_QA, RETAIN_QA, HOLDOUT_QA, ICL = "forget_qa", "retain_qa", "holdout_qa", "icl"
VERBMEM = "verbmem"
TEXT_SPLITS = (FORGET, RETAIN, HOLDOUT)
QA_SPLITS = (FORGET_QA, RETAIN_QA)
OPTIONAL_QA_SPLITS = (ICL, HOLDOUT_QA)
OPTIONAL_TEXT_SPLITS = (GENERAL,)
#: Written only when not empty, so that folders without them keep their exact file set (and data hash).
MEMBERSHIP_SPLITS = ("mia_forget", "mia_holdout")
#: Every split whose records are ``{"text": ...}`` and that a source can supply (membership lists aside).
PLAIN_TEXT_SPLITS = TEXT_SPLITS + OPTIONAL_TEXT_SPLITS
#: Every split, in the order of the benchmark's own files (the order of ``meta["files"]`` and
#: ``meta["counts"]`` that the converters write).
SPLITS = (*TEXT_SPLITS, *QA_SPLITS, ICL, GENERAL, HOLDOUT_QA, VERBMEM, *MEMBERSHIP_SPLITS)
META_NAME = "meta.json"

#: General-knowledge QA sets (TOFU's ``real_authors`` and ``world_facts``), any number of them, each in
#: ``utility_<name>_qa.jsonl``. Every record needs ``perturbed_answer``: TOFU's model utility scores the
#: answer against those options. Written and hashed only when present, so older folders keep their exact
#: file set (and data hash). A name is lower-case letters, digits and ``_``, starting with a letter, and
#: is none of :data:`RESERVED_UTILITY_NAMES` (it becomes part of metric names: ``tofu_prob_<name>``).
UTILITY_QA_GLOB = "utility_*_qa.jsonl"
UTILITY_NAME = re.compile(r"[a-z][a-z0-9_]*")
RESERVED_UTILITY_NAMES = (FORGET, RETAIN, HOLDOUT)


def forget_half(n_questions: int) -> tuple[list[int], list[int]]:
    """The two halves of a forget QA set of ``n_questions`` for relearning on half of it: the
    even-numbered questions to train on and the odd-numbered ones to measure, so that what comes back on
    the measured half was never re-taught."""
    return list(range(0, n_questions, 2)), list(range(1, n_questions, 2))


def split_file(name: str) -> str:
    """The file name of split ``name`` in a benchmark folder (``forget.jsonl``)."""
    return f"{name}.jsonl"


def utility_split(name: str) -> str:
    """The split name of utility QA set ``name`` (``utility_real_authors_qa``; its file adds ``.jsonl``)."""
    return f"utility_{name}_qa"


def utility_qa_files(directory: Path) -> list[Path]:
    """The ``utility_<name>_qa.jsonl`` files of a benchmark folder, sorted by name (none: an empty list)."""
    return sorted(Path(directory).glob(UTILITY_QA_GLOB), key=lambda path: path.name)


def check_utility_name(name: str, where: str) -> None:
    """A :class:`DataError` naming ``where`` unless ``name`` may name a utility QA set."""
    if not UTILITY_NAME.fullmatch(name) or name in RESERVED_UTILITY_NAMES:
        raise DataError(
            f"{where}: {name!r} cannot name a utility QA set (use lower-case letters, digits and '_', "
            f"starting with a letter, and none of {', '.join(RESERVED_UTILITY_NAMES)})"
        )


#: The optional fields of a QA record that TOFU's truth ratio needs, under TOFU's names: a paraphrase of
#: the correct answer (a string) and plausible wrong answers (a list of strings).
PARAPHRASED_FIELD, PERTURBED_FIELD = "paraphrased_answer", "perturbed_answer"


@dataclass(frozen=True)
class QAPair:
    """One question with its reference answer and, optionally, TOFU's answer variants.

    ``paraphrased_answer`` says the same fact in other words; ``perturbed_answers`` are plausible wrong
    answers of the same type (another person's town). Both are optional: folders without them load, and
    only the metrics that need them (TOFU's truth ratio, forget quality) complain.
    """

    question: str
    answer: str
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()

    @property
    def has_variants(self) -> bool:
        """Whether the pair carries a paraphrase and at least one perturbed answer."""
        return self.paraphrased_answer is not None and bool(self.perturbed_answers)

    def to_json(self) -> dict[str, Any]:
        """The JSONL record; the variant fields only when present, so older folders keep their bytes."""
        record: dict[str, Any] = {"question": self.question, "answer": self.answer}
        if self.paraphrased_answer is not None:
            record[PARAPHRASED_FIELD] = self.paraphrased_answer
        if self.perturbed_answers:
            record[PERTURBED_FIELD] = list(self.perturbed_answers)
        return record


@dataclass(frozen=True)
class VerbMemItem:
    """The start of a forget text and its true continuation (MUSE's ``verbmem/forget.json`` records)."""

    prompt: str
    gt: str

    def to_json(self) -> dict[str, str]:
        return {"prompt": self.prompt, "gt": self.gt}


@dataclass
class Benchmark:
    """The texts and QA pairs of one forget/retain benchmark, already validated."""

    forget: list[str]
    retain: list[str]
    holdout: list[str]
    forget_qa: list[QAPair]
    retain_qa: list[QAPair]
    icl: list[QAPair] = field(default_factory=list)
    general: list[str] = field(default_factory=list)
    holdout_qa: list[QAPair] = field(default_factory=list)
    verbmem: list[VerbMemItem] = field(default_factory=list)
    mia_forget: list[str] = field(default_factory=list)
    mia_holdout: list[str] = field(default_factory=list)
    #: General-knowledge QA sets by name (``utility_<name>_qa.jsonl``), each pair with perturbed answers.
    utility_qa: dict[str, list[QAPair]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None

    def validate(self) -> None:
        """Raise :class:`DataError` when the benchmark cannot be used for unlearning."""
        if not self.forget:
            raise DataError(f"{self._where(split_file(FORGET))}: the forget set is empty")
        for first, second in ((FORGET, RETAIN), (FORGET, HOLDOUT), (RETAIN, HOLDOUT)):
            _check_disjoint_texts(
                getattr(self, first),
                getattr(self, second),
                split_file(first),
                split_file(second),
                self._where,
            )
        _check_disjoint_texts(
            [qa.question for qa in self.forget_qa],
            [qa.question for qa in self.retain_qa],
            split_file(FORGET_QA),
            split_file(RETAIN_QA),
            self._where,
            what="question",
        )
        for name, pairs in self.utility_qa.items():
            filename = split_file(utility_split(name))
            check_utility_name(name, self._where(filename))
            if not pairs:
                raise DataError(
                    f"{self._where(filename)}: no questions (a utility QA set needs at least one; "
                    "remove the file to drop the set)"
                )
            for i, pair in enumerate(pairs, start=1):
                if not pair.perturbed_answers:
                    raise DataError(
                        f"{self._where(filename)} record {i}: no {PERTURBED_FIELD!r} (every question of a "
                        "utility QA set needs plausible wrong answers)"
                    )

    def texts(self, splits: str) -> list[str]:
        """Texts of ``+``-joined split names, e.g. ``"forget+retain"``."""
        out: list[str] = []
        for name in _split_names(splits):
            if name not in TEXT_SPLITS + OPTIONAL_TEXT_SPLITS:
                raise DataError(f"unknown text split {name!r}; choose from {', '.join(TEXT_SPLITS)}")
            out.extend(getattr(self, name))
        return out

    def qa(self, splits: str) -> list[QAPair]:
        """QA pairs of ``+``-joined split names, e.g. ``"forget+retain"`` (``_qa`` is implied)."""
        out: list[QAPair] = []
        for name in _split_names(splits):
            attr = name if name.endswith("_qa") or name == ICL else f"{name}_qa"
            if attr not in QA_SPLITS + OPTIONAL_QA_SPLITS:
                raise DataError(f"unknown QA split {name!r}; choose from forget, retain, holdout")
            out.extend(getattr(self, attr))
        return out

    def file_contents(self) -> dict[str, str]:
        """The text of every file :meth:`save` writes, by file name."""
        files = {}
        for name in PLAIN_TEXT_SPLITS:
            files[split_file(name)] = _jsonl([{"text": t} for t in getattr(self, name)])
        for name in QA_SPLITS + OPTIONAL_QA_SPLITS:
            files[split_file(name)] = _jsonl([qa.to_json() for qa in getattr(self, name)])
        if self.verbmem:  # written only when present, so older folders keep their exact file set
            files[split_file(VERBMEM)] = _jsonl([item.to_json() for item in self.verbmem])
        for name in MEMBERSHIP_SPLITS:
            if getattr(self, name):
                files[split_file(name)] = _jsonl([{"text": t} for t in getattr(self, name)])
        for name in sorted(self.utility_qa):
            if self.utility_qa[name]:
                files[split_file(utility_split(name))] = _jsonl(
                    [qa.to_json() for qa in self.utility_qa[name]]
                )
        files[META_NAME] = json.dumps(self.meta, indent=2) + "\n"
        return files

    def save(self, directory: Path) -> None:
        """Write every split as JSONL plus ``meta.json``, each file atomically."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise DataError(f"{directory} is a file, not a folder")
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in self.file_contents().items():
            atomic_write_text(directory / name, text)

    def is_saved_in(self, directory: Path) -> bool:
        """Whether ``directory`` holds exactly the files :meth:`save` would write (byte for byte), and no
        utility QA set the benchmark lacks (loading would add it)."""
        directory = Path(directory)
        contents = self.file_contents()
        if any(path.name not in contents for path in utility_qa_files(directory)):
            return False
        for name, text in contents.items():
            path = directory / name
            if not path.is_file() or path.read_bytes() != text.encode("utf-8"):
                return False
        return True

    def _where(self, filename: str) -> str:
        return str(self.root / filename) if self.root else filename


def load_benchmark(directory: str | Path) -> Benchmark:
    """Read and validate a benchmark folder.

    Raises:
        DataError: a missing folder or file, a malformed JSON line, a missing or non-string field, an
            empty forget set, a text or question present in both forget and retain, or a utility QA set
            with a bad name, no questions or a question without ``perturbed_answer``.
    """
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} is a file; a benchmark is a folder (see docs/data-format.md)")
    if not root.is_dir():
        raise DataError(f"benchmark folder {root} does not exist")
    texts = {name: _read_jsonl(root / split_file(name), ("text",), required=True) for name in TEXT_SPLITS}
    qas = {
        name: _read_jsonl(root / split_file(name), ("question", "answer"), required=True)
        for name in QA_SPLITS
    }
    optional_qas = {
        name: _read_jsonl(root / split_file(name), ("question", "answer"), required=False)
        for name in OPTIONAL_QA_SPLITS
    }
    general = _read_jsonl(root / split_file(GENERAL), ("text",), required=False)
    verbmem = _read_jsonl(root / split_file(VERBMEM), ("prompt", "gt"), required=False)
    membership = {
        name: _read_jsonl(root / split_file(name), ("text",), required=False) for name in MEMBERSHIP_SPLITS
    }
    utility_qa = {}
    for path in utility_qa_files(root):
        name = path.name.removeprefix("utility_").removesuffix("_qa.jsonl")
        check_utility_name(name, str(path))
        utility_qa[name] = _read_jsonl(path, ("question", "answer"), required=True, perturbed=True)
    meta_path = root / META_NAME
    meta = read_meta(meta_path) if meta_path.exists() else {}
    benchmark = Benchmark(
        forget=[r["text"] for r in texts[FORGET]],
        retain=[r["text"] for r in texts[RETAIN]],
        holdout=[r["text"] for r in texts[HOLDOUT]],
        forget_qa=qas[FORGET_QA],
        retain_qa=qas[RETAIN_QA],
        icl=optional_qas[ICL],
        holdout_qa=optional_qas[HOLDOUT_QA],
        general=[r["text"] for r in general],
        verbmem=[VerbMemItem(r["prompt"], r["gt"]) for r in verbmem],
        mia_forget=[r["text"] for r in membership["mia_forget"]],
        mia_holdout=[r["text"] for r in membership["mia_holdout"]],
        utility_qa=utility_qa,
        meta=meta,
        root=root,
    )
    benchmark.validate()
    return benchmark


def benchmark_files(directory: Path) -> list[Path]:
    """The data files of a benchmark folder that exist, in a fixed order (for hashing: not :data:`SPLITS`'
    order, which would change every audit's config hash), the utility QA sets last, by name (a folder
    without them hashes as it did before they existed)."""
    names = (
        TEXT_SPLITS + QA_SPLITS + OPTIONAL_QA_SPLITS + OPTIONAL_TEXT_SPLITS + (VERBMEM, *MEMBERSHIP_SPLITS)
    )
    paths = [Path(directory) / split_file(name) for name in names]
    return [path for path in paths if path.exists()] + utility_qa_files(directory)


def read_meta(path: Path) -> dict[str, Any]:
    """A ``meta.json`` as a dict, or a :class:`DataError` saying why it cannot be read."""
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def qa_variants(record: dict[str, Any], where: str) -> tuple[str | None, tuple[str, ...]]:
    """The optional ``paraphrased_answer`` (a non-empty string) and ``perturbed_answer`` (a non-empty
    string or a list of them; TOFU's files hold lists) of a QA record, or a :class:`DataError` naming
    ``where`` (a file and line) and the field."""
    paraphrased = record.get(PARAPHRASED_FIELD)
    if paraphrased is not None and (not isinstance(paraphrased, str) or not paraphrased.strip()):
        raise DataError(
            f"{where}: field {PARAPHRASED_FIELD!r} must be a non-empty string, got {paraphrased!r}"
        )
    perturbed = record.get(PERTURBED_FIELD)
    if perturbed is None:
        return paraphrased, ()
    values = [perturbed] if isinstance(perturbed, str) else perturbed
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, str) and v.strip() for v in values)
    ):
        raise DataError(
            f"{where}: field {PERTURBED_FIELD!r} must be a non-empty list of non-empty strings, "
            f"got {_preview(json.dumps(perturbed, ensure_ascii=False))}"
        )
    return paraphrased, tuple(values)


def _qa_from_record(record: dict[str, Any], where: str) -> QAPair:
    """A checked QA record (question and answer already checked) as a :class:`QAPair`."""
    return QAPair(record["question"], record["answer"], *qa_variants(record, where))


def _split_names(splits: str) -> list[str]:
    names = [s.strip() for s in splits.split("+") if s.strip()]
    if not names:
        raise DataError(f"no split named in {splits!r}")
    return names


def _read_jsonl(path: Path, fields: tuple[str, ...], *, required: bool, perturbed: bool = False) -> list[Any]:
    """The records of a JSONL split, each checked for ``fields`` (non-empty strings); QA records (those
    with a ``question``) come back as :class:`QAPair` with their optional answer variants, which
    ``perturbed`` makes ``perturbed_answer`` a required field (utility QA sets)."""
    if not path.exists():
        if required:
            raise DataError(f"{path}: file missing (a benchmark folder needs it; see docs/data-format.md)")
        return []
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().split("\n")  # not splitlines(): U+2028 may sit inside a JSON string
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(record).__name__}")
        for name in fields:
            if name not in record:
                raise DataError(f"{path} line {lineno}: missing field {name!r}")
            if not isinstance(record[name], str):
                raise DataError(
                    f"{path} line {lineno}: field {name!r} must be a string, "
                    f"got {type(record[name]).__name__}"
                )
            if not record[name].strip():
                raise DataError(f"{path} line {lineno}: field {name!r} is empty")
        if perturbed and PERTURBED_FIELD not in record:
            raise DataError(
                f"{path} line {lineno}: missing field {PERTURBED_FIELD!r} (a utility QA set needs "
                "plausible wrong answers for every question)"
            )
        records.append(_qa_from_record(record, f"{path} line {lineno}") if "question" in fields else record)
    return records


def _check_disjoint_texts(a, b, name_a, name_b, where, what="text") -> None:
    seen = {text.strip(): i for i, text in enumerate(a, start=1)}
    for j, text in enumerate(b, start=1):
        i = seen.get(text.strip())
        if i is not None:
            raise DataError(
                f"{where(name_a)} record {i} and {where(name_b)} record {j} hold the same {what}: "
                f"{_preview(text)} (the splits must not overlap)"
            )


def _preview(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= width else flat[: width - 3] + "...")


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
