"""structlog set-up: JSON lines by default, console rendering when stderr is a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(log_format: str = "auto", level: str = "info", fields: dict | None = None) -> None:
    """`fields`: added to every line (the worker index under --workers)."""
    if log_format == "auto":
        log_format = "console" if sys.stderr.isatty() else "json"
    renderer = structlog.dev.ConsoleRenderer() if log_format == "console" else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,  # request_id, service, method bound per call
            *([_add(fields)] if fields else []),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks if log_format == "json" else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def _add(fields: dict):
    def processor(logger, method_name, event_dict):
        return {**fields, **event_dict}

    return processor
