"""How QA pairs become text, in one place so that training, recall checks and metrics agree.

The zero-shot form ``Question: {q}\\nAnswer:`` followed by `` {a}`` is what the built-in models are trained
on and asked with. MUSE's few-shot KnowMem prompt builds on the same ``Question:``/``Answer:`` lines.
"""

from __future__ import annotations

from relapse.data.benchmark import QAPair


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
