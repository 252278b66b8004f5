"""OpenTelemetry traces: a span per call, child spans per stage, the context carried to Triton.

Off by default (`--tracing off`) and then free: every hook below is one check of a module
global. `--tracing on` builds an SDK TracerProvider configured by the standard variables,
read by the SDK itself:

    OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT   where spans go (OTLP gRPC, default localhost:4317)
    OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES                        who sent them (default service.name ragserve-gateway)
    OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG                        e.g. parentbased_traceidratio 0.1
    OTEL_TRACES_EXPORTER                                               otlp (default), console, or none
    OTEL_PROPAGATORS                                                   default tracecontext,baggage
    OTEL_SDK_DISABLED=true                                             off, whatever --tracing says

Spans: the call (`ragserve.v1.Embed/Embed` for gRPC, `POST /v1/embeddings` for HTTP, kind
SERVER, a child of the caller's `traceparent`), and inside it one span per stage of
request_record.stage: `admission`, `tokenize`, `triton`, `respond`. Each Triton request
carries the current context as `traceparent` metadata, so a Triton started with
`--trace-config mode=opentelemetry` (the launcher's `--triton-trace-url`) adds its own spans
(the request, the model with its QUEUE_START event, `compute`) under the `triton` stage.

A request the gateway's coalescer joined from several calls belongs to none of their traces:
it gets its own span, `ragserve.coalesced_request`, the root of a new trace with a link to
each caller's `triton` stage (OpenTelemetry's way to show fan-in), and Triton's spans of that
request are its children.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from collections.abc import Iterator, Mapping

from ragserve_server.observability import request_record

TRACING_MODES = ("off", "on")
_tracer = None  # an opentelemetry Tracer while tracing is on
_provider = None


def enabled() -> bool:
    return _tracer is not None


def sdk_disabled(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def configure(mode: str, env: Mapping[str, str] | None = None) -> bool:
    """Turns tracing on from the settings and the OTEL_* variables; returns whether it is on."""
    if mode not in TRACING_MODES:
        raise ValueError(f"--tracing {mode!r}: use off or on")
    env = os.environ if env is None else env
    if mode == "off" or sdk_disabled(env):
        return False
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    exporters = [e.strip() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()]
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or "ragserve-gateway"}).merge(
        OTELResourceDetector().detect()
    )
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    for name in exporters:
        if name == "none":
            continue
        if name == "console":
            exporter = ConsoleSpanExporter()
        elif name == "otlp":
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
            if protocol != "grpc":
                raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r}: the gateway exports OTLP over gRPC only (grpc)")
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()  # endpoint, headers, TLS and timeout from OTEL_EXPORTER_OTLP_*
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER {name!r}: use otlp, console or none")
        provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)
    return True


def install(provider) -> None:
    """Traces with `provider` (tests pass one with an in-memory exporter); None turns tracing off."""
    global _tracer, _provider
    _provider = provider
    _tracer = None if provider is None else provider.get_tracer("ragserve_server")
    request_record.stage_span = None if provider is None else _stage_span


def shutdown() -> None:
    """Flushes and stops the exporters (at the end of main)."""
    provider = _provider
    install(None)
    if provider is not None:
        provider.shutdown()


def start_call(name: str, record, carrier: Mapping[str, str] | None):
    """Starts the call's span as the current span (a child of the carrier's traceparent);
    returns what `end_call` needs."""
    from opentelemetry import context, propagate, trace

    parent = propagate.extract(carrier) if carrier else None
    span = _tracer.start_span(
        name,
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={"rpc.service": f"ragserve.v1.{record.service}", "rpc.method": record.method, "ragserve.request_id": record.request_id},
    )
    token = context.attach(trace.set_span_in_context(span, parent))
    return span, token


def end_call(started, code: str, message: str) -> None:
    from opentelemetry import context, trace

    span, token = started
    span.set_attribute("rpc.grpc.status_code_name", code)
    if code not in ("OK", "CANCELLED"):
        span.set_status(trace.Status(trace.StatusCode.ERROR, message or code))
    span.end()
    try:
        context.detach(token)
    except ValueError:  # ended in another context than it started in (a stream closed elsewhere)
        pass


@contextmanager
def _stage_span(name: str) -> Iterator[None]:
    with _tracer.start_as_current_span(name, end_on_exit=True, record_exception=False, set_status_on_exception=False):
        yield


def current_span_context():
    """The current span's context, for a later link to it (None while tracing is off)."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    found = trace.get_current_span().get_span_context()
    return found if found.is_valid else None


@contextmanager
def joined_request_span(callers: list) -> Iterator[None]:
    """The span of a request that carries several calls (`callers`: their span contexts, from
    current_span_context): a new trace, linked to each caller, current while it is sent."""
    if _tracer is None:
        yield
        return
    from opentelemetry import context, trace

    links = [trace.Link(c) for c in callers if c is not None]
    with _tracer.start_as_current_span(
        "ragserve.coalesced_request",
        context=context.Context(),  # a root: the request is no one caller's child
        kind=trace.SpanKind.CLIENT,
        links=links,
        attributes={"ragserve.joined_calls": len(callers)},
    ):
        yield


def outgoing_metadata() -> tuple[tuple[str, str], ...] | None:
    """The current context as gRPC metadata for a Triton call (None while tracing is off)."""
    if _tracer is None:
        return None
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items()) or None
