"""The options generated from config fields: defaults are the config's, and parsing builds the config."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from relapse.cli.fields import add_config_options, config_from_args, config_options
from relapse.methods.unlearn import UnlearnConfig
from relapse.models.tiny import TinyConfig
from relapse.options import option
from relapse.training.finetune import TrainConfig


def _parse(cls: type, *argv: str):
    parser = argparse.ArgumentParser()
    add_config_options(parser, cls)
    return config_from_args(cls, parser.parse_args(list(argv)))


@pytest.mark.parametrize("cls", [TrainConfig, UnlearnConfig])
def test_no_options_give_the_configs_defaults(cls):
    assert _parse(cls) == cls()


def test_train_options_set_their_fields_nested_ones_included():
    config = _parse(TrainConfig, "--steps", "7", "--on", "retain", "--tokenizer", "bpe", "--stop-recall", "0")
    assert config == TrainConfig(max_steps=7, on="retain", tiny=TinyConfig(tokenizer="bpe"), stop_recall=None)


def test_unlearn_lists_switches_renamed_flags_and_off_values():
    config = _parse(
        UnlearnConfig,
        *("--method", "ga", "--select-lr", "1e-4", "3e-4", "--stop-forget-recall", "0.2"),
        *("--robust-to", "rtn-w4-g128", "--autocast-bf16", "--unlearn-data", "qa", "--max-grad-norm", "0"),
    )
    assert config.select_lr == [3e-4, 1e-4] and config.robust_to == ["rtn-w4-g128"]
    assert config.autocast_bf16 is True and config.data == "qa" and config.max_grad_norm is None


def test_fields_without_an_option_stay_off_the_command_line():
    flags = {option.flag for option in config_options(UnlearnConfig)}
    assert "--reference-budget-gb" not in flags and "--max-length" not in flags and "--data" not in flags
    assert {"--steps", "--unlearn-data", "--select-lr"} <= flags


@dataclass
class _Toy:
    name: str = field(metadata=option("required: no default"))
    fast: bool = field(default=True, metadata=option("a switch that is on", flag="--slow"))
    kind: str = field(default="b", metadata=option("choices from a function", choices=lambda: ("a", "b")))
    few: int = field(default=1, metadata=option(exclusive="size"))
    many: int | None = field(default=None, metadata=option(exclusive="size"))


def test_required_fields_store_false_switches_callable_choices_and_exclusive_groups(capsys):
    assert _parse(_Toy, "--name", "x", "--slow", "--kind", "a") == _Toy("x", fast=False, kind="a")
    for argv in (
        ["--kind", "a"],
        ["--name", "x", "--kind", "c"],
        ["--name", "x", "--few", "2", "--many", "3"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            _parse(_Toy, *argv)
        assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
