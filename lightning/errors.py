"""Error types of the package.

Every error we raise on purpose derives from :class:`LightningError`, so a ComfyUI node can catch one type
and show its message to the user unchanged. Messages are written for that user: they name the file or the
value, say what it is, and say what to do instead.

Hierarchy::

    LightningError
     ├─ InvalidInputError (also a ValueError)   a bad argument: wrong shape, too many frames, unknown mode
     └─ ModelFileError                          a file on disk that cannot be used for what was asked
         ├─ MotionModuleFileError               ... as an AnimateDiff motion module
         └─ MotionLoraFileError                 ... as a motion LoRA

A :class:`ModelFileError` also says *why* through ``problem`` (one of the ``PROBLEM_*`` constants), so
callers and tests can tell a truncated file from a wrong kind of model without parsing the message.
Other parts of the package add their own ``ModelFileError`` subclasses for their own file roles.
"""

from __future__ import annotations

import os
from typing import Iterable

PROBLEM_UNREADABLE = "unreadable"  # truncated, corrupt, not a model file, unsafe pickle, unknown extension
PROBLEM_MISSING_FILE = "missing_file"  # no file at that path
PROBLEM_WRONG_KIND = "wrong_kind"  # a real model file, but another kind of model (see ``kind``)
PROBLEM_KEYS = "keys"  # the right kind of file with missing, unexpected or wrongly shaped tensors
PROBLEM_NON_FINITE = "non_finite"  # NaN or Inf in a weight
PROBLEMS = (PROBLEM_UNREADABLE, PROBLEM_MISSING_FILE, PROBLEM_WRONG_KIND, PROBLEM_KEYS, PROBLEM_NON_FINITE)


class LightningError(Exception):
    """Base of every error this package raises deliberately."""


class InvalidInputError(LightningError, ValueError):
    """An argument has a value we cannot work with; the message names it and the accepted values."""


class ModelFileError(LightningError):
    """A file cannot be used for the role the caller asked for.

    Attributes: ``path`` (str or None for in-memory state dicts), ``problem`` (a ``PROBLEM_*`` constant),
    ``kind`` (for wrong-kind files: what the file actually is, e.g. ``"motion_lora"``), and for key
    problems the lists ``missing``, ``unexpected`` and ``mismatched`` (``"key: file shape vs expected"``).
    """

    def __init__(self, message: str, *, path=None, problem: str = PROBLEM_UNREADABLE, kind: str | None = None,
                 missing: Iterable[str] = (), unexpected: Iterable[str] = (), mismatched: Iterable[str] = ()):
        if problem not in PROBLEMS:
            raise ValueError(f"unknown problem {problem!r}; expected one of {PROBLEMS}")
        super().__init__(message)
        self.path = os.fspath(path) if path is not None else None
        self.problem = problem
        self.kind = kind
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class MotionModuleFileError(ModelFileError):
    """A file cannot be loaded as an AnimateDiff (SD1.5) motion module."""


class MotionLoraFileError(ModelFileError):
    """A file cannot be loaded as an AnimateDiff motion LoRA."""


def describe_source(path) -> str:
    """How messages name a file: its path in quotes, or a note that the weights came from memory."""
    return f"'{os.fspath(path)}'" if path is not None else "the given state dict"
