"""Attacks: the cheap transformations that may bring forgotten knowledge back.

Every attack is a registered name (:func:`get_attack`) applied to a loaded model temporarily
(:func:`applied` restores the exact weights afterwards) or written to disk (:func:`materialize`).
"""

from relapse.attacks.base import Attack, AttackContext, applied, weight_targets
from relapse.attacks.registry import get_attack, parse_attacks
from relapse.attacks.rtn import QuantScheme, fake_quantize, quantize

__all__ = [
    "Attack",
    "AttackContext",
    "QuantScheme",
    "applied",
    "fake_quantize",
    "get_attack",
    "parse_attacks",
    "quantize",
    "weight_targets",
]
