"""Evaluation: perplexity per context length and per position (streaming), generation, plots."""
