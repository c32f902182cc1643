"""The service's one error hierarchy and the one table that maps it to HTTP statuses and OpenAI error types.

Engine and routes raise these; a single exception handler (service.app) renders them. Index-store errors are
translated here too, so no handler ever picks a status code itself.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base: a message for the caller and the request field it concerns (`param`, may be None)."""

    code = "internal_error"

    def __init__(self, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class InvalidInputError(ServiceError):
    code = "invalid_input"


class BadRequestError(ServiceError):
    code = "bad_request"


class UnsupportedError(ServiceError):
    """The request is valid but the model cannot serve it (e.g. clusters from a `clip` bundle)."""

    code = "unsupported"


class AuthenticationError(ServiceError):
    code = "invalid_api_key"


class PermissionDeniedError(ServiceError):
    code = "insufficient_scope"


class NotFoundError(ServiceError):
    code = "not_found"


class MethodNotAllowedError(ServiceError):
    code = "method_not_allowed"


class ConflictError(ServiceError):
    code = "conflict"


class PayloadTooLargeError(ServiceError):
    code = "too_large"


class OverloadedError(ServiceError):
    code = "overloaded"


class RequestTimeoutError(ServiceError):
    code = "timeout"


class UnavailableError(ServiceError):
    code = "unavailable"


# error class → (HTTP status, OpenAI error type)
ERROR_TABLE: dict[type[ServiceError], tuple[int, str]] = {
    BadRequestError: (400, "invalid_request_error"),
    UnsupportedError: (400, "invalid_request_error"),
    AuthenticationError: (401, "authentication_error"),
    PermissionDeniedError: (403, "permission_error"),
    NotFoundError: (404, "not_found_error"),
    MethodNotAllowedError: (405, "invalid_request_error"),
    ConflictError: (409, "conflict_error"),
    PayloadTooLargeError: (413, "invalid_request_error"),
    InvalidInputError: (422, "invalid_request_error"),
    OverloadedError: (429, "rate_limit_error"),
    UnavailableError: (503, "server_error"),
    RequestTimeoutError: (504, "server_error"),
    ServiceError: (500, "server_error"),
}


def status_of(error: ServiceError) -> tuple[int, str]:
    """HTTP status and OpenAI error type of `error` (the most specific table entry)."""
    for cls in type(error).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[ServiceError]


def openai_body(error: ServiceError) -> dict:
    """`{"error": {...}}` in the OpenAI shape that compat clients parse."""
    _, kind = status_of(error)
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}


def from_index_error(err: Exception, param: str | None = None) -> ServiceError:
    """The service error for an index-store error."""
    from index.errors import (
        CollectionExistsError,
        CollectionNotFoundError,
        InvalidCollectionError,
        ItemNotFoundError,
        ReembedStateError,
    )

    if isinstance(err, CollectionNotFoundError):
        return NotFoundError(str(err), param or "collection")
    if isinstance(err, ItemNotFoundError):
        return NotFoundError(str(err), param or "id")
    if isinstance(err, ReembedStateError):
        return ConflictError(str(err), param or "collection")
    if isinstance(err, CollectionExistsError):
        return ConflictError(str(err), param or "collection")
    if isinstance(err, InvalidCollectionError):
        return InvalidInputError(str(err), param)
    return ServiceError(str(err), param)
