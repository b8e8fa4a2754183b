"""Errors a user can cause.

Anything a user can get wrong (a config key, a file, a checkpoint, a shape) raises
:class:`UserError` with one sentence that says what is wrong and how to fix it. The
CLI prints that sentence to stderr and exits with code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported as one clear sentence (exit code 2)."""

    exit_code = 2

    def __init__(self, message: str):
        message = " ".join(str(message).split())
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
