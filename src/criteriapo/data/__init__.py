"""Data in: readers, formats, validation, tokenization."""
