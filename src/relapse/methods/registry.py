"""The names of unlearning methods, shared by the CLI, configs and the Python API.

A method name is a forget loss, optionally ``+`` a retain regulariser: ``ga``, ``ga+gdr``, ``ga+klr``,
``npo``, ``npo+gdr``, ``npo+klr`` (the six baselines of Zhang et al., ICLR 2025). SURE is not a loss but
a mask over which weights may move; it combines with any of them (``--sure-top``).
"""

from __future__ import annotations

from dataclasses import dataclass

from relapse.errors import ConfigError

FORGET_LOSSES = {
    "ga": "gradient ascent: minimise -CE on the forget set",
    "npo": "negative preference optimisation on sequence log-likelihood ratios to the starting model",
}
REGULARIZERS = {
    "gdr": "gradient descent on the retain set: + alpha * CE(retain)",
    "klr": "KL regulariser: + alpha * KL(p_start || p_theta) on retain tokens",
}
VARIANTS = ("standard", "muse-compatible")


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method name."""

    forget: str
    regularizer: str | None

    @property
    def name(self) -> str:
        return self.forget + (f"+{self.regularizer}" if self.regularizer else "")

    @property
    def needs_reference(self) -> bool:
        """Whether the starting model's outputs are needed during training."""
        return self.forget == "npo" or self.regularizer == "klr"

    @property
    def needs_retain(self) -> bool:
        return self.regularizer is not None


def method_names() -> list[str]:
    """Every registered method name."""
    return [f + (f"+{r}" if r else "") for f in FORGET_LOSSES for r in (None, *REGULARIZERS)]


def parse_method(name: str) -> MethodSpec:
    """``"npo+gdr"`` to a :class:`MethodSpec`, with a clear error for unknown names."""
    parts = name.strip().lower().replace("_", "+").split("+")
    if len(parts) > 2 or parts[0] not in FORGET_LOSSES or (len(parts) == 2 and parts[1] not in REGULARIZERS):
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(method_names())}")
    return MethodSpec(parts[0], parts[1] if len(parts) == 2 else None)
