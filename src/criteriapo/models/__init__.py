"""Models: the embedded default, GGUF conversion, and safe loading of local folders."""

from criteriapo.models.embedded import EMBEDDED, fetch_embedded, find_embedded
from criteriapo.models.loading import ModelSource, load_model, load_tokenizer, resolve_model

__all__ = [
    "EMBEDDED",
    "ModelSource",
    "fetch_embedded",
    "find_embedded",
    "load_model",
    "load_tokenizer",
    "resolve_model",
]
