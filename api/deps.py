"""FastAPI dependencies: the process's services, a database session, and the API-key check."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, APIKeyQuery
from sqlalchemy.orm import Session

from api.services import Services
from store import metadata

_header_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key from `omniattr keys create`.")
_query_key = APIKeyQuery(name="api_key", auto_error=False, description="The same key, for <img> URLs.")


async def get_services(request: Request) -> Services:
    # async: a sync dependency costs a thread-pool hop on every request
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_session(services: ServicesDep) -> Iterator[Session]:
    """A session whose transaction commits when the route returns without error."""
    with services.session_factory.begin() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_read_session(services: ServicesDep) -> Iterator[Session]:
    """A session for queries only (never waits for writers)."""
    with services.read_session_factory() as session:
        yield session


ReadSessionDep = Annotated[Session, Depends(get_read_session)]


async def require_api_key(
    services: ServicesDep,
    header_key: Annotated[str | None, Security(_header_key)] = None,
    query_key: Annotated[str | None, Security(_query_key)] = None,
) -> None:
    """401 unless a live key is given, when the profile requires keys (async: free when keys are off)."""
    if not services.api_keys_required:
        return
    plaintext = header_key or query_key
    if not plaintext:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "an API key is required: send it as the X-API-Key header (create one with `omniattr keys create NAME`)",
        )
    if not await run_in_threadpool(_key_is_live, services, plaintext):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "this API key is unknown or revoked")


def _key_is_live(services: Services, plaintext: str) -> bool:
    with services.session_factory.begin() as session:
        return metadata.verify_api_key(session, plaintext=plaintext) is not None
