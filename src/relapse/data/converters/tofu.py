"""TOFU (fictitious authors' QA, ``forgetNN.json``/``retainNN.json``) into the benchmark format.

TOFU is QA only, so each pair is also a text; which files become the retain, holdout and general splits,
and why the ``*_perturbed`` files are not a holdout, is recorded in ``meta["notes"]``. The answer variants
TOFU's truth ratio needs (``paraphrased_answer``, ``perturbed_answer``) are kept: from the QA records
themselves when they hold them, else from ``forgetNN_perturbed`` and ``retain_perturbed`` by question.
TOFU's general-knowledge sets, ``real_authors`` and ``world_facts``, are both general text and utility QA
sets (their questions with perturbed answers, from ``real_authors_perturbed`` and
``world_facts_perturbed`` when the plain files lack them), for TOFU's nine-value model utility.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from relapse.data.benchmark import Benchmark, QAPair, utility_split
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

#: TOFU's general-knowledge sets, in the order their texts join general.jsonl.
TOFU_UTILITY_SETS = ("real_authors", "world_facts")


def _tofu_text(pair: QAPair) -> str:
    return f"{pair.question} {pair.answer}"


def _has_variants(pair: QAPair) -> bool:
    return pair.has_variants


def _has_perturbed(pair: QAPair) -> bool:
    return bool(pair.perturbed_answers)


def _attach_variants(
    pairs: list[QAPair],
    root: Path,
    stem: str,
    files: list[str],
    notes: list[str],
    split: str,
    ready: Callable[[QAPair], bool] = _has_variants,
) -> list[QAPair]:
    """``pairs`` with the paraphrased and perturbed answers of ``stem`` (TOFU's ``forget10_perturbed``,
    ``retain_perturbed``, ``real_authors_perturbed``) attached by question, for the pairs that are not
    ``ready`` (the default: lack either) from records that are; unchanged without the file."""
    path = find_file(root, stem, JSON_EXTS)
    if path is None or all(ready(pair) for pair in pairs):
        return pairs
    variants = {qa.question.strip(): qa for qa in qa_of(read_records(path)) if ready(qa)}
    out, matched = [], 0
    for pair in pairs:
        found = None if ready(pair) else variants.get(pair.question.strip())
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
    ``real_authors`` and ``world_facts`` (TOFU's utility sets) become the general texts for perplexity and,
    their questions with perturbed answers, the utility QA sets of the same names (see
    :func:`_utility_set`).
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
    utility_qa: dict[str, list[QAPair]] = {}
    for name in TOFU_UTILITY_SETS:
        pairs = _utility_set(root, name, files, notes)
        if pairs is not None:
            general.extend(_tofu_text(qa) for qa in pairs)
            with_options = [qa for qa in pairs if qa.perturbed_answers]
            if with_options:
                utility_qa[name] = with_options
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
        utility_qa=utility_qa,
        meta=meta,
    )
    return finish(benchmark, files)


def _utility_set(root: Path, name: str, files: dict[str, list[str]], notes: list[str]) -> list[QAPair] | None:
    """The QA pairs of TOFU's general-knowledge set ``name`` (``real_authors``, ``world_facts``), or None
    without its files.

    They come from ``{name}.json``, else from ``{name}_perturbed.json``; perturbed answers missing from
    the plain file are attached from the perturbed one by question. Every pair is general text; those with
    perturbed answers form the utility QA set (``files`` and ``notes`` say which files gave what).
    """
    plain = find_file(root, name, JSON_EXTS)
    source = plain or find_file(root, f"{name}_perturbed", JSON_EXTS)
    if source is None:
        return None
    pairs = qa_of(read_records(source))
    files.setdefault("general", []).append(source.name)
    split = utility_split(name)
    sources = [source.name]
    if plain is not None:
        pairs = _attach_variants(pairs, root, f"{name}_perturbed", sources, notes, split, _has_perturbed)
    with_options = sum(1 for qa in pairs if qa.perturbed_answers)
    if with_options:
        files[split] = sources
        notes.append(
            f"{split}: the {with_options} of {len(pairs)} {name} questions with perturbed answers "
            "(TOFU's model utility scores them against their options)"
        )
    else:
        notes.append(
            f"{source.name} has no perturbed answers (nor a {name}_perturbed.json that gives them): no "
            f"{split}.jsonl, so tofu_model_utility leaves {name} out"
        )
    return pairs
