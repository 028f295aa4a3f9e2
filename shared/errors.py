"""The two kinds of failure a stage can have.

A ``UserInputError`` is the user's to fix (bad job file, corrupt or unsafe model, a fidelity
gate that was not met): it is never retried and its message is shown to the user as is.
A ``TransientError`` (network, storage, a busy lock) is retried with backoff.
"""

from __future__ import annotations


class ModelyardError(Exception):
    """Base class for every error modelyard raises on purpose."""


class UserInputError(ModelyardError):
    """Something the user supplied is wrong. Never retried; the message names what and why."""


class TransientError(ModelyardError):
    """A failure that may go away on its own (network, storage). Retried with backoff."""


class IntegrityError(TransientError):
    """Downloaded bytes do not match their recorded digest (retried: the next read may be whole)."""


class NotFound(ModelyardError):
    """An object that should exist in the artifact store does not."""


class PreconditionFailed(ModelyardError):
    """A compare-and-swap write lost the race (the object exists or changed)."""


MESSAGE_LIMIT = 300  # characters of a library's complaint quoted in a user-facing message


def one_line(text: object, limit: int = MESSAGE_LIMIT) -> str:
    """Any message (an exception, a tool's output) as one trimmed line, for a job's error."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
