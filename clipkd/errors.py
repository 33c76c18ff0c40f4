"""User-facing errors.

Every error a user can fix by hand is a :class:`ClipkdError`: the CLI prints its message on one line
(no traceback unless ``--debug``) and exits non-zero. Messages name the file or key at fault and the fix.
"""

from __future__ import annotations


class ClipkdError(Exception):
    """An error caused by input the user can correct."""


class ConfigError(ClipkdError):
    """A bad config file, key or value."""


class DataError(ClipkdError):
    """A dataset that is missing, laid out wrongly or malformed."""


class ModelError(ClipkdError):
    """Weights or checkpoints that are missing or do not fit the model."""


class TrainingError(ClipkdError):
    """A run that cannot start or had to stop (e.g. a non-finite loss)."""
