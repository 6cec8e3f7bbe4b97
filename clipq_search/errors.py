"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations


class ClipQError(Exception):
    """An error caused by user input (a file, a flag, a dataset).

    The command line prints ``str(error)`` as one line and exits non-zero, with
    no traceback unless ``--debug`` is given. Library callers can catch it.
    """


class ConfigError(ClipQError, ValueError):
    """A configuration value (plan, search space, flag) is invalid."""


class FormatError(ClipQError, ValueError):
    """A file is truncated, corrupted, or not of the expected format."""
