"""ASGI guards around the whole app (pure ASGI: no per-request task overhead): the body size limit, enforced on
the stream; the Host check of a loopback server (DNS rebinding); the refusal of cross-origin posts (CSRF);
`X-Content-Type-Options: nosniff` on every response. Their errors are answered by `api.errors`."""

from __future__ import annotations

import contextlib
import logging
import re
from urllib.parse import urlsplit

from api.errors import CrossOriginWrite, ForeignHost, RequestTooLarge, error_response

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class RedactApiKeys(logging.Filter):
    """Blanks `api_key=` query values in access-log lines (old clients and hand-typed URLs may still send them)."""

    PATTERN = re.compile(r"(api_key=)[^&\s\"']*", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 - logging's name
        """Rewrite the record's arguments and message in place; always keep the record."""
        if isinstance(record.args, tuple):
            record.args = tuple(self.PATTERN.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = self.PATTERN.sub(r"\1***", record.msg)
        return True

    @classmethod
    def install(cls, logger_name: str = "uvicorn.access") -> None:
        """Add the filter to uvicorn's access logger once per process."""
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())


def is_loopback(host: str) -> bool:
    """Whether a bind address or Host name only reaches this machine."""
    host = host.strip("[]").lower()
    return host in LOOPBACK_HOSTS or host.startswith("127.") or host.endswith(".localhost")


def _host_name(host_header: str) -> str:
    """The name in a Host header, without its port (IPv6 literals keep no brackets)."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class RequestSizeLimit:
    """413 for a body over the limit: at once from Content-Length, else as soon as the received chunks pass it
    (a chunked upload is never buffered past the limit)."""

    def __init__(self, app, *, max_bytes: int):  # noqa: ANN001 - any ASGI app
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):  # noqa: ANN001 - the ASGI signature
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await error_response(RequestTooLarge(self.max_bytes, int(length)))(scope, receive, send)
            return
        received = 0
        refused: RequestTooLarge | None = None
        started = False

        async def limited_receive():  # noqa: ANN202
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = RequestTooLarge(self.max_bytes)
                    raise refused  # whoever reads the body stops here; the guard answers below
            return message

        async def guarded_send(message):  # noqa: ANN001, ANN202
            nonlocal started
            if refused is not None:
                return  # the app's answer to the broken read (e.g. "error parsing the body") is replaced
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(RequestTooLarge):  # raised by limited_receive, if the app did not catch it
            await self.app(scope, limited_receive, guarded_send)
        if refused is not None and not started:
            response = error_response(refused)
            response.headers["Connection"] = "close"  # the server drops the rest instead of draining it
            await response(scope, receive, send)


class OriginGuard:
    """Refuses what a foreign web page could make a browser send: with `check_host` (a server bound to loopback),
    a Host header that is not a loopback name (DNS rebinding); with `check_origin`, an unsafe method whose Origin
    is not this server's own (cross-site form posts and uploads)."""

    def __init__(self, app, *, check_host: bool, check_origin: bool):  # noqa: ANN001 - any ASGI app
        self.app = app
        self.check_host = check_host
        self.check_origin = check_origin

    def _refusal(self, scope) -> Exception | None:  # noqa: ANN001
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if self.check_host and not is_loopback(_host_name(host)):
            return ForeignHost(
                f"Host {host!r} is not this server's: a server bound to loopback answers only localhost names "
                "(this protects it from DNS rebinding); bind it elsewhere with API keys to serve other names"
            )
        if self.check_origin and scope["method"] not in SAFE_METHODS:
            origin = headers.get(b"origin", b"").decode("latin-1")
            cross_site = headers.get(b"sec-fetch-site", b"") == b"cross-site"
            if cross_site or (origin and urlsplit(origin).netloc.lower() != host.lower()):
                return CrossOriginWrite(
                    f"cross-origin request refused: Origin {origin or '(cross-site)'!r} is not this server "
                    f"({host}); use the page this server serves, or the API without a browser"
                )
        return None

    async def __call__(self, scope, receive, send):  # noqa: ANN001 - the ASGI signature
        if scope["type"] == "http" and (refusal := self._refusal(scope)) is not None:
            await error_response(refusal)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class NoSniff:
    """`X-Content-Type-Options: nosniff` on every response: browsers use the declared type, never a guess."""

    def __init__(self, app):  # noqa: ANN001 - any ASGI app
        self.app = app

    async def __call__(self, scope, receive, send):  # noqa: ANN001 - the ASGI signature
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message):  # noqa: ANN001, ANN202
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-content-type-options"]
                message = {**message, "headers": [*headers, (b"x-content-type-options", b"nosniff")]}
            await send(message)

        await self.app(scope, receive, send_with_header)
