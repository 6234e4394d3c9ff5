"""Errors a user can act on.

Every problem caused by the user's input (a missing file, a malformed line, a bad option) is raised as a
:class:`RelapseError` with a one-line message. The CLI prints that line and exits with status 2; Python
callers can catch the class. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RelapseError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class DataError(RelapseError):
    """A benchmark folder or data file is missing, malformed or inconsistent."""


class ModelError(RelapseError):
    """A model cannot be loaded, saved or built as asked."""


class ConfigError(RelapseError):
    """An option or configuration value is invalid."""


class WeightsError(ModelError, ConfigError):
    """A model's weight files are damaged or do not fit its config: unreadable, a tensor missing, extra or
    of the wrong shape, or NaN or infinite values.

    Loading such a model would not fail on its own (transformers starts missing tensors at random and
    NaN weights load fine), so relapse refuses it by name. It is a :class:`ModelError` (the model cannot be
    loaded) and a :class:`ConfigError` (the model named is input like any option), so callers catching
    either see it.
    """


class DivergenceError(ConfigError):
    """A run's loss or gradient became NaN or infinite, so its result would be meaningless.

    A :class:`ConfigError` because the settings (most often the learning rate) are what make a run
    diverge; the run stops before the bad step is applied, and nothing is saved.
    """
