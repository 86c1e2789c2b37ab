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


class FileLoadError(ModelLoadError):
    """A file a config key names (a model folder, a CLIP checkpoint, an LPIPS network, a direction)
    failed to load on a Ray actor; the message reads ``key = file: reason; fix``
    (``pipeline.stages.base.loading``)."""
