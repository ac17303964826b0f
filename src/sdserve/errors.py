"""Errors a client can see besides invalid input (``kserve.errors.InvalidInput`` -> 400), with
their HTTP answer and gRPC status. They derive from grpc_interceptor's ``GrpcException`` so
KServe's gRPC interceptor maps them to the right status code; their REST answers are in
``server/error_handlers.py``."""

from __future__ import annotations

from grpc import StatusCode
from grpc_interceptor.exceptions import GrpcException


class ServingError(GrpcException):
    http_status = 500

    def __str__(self) -> str:
        return self.details  # the message, as GrpcException keeps it for the gRPC status

    def headers(self) -> dict[str, str]:
        return {}


class QueueFull(ServingError):
    """The queue is at its bound; the client should come back later."""

    http_status = 503
    status_code = StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, max_queue: int, retry_after: int):
        super().__init__(f"server busy: {max_queue} requests are queued; retry after {retry_after} s")
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ShuttingDown(ServingError):
    """The server is draining and takes no new work."""

    http_status = 503
    status_code = StatusCode.UNAVAILABLE

    def __init__(self, message: str = "server is shutting down"):
        super().__init__(message)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class GenerationFailed(ServingError):
    """The pipeline raised while generating this request's batch."""

    http_status = 500
    status_code = StatusCode.INTERNAL


class DeadlineExceeded(ServingError):
    """The request's deadline passed before its images were done."""

    http_status = 504
    status_code = StatusCode.DEADLINE_EXCEEDED


class ImageTooLarge(ServingError):
    """Even one image of this size does not fit in accelerator memory. 507: retrying the same
    request will not help, a smaller size or fewer refiner steps will."""

    http_status = 507
    status_code = StatusCode.RESOURCE_EXHAUSTED


class AdapterUnavailable(ServingError):
    """A LoRA adapter the request names is listed in the store but its weights could not be
    fetched, or are corrupt. 502: the adapter store gave a bad answer; other requests go on."""

    http_status = 502
    status_code = StatusCode.UNAVAILABLE


class Unauthorized(ServingError):
    http_status = 401
    status_code = StatusCode.UNAUTHENTICATED

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}

