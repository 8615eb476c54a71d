"""User mistakes: one clear line and a non-zero exit, never a bare traceback.

Library code raises :class:`UserError` for anything the user can fix (an unknown name, missing
data, a wrong checkpoint, a bad value). The entry points catch it, print ``error: <message>`` on
one line to stderr and exit with status 2, before any expensive work has started.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: the message says what was wrong and what to do."""


def unknown_name(kind: str, name: str, valid) -> UserError:
    """The standard error for an unknown choice, listing the valid ones."""
    return UserError(f"unknown {kind} '{name}'; choose one of: {', '.join(sorted(valid))}")
