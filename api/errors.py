"""Every error is JSON `{"detail": "..."}` with a status that says whose fault it is; bad input never 500s."""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from store.errors import (
    ConflictError,
    InsufficientStorageError,
    InvalidInputError,
    NotFoundError,
    SchemaVersionError,
    ServiceUnavailableError,
    StoreError,
)

# What a 503 suggests (body `retry_after_s` and the Retry-After header): the broker or another service, or the
# metadata database (down, hung or overloaded; it usually answers again sooner).
SERVICE_RETRY_AFTER_S = 30
DATABASE_RETRY_AFTER_S = 5


class RequestTooLarge(Exception):
    """A request body passed the size limit while it was being received (the guard answers 413)."""

    def __init__(self, max_bytes: int, received: int | None = None):
        self.max_bytes = max_bytes
        self.received = received
        size = f"is {received:,} bytes" if received is not None else "is over the limit"
        super().__init__(
            f"request body {size}; the limit is {max_bytes:,} bytes (OMNIATTR_MAX_REQUEST_BYTES). "
            "Upload fewer or smaller files per request."
        )


class ForeignHost(Exception):
    """A Host header that is not this loopback server's name (DNS rebinding)."""


class CrossOriginWrite(Exception):
    """A write sent by a browser from another site's page (CSRF)."""


STATUS_BY_ERROR: list[tuple[type[Exception], int]] = [
    (NotFoundError, 404),
    (ConflictError, 409),
    (InvalidInputError, 400),
    (InsufficientStorageError, 507),
    (SchemaVersionError, 503),
    (ServiceUnavailableError, 503),
    (TimeoutError, 504),
    (RequestTooLarge, 413),
    (ForeignHost, 400),
    (CrossOriginWrite, 403),
    (DataError, 400),
]


def _detail(error: Exception) -> str:
    if isinstance(error, DataError):  # the database refused a value (NUL in text on PostgreSQL, out of range)
        reason = str(error.orig).splitlines()[0] if error.orig is not None else "invalid value"
        return f"a value was refused by the database: {reason}; remove it or change it"
    return str(error)


def _status_for(error: Exception) -> int:
    for kind, code in STATUS_BY_ERROR:
        if isinstance(error, kind):
            return code
    return 500


def _retry_later(detail: str, retry_after_s: int) -> JSONResponse:
    """A 503 that says when to try again."""
    body = {"detail": detail, "retry_after_s": retry_after_s}
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(retry_after_s)})


def _database_error_response(error: Exception) -> JSONResponse:
    """503 with a retry hint for a database that is down, hung or too slow; 507 for SQLite's disk full."""
    if "disk is full" in str(error):  # sqlite3.OperationalError: database or disk is full
        return JSONResponse(
            {
                "detail": "the database could not write: its disk is full. Free space on the disk that holds "
                "OMNIATTR_DATA_DIR (delete collections or other files), then try again."
            },
            status_code=507,
        )
    return _retry_later(
        "the metadata database is unavailable or did not answer in time "
        f"({error.__class__.__name__}); try again in a few seconds. If it persists, check that the "
        "database server is running and reachable (OMNIATTR_DATABASE_URL).",
        DATABASE_RETRY_AFTER_S,
    )


def error_response(error: Exception) -> JSONResponse:
    """The JSON response for a mapped error, in a route or outside one (the ASGI guards of `api.guards`)."""
    if isinstance(error, ServiceUnavailableError):  # worth a retry: say when
        return _retry_later(str(error), SERVICE_RETRY_AFTER_S)
    return JSONResponse({"detail": _detail(error)}, status_code=_status_for(error))


def _json_safe(value: Any) -> Any:
    """`value` with non-finite floats (NaN, Infinity, 1e999 parsed as inf) as strings: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def install_error_handlers(app: FastAPI) -> None:
    """Map store, database and validation errors to JSON responses with the right status."""

    async def store_error(_request: Request, error: Exception) -> JSONResponse:
        return error_response(error)

    # Only the database's availability errors (server down, connection lost, statement timeout, pool
    # exhausted): an integrity or programming error is a bug and stays a 500 with its traceback.
    async def database_error(_request: Request, error: Exception) -> JSONResponse:
        return _database_error_response(error)

    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(part) for part in e['loc'] if part != 'body')}: {e['msg']}" for e in error.errors()]
        body = {"detail": "; ".join(problems), "errors": _json_safe(jsonable_encoder(error.errors()))}
        return JSONResponse(body, status_code=422)

    async def timeout_error(_request: Request, _error: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": "encoding the query image took too long; the workers may be busy, try again"}, status_code=504
        )

    app.add_exception_handler(StoreError, store_error)
    for database_unavailable in (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError):
        app.add_exception_handler(database_unavailable, database_error)
    app.add_exception_handler(RequestTooLarge, store_error)
    app.add_exception_handler(DataError, store_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(TimeoutError, timeout_error)
