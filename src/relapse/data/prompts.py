"""How QA pairs become text, in one place so that training, recall checks and metrics agree.

The zero-shot form ``Question: {q}\\nAnswer:`` followed by `` {a}`` is what the built-in models are trained
on and asked with. MUSE's few-shot KnowMem prompt builds on the same ``Question:``/``Answer:`` lines.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from relapse.data.benchmark import QAPair, VerbMemItem
from relapse.errors import DataError


def qa_prompt(question: str) -> str:
    """The prompt that asks ``question``; the model should continue with a space and the answer."""
    return f"Question: {question}\nAnswer:"


def qa_text(pair: QAPair) -> str:
    """A QA pair as one training text: the prompt followed by the answer."""
    return f"{qa_prompt(pair.question)} {pair.answer}"


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace, drop surrounding spaces and a trailing full stop."""
    return " ".join(text.lower().split()).rstrip(".").strip()


def answer_matches(generated: str, answer: str) -> bool:
    """Whether a generated answer equals the reference after :func:`normalize_answer`."""
    return normalize_answer(generated) == normalize_answer(answer)


#: Where MUSE cuts a KnowMem answer: the end of the answer line pair, or the next question.
KNOWMEM_STOP_STRINGS = ("\n\n", "\nQuestion", "Question:")


@dataclass(frozen=True)
class KnowMemPrompt:
    """How KnowMem asks a question: MUSE's few-shot prompt by default.

    MUSE writes every in-context example as ``Question: {q}\\nAnswer: {a}\\n\\n`` and ends the prompt with
    ``Question: {q}\\nAnswer: `` (with a trailing space). A benchmark may say otherwise in its
    ``meta.json`` under ``knowmem_prompt`` (``{"shots": 0, "trailing_space": false}`` for the built-in
    one, whose models learn the zero-shot form only: a tiny word-level model never saw a lone space
    token, nor several QA pairs in one text, and would be scored on a prompt it cannot read).
    """

    shots: int | None = None
    trailing_space: bool = True

    def build(self, question: str, icl: Sequence[QAPair]) -> str:
        examples = list(icl) if self.shots is None else list(icl)[: self.shots]
        context = "".join(f"Question: {ex.question}\nAnswer: {ex.answer}\n\n" for ex in examples)
        return context + qa_prompt(question) + (" " if self.trailing_space else "")

    def to_json(self) -> dict[str, Any]:
        return {"shots": self.shots, "trailing_space": self.trailing_space}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> KnowMemPrompt:
        """The prompt a benchmark's ``meta.json`` asks for, MUSE's when it says nothing."""
        spec = meta.get("knowmem_prompt")
        if spec is None:
            return cls()
        if not isinstance(spec, dict) or set(spec) - {"shots", "trailing_space"}:
            raise DataError(
                "meta.json: knowmem_prompt must be an object with optional 'shots' (int or null) and "
                f"'trailing_space' (bool), got {spec!r}"
            )
        shots = spec.get("shots")
        trailing = spec.get("trailing_space", True)
        if shots is not None and (not isinstance(shots, int) or isinstance(shots, bool) or shots < 0):
            raise DataError(f"meta.json: knowmem_prompt.shots must be a count >= 0 or null, got {shots!r}")
        if not isinstance(trailing, bool):
            raise DataError(f"meta.json: knowmem_prompt.trailing_space must be a boolean, not {trailing!r}")
        return cls(shots=shots, trailing_space=trailing)


def derive_verbmem(forget_texts: Sequence[str]) -> list[VerbMemItem]:
    """VerbMem items for a benchmark without ``verbmem.jsonl``: each forget text split in two.

    The prompt is the first sentence (up to and including the first ``". "``'s full stop) when that
    leaves at least half of the words for the continuation, else the first half of the words. The
    continuation keeps its leading space, so ``prompt + gt`` is the text and ``gt`` tokenizes as it does
    inside the text. Splitting on words, not tokens, keeps the items the same for every tokenizer. Texts
    of one word are skipped.
    """
    items = []
    for text in forget_texts:
        words = list(re.finditer(r"\S+", text))
        if len(words) < 2:
            continue
        end = text.find(". ")
        if end != -1 and len(text[end + 1 :].split()) >= len(words) / 2:
            cut = end + 1
        else:
            cut = words[len(words) // 2 - 1].end()
        items.append(VerbMemItem(prompt=text[:cut], gt=text[cut:]))
    return items
