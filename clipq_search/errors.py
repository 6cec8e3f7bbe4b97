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


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters.

    User input quoted in a message (a file's content, a name, a flag) stays
    readable on one line however large or strange it is.
    """
    if isinstance(value, str) and len(value) > 4 * limit:  # repr of a huge string is never needed whole
        value = value[: 4 * limit]
    text = repr(value) if not isinstance(value, (list, dict, tuple, set)) else _short_repr(value, limit)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_repr(value: object, limit: int) -> str:
    """repr of a container without building the whole of a huge or deeply nested one."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxtuple, r.maxset, r.maxstring, r.maxother = 3, 8, 8, 8, 8, limit, limit
    return r.repr(value)


def clip(text: str, limit: int = 80) -> str:
    """``text`` as is, or cut to ``limit`` characters ending in ``...`` (user text quoted in a message)."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
