"""Every error is JSON `{"detail": "..."}` with a status that says whose fault it is; bad input never 500s."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from store.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    SchemaVersionError,
    ServiceUnavailableError,
    StoreError,
)

RETRY_AFTER_S = 30  # what a 503 for an unreachable service suggests (Retry-After)
STATUS_BY_ERROR: list[tuple[type[Exception], int]] = [
    (NotFoundError, 404),
    (ConflictError, 409),
    (InvalidInputError, 400),
    (SchemaVersionError, 503),
    (ServiceUnavailableError, 503),
    (TimeoutError, 504),
]


def _status_for(error: Exception) -> int:
    for kind, code in STATUS_BY_ERROR:
        if isinstance(error, kind):
            return code
    return 500


def install_error_handlers(app: FastAPI) -> None:
    """Map store errors and validation errors to JSON responses with the right status."""

    async def store_error(_request: Request, error: Exception) -> JSONResponse:
        code = _status_for(error)
        if isinstance(error, ServiceUnavailableError):  # worth a retry: say when
            body = {"detail": str(error), "retry_after_s": RETRY_AFTER_S}
            return JSONResponse(body, status_code=code, headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"detail": str(error)}, status_code=code)

    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(part) for part in e['loc'] if part != 'body')}: {e['msg']}" for e in error.errors()]
        body = {"detail": "; ".join(problems), "errors": jsonable_encoder(error.errors())}
        return JSONResponse(body, status_code=422)

    async def timeout_error(_request: Request, _error: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": "encoding the query image took too long; the workers may be busy, try again"}, status_code=504
        )

    app.add_exception_handler(StoreError, store_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(TimeoutError, timeout_error)
