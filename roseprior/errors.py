"""User-facing errors: each message names the file or key at fault and what to do about it.

Entry points catch ``RosepriorError`` and print its message as one line instead of a traceback.
"""


class RosepriorError(Exception):
    """Base class for problems with the user's input (configs, data, checkpoints)."""


class ConfigError(RosepriorError, ValueError):
    """A config file or override that cannot be used."""


class DataError(RosepriorError, ValueError):
    """Images, folders or manifests that cannot be used."""


class CheckpointError(RosepriorError, ValueError):
    """A checkpoint or weights file that cannot be loaded."""
