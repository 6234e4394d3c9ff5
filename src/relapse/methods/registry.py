"""The names of unlearning methods, shared by the CLI, configs and the Python API.

A method name is a forget term, optionally ``+`` a retain regulariser: ``ga``, ``ga+gdr``, ``npo+klr``,
``simnpo+gdr``, ``rmu``. Each term is a class in its own module, registered here by one line (imported
only when a run uses it). A forget term may come with its own regulariser (RMU's activation-matching
``act``), which its bare name then implies: ``rmu`` means ``rmu+act``. SURE (``--sure-top``) and SAM
(``--sam-rho``) are not terms but options of the run; they combine with any method.

Adding a method: write ``methods/<name>.py`` with a :class:`~relapse.methods.component.ForgetTerm` or
:class:`~relapse.methods.component.Regularizer` subclass, and add its line below
(``docs/extending.md`` walks through it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache

from relapse.errors import ConfigError

#: Forget terms by name: ``module:class``, imported on first use.
FORGET_TERMS = {
    "ga": "relapse.methods.ga:GradientAscent",
    "npo": "relapse.methods.npo:NPO",
    "simnpo": "relapse.methods.simnpo:SimNPO",
    "rmu": "relapse.methods.rmu:RMU",
}
#: Retain regularisers by name.
REGULARIZER_TERMS = {
    "gdr": "relapse.methods.gdr:GradientDescentRetain",
    "klr": "relapse.methods.klr:KLRetain",
    "act": "relapse.methods.rmu:ActivationRetain",
}
VARIANTS = ("standard", "muse-compatible")


@cache
def term_class(name: str) -> type:
    """The class registered under ``name`` (a forget term or a regulariser)."""
    target = FORGET_TERMS.get(name) or REGULARIZER_TERMS[name]
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def term_summaries() -> dict[str, str]:
    """Every registered term's one-line summary, forget terms first."""
    return {name: term_class(name).summary for name in (*FORGET_TERMS, *REGULARIZER_TERMS)}


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method name."""

    forget: str
    regularizer: str | None

    @property
    def name(self) -> str:
        implied = term_class(self.forget).implied_regularizer
        shown = self.regularizer if self.regularizer != implied else None
        return self.forget + (f"+{shown}" if shown else "")

    @property
    def terms(self) -> list[type]:
        return [term_class(n) for n in (self.forget, self.regularizer) if n is not None]

    @property
    def needs_reference(self) -> bool:
        """Whether the starting model's outputs are needed during training."""
        return any(term.uses_reference for term in self.terms)

    @property
    def needs_retain(self) -> bool:
        return self.regularizer is not None


def method_names() -> list[str]:
    """Every registered method name (a forget term alone, or with each regulariser)."""
    names = []
    for forget in FORGET_TERMS:
        implied = term_class(forget).implied_regularizer
        names.append(forget)
        names += [f"{forget}+{r}" for r in REGULARIZER_TERMS if r != implied]
    return names


def parse_method(name: str) -> MethodSpec:
    """``"npo+gdr"`` to a :class:`MethodSpec`, with a clear error for unknown names."""
    parts = name.strip().lower().replace("_", "+").split("+")
    if (
        len(parts) > 2
        or parts[0] not in FORGET_TERMS
        or (len(parts) == 2 and parts[1] not in REGULARIZER_TERMS)
    ):
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(method_names())}")
    regularizer = parts[1] if len(parts) == 2 else term_class(parts[0]).implied_regularizer
    return MethodSpec(parts[0], regularizer)
