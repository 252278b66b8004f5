"""Trace context for outgoing calls: the current OpenTelemetry context as `traceparent`.

Optional: without the `opentelemetry-api` package (or without an active span) calls carry
nothing more. With it, a call made inside a span continues that span's trace in the gateway
(and, through it, in Triton).
"""

from __future__ import annotations

try:
    from opentelemetry import propagate as _propagate
except ImportError:  # tracing is optional
    _propagate = None


def with_trace_context(metadata: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """`metadata` plus the current context's propagation headers (traceparent, tracestate, baggage)."""
    if _propagate is None:
        return metadata
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    return metadata + tuple(carrier.items()) if carrier else metadata
