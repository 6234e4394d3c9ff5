"""Attack names, shared by the CLI, configs and the Python API.

- ``rtn-w4-g128``, ``rtn-w4-g128-sym``, ``rtn-w8-ch``: RTN fake-quantization (2/3/4/8 bits; groups of
  the given size or one per output channel; asymmetric min-max unless ``-sym``, symmetric absmax).
- ``gptq-w4-g128``, ``gptq-w4-g128-sym``, ``gptq-w4-g128-act``: GPTQ on the same grids, calibrated on
  the benchmark's general text (``-act``: columns in decreasing Hessian-diagonal order).
- ``awq-w4-g128``: AWQ's activation-aware channel scaling before RTN, calibrated the same way.
- ``llmc-gptq-w4-g128``, ``llmc-awq-w4-g128`` (``-sym``): llm-compressor's own GPTQ and AWQ presets
  (needs the llmcompressor package, in its own virtual environment).
- ``gguf-q8_0``, ``gguf-q4_0``, ``gguf-q4_1``, ``gguf-q5_0``, ``gguf-q5_1``: llama.cpp block formats.
- ``bnb-nf4``, ``bnb-fp4``, ``bnb-int8``: bitsandbytes formats (needs the bitsandbytes package).
- ``noise-like-rtn-w4-g128``: Gaussian noise with the per-tensor RMS of that quantizer's error.
- ``prune-30``: magnitude pruning of 30% of each target tensor.
- ``relearn-retain-25``, ``relearn-forget-half-10-lr1e-3``: fine-tuning steps on other data.
"""

from __future__ import annotations

from relapse.attacks.awq import AWQAttack
from relapse.attacks.base import Attack
from relapse.attacks.deploy import DeploymentAttack
from relapse.attacks.gptq import GPTQAttack
from relapse.attacks.llmcompressor import LLMCompressorAttack, parse_llmc_name
from relapse.attacks.relearn import RelearnAttack
from relapse.attacks.rtn import parse_rtn_name
from relapse.attacks.weights import NoiseAttack, PruneAttack, RTNAttack
from relapse.errors import ConfigError

EXAMPLES = (
    "rtn-w8-ch",
    "rtn-w4-g128",
    "rtn-w4-g128-sym",
    "rtn-w4-g32",
    "rtn-w3-g128",
    "rtn-w2-g64",
    "gptq-w4-g128",
    "awq-w4-g128",
    "llmc-gptq-w4-g128",
    "llmc-awq-w4-g128",
    "gguf-q4_0",
    "gguf-q8_0",
    "bnb-nf4",
    "bnb-fp4",
    "noise-like-rtn-w4-g128",
    "prune-30",
    "relearn-retain-25",
    "relearn-holdout-25",
    "relearn-forget-half-25",
)


def get_attack(name: str) -> Attack:
    """The attack registered under ``name`` (see the module docstring for the forms)."""
    text = name.strip().lower()
    if text.startswith("rtn-"):
        return RTNAttack(parse_rtn_name(text))
    if text.startswith("gptq-"):
        act_order = text.endswith("-act")
        scheme = parse_rtn_name("rtn-" + text.removeprefix("gptq-").removesuffix("-act"))
        return GPTQAttack(scheme, act_order=act_order)
    if text.startswith("awq-"):
        return AWQAttack(parse_rtn_name("rtn-" + text.removeprefix("awq-")))
    if text.startswith("llmc-"):
        return LLMCompressorAttack(*parse_llmc_name(text))
    if text.startswith(("gguf-", "bnb-")):
        family, _, fmt = text.partition("-")
        return DeploymentAttack(family, fmt)
    if text.startswith("noise-like-"):
        return NoiseAttack(parse_rtn_name(text.removeprefix("noise-like-")))
    if text.startswith("prune-"):
        try:
            percent = float(text.removeprefix("prune-"))
        except ValueError:
            raise ConfigError(f"cannot read {name!r}: write prune-<percent>, e.g. prune-30") from None
        return PruneAttack(percent / 100)
    if text.startswith("relearn-"):
        return _parse_relearn(name, text.removeprefix("relearn-"))
    raise ConfigError(f"unknown attack {name!r}; examples: {', '.join(EXAMPLES)}")


def _parse_relearn(name: str, rest: str) -> Attack:
    lr = None
    if "-lr" in rest:
        rest, _, lr_text = rest.rpartition("-lr")
        try:
            lr = float(lr_text)
        except ValueError:
            raise ConfigError(f"cannot read the learning rate in {name!r}") from None
    split, _, steps_text = rest.rpartition("-")
    try:
        steps = int(steps_text)
    except ValueError:
        raise ConfigError(f"cannot read {name!r}: write relearn-<split>-<steps>[-lr<rate>]") from None
    return RelearnAttack(split, steps) if lr is None else RelearnAttack(split, steps, lr)


def attack_or_none(name: str) -> Attack | None:
    """The attack registered under ``name``, or None for a name this version does not know: an audit
    written by another version still has results to read, and its attacks' declarations where known."""
    try:
        return get_attack(name)
    except ConfigError:
        return None


def parse_attacks(names: str) -> list[Attack]:
    """A comma-separated list of attack names."""
    return [get_attack(n) for n in names.split(",") if n.strip()]
