"""The one table mapping archive errors to HTTP status codes, and the error body.

Every DICOMweb route raises ``ArchiveError`` subclasses (or ``HTTPError`` for
protocol-level problems); the app's exception handlers turn them into a JSON body
``{"error": <reason>, "message": <text>}`` with the status below.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from gateway.archive import errors

_STATUS: list[tuple[type[errors.ArchiveError], int]] = [
    (errors.NotFound, 404),
    (errors.InvalidQuery, 400),
    (errors.InstanceConflict, 409),
    (errors.PatientMismatch, 409),
    (errors.NotAuthorized, 403),
    (errors.InvalidDataset, 400),
    (errors.StorageUnavailable, 503),
    (errors.IndexUnavailable, 503),
]


class HTTPError(Exception):
    """A protocol-level refusal (bad media type, size limit, malformed request)."""

    def __init__(
        self,
        status: int,
        message: str,
        reason: str = "bad-request",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.headers = headers


def status_for(exc: errors.ArchiveError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(reason: str, message: str) -> dict[str, str]:
    return {"error": reason, "message": message}


async def archive_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ArchiveError)
    status = status_for(exc)
    headers = {"Retry-After": "30"} if exc.retryable else None
    return JSONResponse(error_body(exc.reason, str(exc)), status_code=status, headers=headers)


async def index_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """A database error while answering: the index is unavailable, try again later."""
    return JSONResponse(
        error_body("index-unavailable", f"index unavailable: {exc.__class__.__name__}"),
        status_code=503,
        headers={"Retry-After": "30"},
    )


async def http_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPError)
    return JSONResponse(
        error_body(exc.reason, str(exc)), status_code=exc.status, headers=exc.headers
    )
