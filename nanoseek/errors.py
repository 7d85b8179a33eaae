"""The errors nanoseek raises on purpose: each message says what is wrong and how to fix it.

The CLI prints them as one line and exits with code 2; the server turns them into 4xx JSON bodies.
"""


class NanoseekError(Exception):
    """Base class for every error a user can act on."""


class ConfigError(NanoseekError):
    """A model config or recipe is missing, malformed or unsupported."""


class CheckpointError(NanoseekError):
    """A checkpoint directory cannot be read or does not match its config."""
