"""Helpers shared by the services: deadlines, enum conversion, tokenization off the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

import grpc

from ragserve.v1 import common_pb2
from ragserve_server.observability import request_record
from ragserve_server.errors import InvalidInput
from ragserve_server.encoding.tokenization import TRUNCATE_END, TRUNCATE_NONE, TRUNCATE_START

T = TypeVar("T")

_TRUNCATE = {
    common_pb2.TRUNCATE_UNSPECIFIED: TRUNCATE_NONE,  # the default: an over-long input is an error
    common_pb2.TRUNCATE_NONE: TRUNCATE_NONE,
    common_pb2.TRUNCATE_END: TRUNCATE_END,
    common_pb2.TRUNCATE_START: TRUNCATE_START,
}


def truncate_mode(value: int) -> str:
    try:
        return _TRUNCATE[value]
    except KeyError:
        raise InvalidInput(f"unknown truncate value {value}; use TRUNCATE_NONE, TRUNCATE_END or TRUNCATE_START") from None


# Served model names are short. A longer one is refused before any error message echoes it:
# a status message of many kilobytes exceeds the caller's metadata limit and arrives as the
# caller's own RESOURCE_EXHAUSTED instead of the answer.
MAX_MODEL_NAME = 128


def requested_model(name: str) -> str:
    """The model name of a request (empty: the default), checked for length."""
    if len(name) > MAX_MODEL_NAME:
        raise InvalidInput(f"model is {len(name)} characters long, more than {MAX_MODEL_NAME}: use a name from ListModels")
    return name


def time_left(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds until the caller's deadline (None: no deadline)."""
    return context.time_remaining()


async def off_loop(executor: Executor, fn: Callable[..., T], *args, inline: bool = False) -> T:
    """Runs CPU work (tokenization) on a worker thread, timed as the "tokenize" stage.

    `inline`: the work is tiny (a short query takes tens of microseconds to tokenize) and runs
    right here on the event loop: handing it to a thread and waking the loop again when it is
    done costs more CPU than the work, and on a busy loop waits longer.
    """
    with request_record.stage("tokenize"):
        if inline:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
