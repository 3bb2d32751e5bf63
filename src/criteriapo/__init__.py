"""CriteriaPO: preference-tune language models, criteria first."""

__version__ = "0.1.0"
