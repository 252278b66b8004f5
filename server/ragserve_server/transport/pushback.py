"""Retry hints on RESOURCE_EXHAUSTED: gRPC's pushback trailer and a google.rpc.RetryInfo.

`grpc-retry-pushback-ms` is what gRPC's own retry policy (the SDK's channel service config)
honours; the `grpc-status-details-bin` trailer carries the same delay as a
google.rpc.Status with a RetryInfo detail, for clients that read rich error details.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2


def retry_trailers(code: grpc.StatusCode, message: str, retry_after: float) -> tuple[tuple[str, str | bytes], ...]:
    millis = max(1, round(retry_after * 1000))
    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=millis // 1000, nanos=(millis % 1000) * 1_000_000))
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return (("grpc-retry-pushback-ms", str(millis)), ("grpc-status-details-bin", status.SerializeToString()))
