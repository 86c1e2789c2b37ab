"""Errors a user can act on. Each message names the thing that is wrong and the fix."""


class LatentshiftError(Exception):
    """Base class: the CLI prints these as one line and exits with status 2."""


class ConfigError(LatentshiftError, ValueError):
    """A config key is unknown, mistyped or out of range."""


class ModelLoadError(LatentshiftError):
    """A model folder is missing, malformed, or has weights we refuse to load."""


class StorageError(LatentshiftError):
    """Object storage refused or could not find something (permanent, not retried)."""


class DeviceMemoryError(LatentshiftError):
    """One sample's device work does not fit in the accelerator's memory, even alone."""
