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
from api.routes import collections, generations, images, jobs, search
from api.usecases.context import Services, build_services
from omniattr import __version__
from omniattr.settings import Settings

STATIC_DIR = Path(__file__).parent / "static"


class RequestSizeLimit:
    """413 for a request whose declared body is over the limit (pure ASGI: no per-request task overhead)."""

    def __init__(self, app, *, max_bytes: int):  # noqa: ANN001 - any ASGI app
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):  # noqa: ANN001 - the ASGI signature
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_bytes:
                response = JSONResponse(
                    {
                        "detail": f"request body is {int(length):,} bytes; the limit is {self.max_bytes:,}. "
                        "Upload fewer or smaller files per request."
                    },
                    status_code=413,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None, *, services: Services | None = None) -> FastAPI:
    """The API and web page; services are opened at start-up from `settings` unless given."""
    settings = settings or Settings()

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

    app.add_middleware(RequestSizeLimit, max_bytes=settings.max_request_bytes)

    protected = [Depends(require_api_key)]
    for router in (collections.router, images.router, jobs.router, search.router, generations.router):
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
