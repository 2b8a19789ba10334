"""The exception types of nfnets: what the user can fix, and what a run could not do.

Library modules raise these; the ``nfnets`` command maps the first three to a one-line message
and exit status 2, ``RunFailed`` to a one-line message and exit status 1, and lets every other
exception (a genuine bug) show its traceback.

A path the user names that does not exist raises the builtin ``FileNotFoundError`` (with a
message naming the flag or path), which Python callers expect; the command treats it like the
three types above. The three are also ``ValueError``s, so code written against the earlier
``ValueError``s keeps working.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "DataError", "NFNetsError", "RunFailed", "UsageError"]


class NFNetsError(Exception):
    """Base of the errors nfnets raises on purpose."""


class UsageError(NFNetsError, ValueError):
    """The user asked for something impossible (a bad flag, value or combination)."""


class DataError(NFNetsError, ValueError):
    """The data folder or its contents cannot be used; the message says how to fix it."""


class CheckpointError(NFNetsError, ValueError):
    """A weights or checkpoint file is malformed, unsafe, or does not fit the model."""


class RunFailed(NFNetsError, RuntimeError):
    """A run could not finish (e.g. repeated non-finite losses)."""
