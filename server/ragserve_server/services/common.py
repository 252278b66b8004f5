"""Shared by the services: the API enums' tables (one each), input checks, deadlines, tokenization off the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

import grpc

from ragserve.v1 import common_pb2, embed_pb2, models_pb2
from ragserve_server.observability import request_record
from ragserve_server.errors import InvalidInput
from ragserve_server.encoding.tokenization import TRUNCATE_END, TRUNCATE_NONE, TRUNCATE_START
from ragserve_server.models.catalog import BI_ENCODER, CROSS_ENCODER, EMBEDDING, GENERATION, LLM_RERANKER, MAXSIM

T = TypeVar("T")

_TRUNCATE = {
    common_pb2.TRUNCATE_UNSPECIFIED: TRUNCATE_NONE,  # the default: an over-long input is an error
    common_pb2.TRUNCATE_NONE: TRUNCATE_NONE,
    common_pb2.TRUNCATE_END: TRUNCATE_END,
    common_pb2.TRUNCATE_START: TRUNCATE_START,
}


# Input types: the API's values and the registry's names ("" = none: no prefix).
INPUT_TYPES = {embed_pb2.INPUT_TYPE_UNSPECIFIED: "", embed_pb2.INPUT_TYPE_QUERY: "query", embed_pb2.INPUT_TYPE_PASSAGE: "passage"}
# Model kinds: the registry's names and the API's values (the HTTP front shows the names).
MODEL_KINDS = {
    EMBEDDING: models_pb2.MODEL_KIND_EMBEDDING,
    CROSS_ENCODER: models_pb2.MODEL_KIND_CROSS_ENCODER,
    BI_ENCODER: models_pb2.MODEL_KIND_BI_ENCODER,
    GENERATION: models_pb2.MODEL_KIND_GENERATION,
    # An LLM reranker reads the query and each document together, as a cross-encoder does (the
    # API has no kind of its own for it; its name says which method: models/llm_rerankers.py).
    LLM_RERANKER: models_pb2.MODEL_KIND_CROSS_ENCODER,
    MAXSIM: models_pb2.MODEL_KIND_MAXSIM,
}


def input_type_name(value: int) -> str:
    """The registry's name of an API input type ("" for unspecified)."""
    try:
        return INPUT_TYPES[value]
    except KeyError:
        allowed = ", ".join(f"{embed_pb2.InputType.Name(v)} ({v})" for v in INPUT_TYPES)
        raise InvalidInput(f"input_type {value} is not a known input type; allowed: {allowed}") from None


def check_texts(texts: list[str], max_inputs: int, *, stream_hint: bool = False) -> None:
    """The input list of an Embed or Tokenize call: 1 to `max_inputs` texts, none empty."""
    if not texts:
        raise InvalidInput("inputs is empty: send at least one text")
    if len(texts) > max_inputs:
        hint = "split them over calls or use EmbedStream" if stream_hint else "split them over calls"
        raise InvalidInput(f"too many inputs: {len(texts)} > {max_inputs} per call; {hint}")
    for index, text in enumerate(texts):
        if not text:
            raise InvalidInput(f"input {index} is an empty string")


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
