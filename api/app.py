"""The FastAPI app factory (an entry point: it reads settings) and the web page."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from api import schemas
from api.deps import ServicesDep, require_api_key
from api.errors import install_error_handlers
from api.guards import NoSniff, OriginGuard, RedactApiKeys, RequestSizeLimit, is_loopback
from api.routes import collections, generations, images, jobs, search, session
from api.usecases.context import Services, build_services
from omniattr import __version__
from omniattr.settings import Profile, Settings
from store.errors import InvalidInputError

STATIC_DIR = Path(__file__).parent / "static"


def create_app(
    settings: Settings | None = None, *, services: Services | None = None, bind_host: str | None = None
) -> FastAPI:
    """The API and web page; services are opened at start-up from `settings` unless given. `bind_host` is where
    a server will listen (`omniattr up`): off loopback it needs API keys, on loopback Host headers are checked."""
    settings = settings or Settings()
    if bind_host is not None and not is_loopback(bind_host) and not settings.api_keys_required:
        raise InvalidInputError(
            f"refusing to serve on {bind_host} without API keys: anyone who can reach it could read and change "
            "everything; set OMNIATTR_REQUIRE_API_KEYS=true (and create a key with `omniattr keys create NAME`), "
            "or bind to 127.0.0.1"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = services or build_services(settings)
        try:
            yield
        finally:
            if services is None:
                app.state.services.close()

    app = FastAPI(
        title="omniattr",
        version=__version__,
        summary="Search image collections by one visual attribute; generate images that carry it.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    if services is not None:  # given by the caller (tests, fuzzing): usable even without a lifespan
        app.state.services = services
    install_error_handlers(app)
    RedactApiKeys.install()

    app.add_middleware(RequestSizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(
        OriginGuard,
        check_host=bind_host is not None and is_loopback(bind_host),
        check_origin=settings.profile is Profile.embedded,
    )
    app.add_middleware(NoSniff)  # added last: outermost, so the guards' own answers carry it too

    protected = [Depends(require_api_key)]
    for router in (collections.router, images.router, jobs.router, search.router, generations.router, session.router):
        app.include_router(router, dependencies=protected)

    @app.get(
        "/api/health",
        response_model=schemas.HealthPublic,
        tags=["meta"],
        responses={503: {"model": schemas.HealthPublic, "description": "The workers cannot take work."}},
    )
    def health(services_: ServicesDep) -> schemas.HealthPublic | JSONResponse:
        """Liveness and what is running (no key needed); 503 when the workers cannot run jobs (embedded: the
        worker thread is dead or stuck; server: the broker is unreachable or no worker answers a ping)."""
        problem = services_.dispatcher.problem()
        body = schemas.HealthPublic(
            status="ok" if problem is None else "degraded",
            worker=problem or "ok",
            profile=settings.profile.value,
            encoder_version=services_.encoder_info.version,
            generator=services_.generator_plugin,
            version=__version__,
        )
        if problem is not None:
            return JSONResponse(body.model_dump(), status_code=503)
        return body

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
