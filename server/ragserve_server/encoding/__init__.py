"""Encoder-side work: tokenization, length buckets, coalescing, embedding quantisation."""
