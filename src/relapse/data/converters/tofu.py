"""TOFU (fictitious authors' QA, ``forgetNN.json``/``retainNN.json``) into the benchmark format.

TOFU is QA only, so each pair is also a text; which files become the retain, holdout and general splits,
and why the ``*_perturbed`` files are not a holdout, is recorded in ``meta["notes"]``. The answer variants
TOFU's truth ratio needs (``paraphrased_answer``, ``perturbed_answer``) are kept: from the QA records
themselves when they hold them, else from ``forgetNN_perturbed`` and ``retain_perturbed`` by question.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from relapse.data.benchmark import Benchmark, QAPair
from relapse.data.converters.common import (
    FORMAT,
    JSON_EXTS,
    find_file,
    finish,
    qa_of,
    read_records,
    require_folder,
)
from relapse.errors import ConfigError, DataError

__all__ = ["from_tofu"]

TOFU_FORGET_RE = re.compile(r"^forget([0-9]{2})$")


def _tofu_text(pair: QAPair) -> str:
    return f"{pair.question} {pair.answer}"


def _attach_variants(
    pairs: list[QAPair], root: Path, stem: str, files: list[str], notes: list[str], split: str
) -> list[QAPair]:
    """``pairs`` with the paraphrased and perturbed answers of ``stem`` (TOFU's ``forget10_perturbed``,
    ``retain_perturbed``) attached by question, for the pairs that lack them; unchanged without the file."""
    path = find_file(root, stem, JSON_EXTS)
    if path is None or all(pair.has_variants for pair in pairs):
        return pairs
    variants = {qa.question.strip(): qa for qa in qa_of(read_records(path)) if qa.has_variants}
    out, matched = [], 0
    for pair in pairs:
        found = None if pair.has_variants else variants.get(pair.question.strip())
        if found is not None:
            pair = replace(
                pair, paraphrased_answer=found.paraphrased_answer, perturbed_answers=found.perturbed_answers
            )
            matched += 1
        out.append(pair)
    if matched:
        files.append(path.name)
        notes.append(
            f"{split} answer variants (paraphrased_answer, perturbed_answer) from {path.name}: "
            f"{matched} of {len(pairs)} questions"
        )
    return out


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
    require_folder(root, "TOFU")
    match = TOFU_FORGET_RE.match(forget)
    if not match or not 1 <= int(match.group(1)) <= 99:
        raise ConfigError(
            f"the TOFU forget split must look like forget01, forget05 or forget10, got {forget!r}"
        )
    share = int(match.group(1))
    files: dict[str, list[str]] = {}
    notes: list[str] = []

    forget_path = find_file(root, forget, JSON_EXTS)
    if forget_path is None:
        present = sorted(p.name for p in root.glob("forget[0-9][0-9].json*"))
        raise DataError(
            f"{root / (forget + '.json')}: file missing (TOFU forget splits here: "
            f"{', '.join(present) or 'none'})"
        )
    forget_qa = qa_of(read_records(forget_path))
    files["forget"] = [forget_path.name]
    files["forget_qa"] = [forget_path.name]
    forget_qa = _attach_variants(
        forget_qa, root, f"{forget}_perturbed", files["forget_qa"], notes, "forget_qa"
    )

    retain_name = f"retain{100 - share:02d}"
    retain_path = find_file(root, retain_name, JSON_EXTS)
    if retain_path is not None:
        retain_qa = qa_of(read_records(retain_path))
        files["retain"] = files["retain_qa"] = [retain_path.name]
    else:
        full_path = find_file(root, "full", JSON_EXTS)
        if full_path is None:
            raise DataError(f"{root / (retain_name + '.json')}: file missing (nor full.json to take it from)")
        forget_questions = {qa.question.strip() for qa in forget_qa}
        retain_qa = [
            qa for qa in qa_of(read_records(full_path)) if qa.question.strip() not in forget_questions
        ]
        files["retain"] = files["retain_qa"] = [full_path.name]
        notes.append(f"no {retain_name}.json: retain is {full_path.name} minus the {forget} questions")
    files["retain_qa"] = list(files["retain_qa"])
    retain_qa = _attach_variants(retain_qa, root, "retain_perturbed", files["retain_qa"], notes, "retain_qa")

    holdout_name = f"holdout{share:02d}"
    holdout_path = find_file(root, holdout_name, JSON_EXTS)
    holdout_qa: list[QAPair] = []
    if holdout_path is not None:
        holdout_qa = qa_of(read_records(holdout_path))
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
        found = find_file(root, name, JSON_EXTS)
        if found is not None:
            general.extend(_tofu_text(qa) for qa in qa_of(read_records(found)))
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
    return finish(benchmark, files)
