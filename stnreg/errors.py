"""Errors about what the user gave (files, shapes, values, settings), as opposed to bugs.

The command line prints an :class:`InputError` as one line naming the file and the problem, and
exits with status 2; the Python API raises it (a ``ValueError``, so ``except ValueError`` still works).
"""

from __future__ import annotations

__all__ = ["DataNotFoundError", "InputError"]


class InputError(ValueError):
    """Input that cannot be used; the message names the input and the problem."""


class DataNotFoundError(InputError, FileNotFoundError):
    """A data path (of a training config, a pairs list...) that does not exist."""
