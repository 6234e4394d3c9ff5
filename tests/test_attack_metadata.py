"""Attacks declare their bit width, grid and optional package (read by the report, the audit's weight
diagnostics and the experiment's check), so that nothing parses them back out of names."""

import pytest

from relapse.attacks.registry import EXAMPLES, attack_or_none, get_attack
from relapse.attacks.rtn import QuantScheme


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_declares_its_metadata(name):
    attack = get_attack(name)
    assert attack.bits is None or attack.kind == "quantization"
    assert attack.grid is None or attack.grid.bits == attack.bits
    assert (attack.requires is None) == (attack.extra is None) or attack.requires == "llmcompressor"


def test_declared_values():
    assert get_attack("awq-w4-g128").grid == QuantScheme(4, 128, False)
    assert get_attack("llmc-gptq-w4-g128").grid is None and get_attack("llmc-gptq-w4-g128").bits == 4
    assert get_attack("gguf-q5_1").bits == 5 and get_attack("gguf-q5_1").requires is None
    assert (get_attack("bnb-int8").bits, get_attack("bnb-int8").requires) == (8, "bitsandbytes")
    assert get_attack("noise-like-rtn-w4-g128").bits is None and get_attack("prune-30").grid is None


def test_an_unknown_name_has_no_attack():
    assert attack_or_none("no-such-attack") is None
    assert attack_or_none("rtn-w4-g128").name == "rtn-w4-g128"


def test_awq_records_its_alpha_search_as_grid():
    assert get_attack("awq-w4-g128").settings()["grid"] == 20
