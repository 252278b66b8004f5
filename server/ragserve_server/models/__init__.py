"""Every fact about a model: the registry schema, built-in entries, catalog, Triton configs."""
