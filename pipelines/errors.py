"""User-facing errors: each names the field, file, column or row at fault; the CLI exits 2 on them."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, data, paths). Printed without a traceback; exit code 2."""


class ConfigError(UserError):
    """The pipeline YAML or an override is invalid."""


class DataError(UserError):
    """A dataset is missing, empty, or has wrong columns or values."""


class TrainingError(UserError):
    """Training diverged (NaN/inf) or an invariant failed; the last good checkpoint is kept."""


class RewardError(UserError):
    """A reward cannot be loaded, raised, or returned a wrong-length, non-numeric or non-finite result."""
