"""Error types. Every user-facing error says what was wrong, where, and what to do."""

from __future__ import annotations


class CriteriaPOError(Exception):
    """A mistake in the user's input (data, model, config), reported without a traceback."""


class ConfigError(CriteriaPOError, ValueError):
    """An option has a wrong type or an impossible value."""


class ModelLoadError(CriteriaPOError):
    """A model or tokenizer cannot be found or must not be loaded."""


class DataError(CriteriaPOError):
    """A data file cannot be read at all (missing, unknown extension, not parseable as a whole)."""


class TemplateError(CriteriaPOError):
    """A chat template does not render conversations the way training needs."""


class Interrupted(CriteriaPOError):
    """SIGINT or SIGTERM stopped a run after a step (and a checkpoint, when it has a checkpointer)."""
