"""User-facing errors: the CLI prints these as one line instead of a traceback."""


class VgclipError(Exception):
    """An error caused by the user's input (a file, a key, a flag), with a message saying how to fix it."""


class ConfigError(VgclipError):
    """An unknown configuration key or a value of the wrong type."""


class WeightsUnavailableError(VgclipError):
    """Pretrained weights could not be found locally nor fetched."""
