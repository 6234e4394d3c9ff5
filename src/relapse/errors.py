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
