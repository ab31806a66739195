"""The user-facing error types of the engine."""
from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message is the whole story (printed without a traceback)."""
