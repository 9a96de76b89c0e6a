"""FastAPI dependencies: the process's services and the API-key check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyCookie, APIKeyHeader

from api.usecases import keys
from api.usecases.context import Services

_header_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key from `omniattr keys create`.")
KEY_COOKIE = "omniattr_key"
_cookie_key = APIKeyCookie(
    name=KEY_COOKIE,
    auto_error=False,
    description="The same key as an HttpOnly same-site cookie set by POST /api/session; read on GET and HEAD "
    "only (it lets <img> tags load media without the key in a URL, and cannot authorise a cross-site post).",
)


async def get_services(request: Request) -> Services:
    """The process's services, opened by the app factory."""
    # async: a sync dependency costs a thread-pool hop on every request
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def require_api_key(
    request: Request,
    services: ServicesDep,
    header_key: Annotated[str | None, Security(_header_key)] = None,
    cookie_key: Annotated[str | None, Security(_cookie_key)] = None,
) -> None:
    """401 unless a live key is given, when the profile requires keys (async: free when keys are off)."""
    if not services.api_keys_required:
        return
    plaintext = header_key or (cookie_key if request.method in ("GET", "HEAD") else None)
    if not plaintext:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "an API key is required: send it as the X-API-Key header (create one with `omniattr keys create NAME`)",
        )
    if not await run_in_threadpool(keys.api_key_is_live, services, plaintext=plaintext):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "this API key is unknown or revoked")
