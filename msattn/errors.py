"""Typed errors. The CLI turns each into one line and an exit code; nothing else catches them."""

from __future__ import annotations


class MsattnError(Exception):
    """Base class of every error msattn reports to users (exit status 1: a runtime failure)."""

    exit_code: int = 1


class UsageError(MsattnError):
    """Bad input from the user: argument, file or value (exit status 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A recipe or override is invalid; the message names the key and the file."""


class DataError(UsageError):
    """A dataset file or folder is missing, corrupt or holds bad values; the message names the file."""


class CheckpointError(UsageError):
    """A checkpoint is missing, corrupt, unsafe or from an incompatible tool/version."""


class DependencyError(MsattnError):
    """An optional dependency is missing; the message says what to install."""


class TrainingError(MsattnError):
    """Training cannot go on (e.g. the loss became NaN); a checkpoint was saved first."""


class ResourceError(MsattnError):
    """Out of memory or disk; the message names the knob to turn."""


class DataCheckError(MsattnError):
    """``check-data`` found errors in a dataset folder (exit status 1); the message sums them up."""
