"""Data: tokenizers, document sources and grain pipelines."""
