"""Command implementations that need the training and search stack (registered into the CLI)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def register(sub: argparse._SubParsersAction, add_space_args: Callable, positive_int: Callable) -> None:
    """Add the pretrain / search / report / export / final sub-commands."""
