"""Exceptions and warnings raised by immuneage.

Every problem a user can fix (a bad sample sheet, config, data file) raises a
subclass of :class:`InputError`. The CLI catches these once, prints the message
and exits with code 2; anything else is an internal error (exit code 1).
Messages name the culprit (file, row, column, gene, key path) and say what to do.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataFileError",
    "ImmuneageError",
    "ImmuneageWarning",
    "InputError",
    "LockError",
    "SampleSheetError",
]


class ImmuneageError(Exception):
    """Base class of immuneage's errors (exit code 1 unless a subclass says otherwise)."""

    exit_code: int = 1


class InputError(ImmuneageError):
    """A problem with what the user gave: fixable by the user, exit code 2."""

    exit_code = 2


class ConfigError(InputError):
    """The configuration file is malformed or holds an invalid value."""


class SampleSheetError(InputError):
    """The sample sheet is malformed or inconsistent."""


class DataFileError(InputError):
    """A counts file named in the sample sheet cannot be used."""


class LockError(InputError):
    """Another immuneage process holds the output directory."""


class OutputWriteError(ImmuneageError):
    """An output could not be written (disk full, quota, read-only file system ...).

    Nothing half-written is left: artifacts are renamed into place only once
    complete, and stages finished before the failure keep their stamps, so the
    same command resumes once the cause is fixed.
    """


class ImmuneageWarning(UserWarning):
    """A problem immuneage works around; recorded in the run's provenance."""
