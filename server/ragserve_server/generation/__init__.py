"""Generation-side text handling: incremental detokenizing and stop strings."""
