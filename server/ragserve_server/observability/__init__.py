"""Per-call records, Prometheus metrics, tracing and log set-up."""
