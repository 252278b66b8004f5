"""structlog set-up: JSON lines by default, console rendering when stderr is a terminal.

Every call writes an access line, so the chain is kept cheap (bench/profile_embed.py): the
timestamp's date and time are formatted once a second, and lines go out with a plain write
(structlog's WriteLogger) rather than print().
"""

from __future__ import annotations

import logging
import sys
import time

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
            _UtcTimestamp(),
            structlog.processors.dict_tracebacks if log_format == "json" else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def _add(fields: dict):
    def processor(logger, method_name, event_dict):
        return {**fields, **event_dict}

    return processor


class _UtcTimestamp:
    """structlog's TimeStamper(fmt="iso", utc=True) ("2026-12-07T04:35:01.123456Z"), with the
    date and time part formatted once a second instead of a datetime per line."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger, method_name, event_dict):
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second, self._prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event_dict["timestamp"] = f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event_dict
