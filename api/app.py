"""The FastAPI app factory (an entry point: it reads settings) and the web page."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from api import schemas
from api.deps import ServicesDep, require_api_key
from api.errors import install_error_handlers
from api.routes import collections, generations, images, jobs, search
from api.services import Services, build_services
from omniattr import __version__
from omniattr.settings import Settings

STATIC_DIR = Path(__file__).parent / "static"


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

    @app.middleware("http")
    async def limit_request_size(request: Request, call_next):  # noqa: ANN001, ANN202 - Starlette's signature
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_request_bytes:
            return JSONResponse(
                {"detail": f"request body is {int(length):,} bytes; the limit is {settings.max_request_bytes:,}. "
                           "Upload fewer or smaller files per request."},
                status_code=413,
            )
        return await call_next(request)

    protected = [Depends(require_api_key)]
    for router in (collections.router, images.router, jobs.router, search.router, generations.router):
        app.include_router(router, dependencies=protected)

    @app.get("/api/health", response_model=schemas.HealthPublic, tags=["meta"])
    def health(services_: ServicesDep) -> schemas.HealthPublic:
        """Liveness and what is running (no key needed)."""
        return schemas.HealthPublic(status="ok", profile=settings.profile.value,
                                    encoder_version=services_.encoder_info.version,
                                    generator=services_.generator_plugin, version=__version__)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
