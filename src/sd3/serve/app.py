"""The ASGI application: both APIs, the page, the docs, and what guards them.

From the outside in: request bodies are limited in size before anything reads them (413);
CORS only for the origins `--cors` names; with an API key every route but the page, its static
files, the docs and `/v1/health` needs `Authorization: Bearer KEY` (or HTTP Basic with the key
as password, as A1111 clients send it), compared in constant time (401). Refusals the service
raises become JSON errors: 422 naming the field, 429 with Retry-After when the queue is full,
503 while shutting down.
"""

import asyncio
import base64
import binascii
import hmac
import json
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.middleware.cors import CORSMiddleware

from . import a1111, native
from .jobs import QueueFull, ShuttingDown
from .service import RequestError, Service

STATIC = Path(__file__).parent / "static"
PUBLIC = ("/", "/docs", "/openapi.json", "/favicon.ico", "/v1/health")
PUBLIC_PREFIXES = ("/static/", "/docs-static/")
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def create_app(service: Service, api_key: str | None = None, cors: list[str] = ()):
    @asynccontextmanager
    async def lifespan(app):
        service.hub.bind(asyncio.get_running_loop())
        yield
        service.shutdown()
        await asyncio.to_thread(service.close, service.shutdown_grace + 5)

    app = FastAPIOffline(
        title="sd3",
        summary="Stable Diffusion 3 / 3.5: sd3's native API and the AUTOMATIC1111 API",
        lifespan=lifespan,
        redoc_url=None,
        static_url="/docs-static",
    )
    app.include_router(native.router(service))
    app.include_router(a1111.router(service))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(
            STATIC / "index.html",
            headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"},
        )

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError):
        loc = ["body", *e.field.split(".")] if e.field else ["body"]
        return JSONResponse(
            {"detail": [{"type": "value_error", "loc": loc, "msg": str(e)}]}, status_code=422
        )

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull):
        seconds = service.queue.retry_after()
        return JSONResponse(
            {"detail": f"the queue is full ({service.limits.max_queue} jobs); retry later"},
            status_code=429,
            headers={"Retry-After": str(seconds)},
        )

    @app.exception_handler(ShuttingDown)
    async def shutting_down(request: Request, e: ShuttingDown):
        return JSONResponse({"detail": "the server is shutting down"}, status_code=503)

    guarded = app
    if api_key:
        guarded = RequireKey(guarded, api_key)
    if cors:
        guarded = CORSMiddleware(
            guarded,
            allow_origins=list(cors),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return LimitBody(SecurityHeaders(guarded), service.limits.max_body)


async def send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class BodyTooLarge(Exception):
    pass


class LimitBody:
    """413 for a body over `max_bytes`: by its Content-Length at once, else as it arrives."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await send_json(send, 413, self.message())
        received, too_large, started = 0, False, False

        async def limited_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message):
            nonlocal started
            if too_large:
                return  # the app's answer to the broken body; ours follows
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            pass
        if too_large and not started:
            await send_json(send, 413, self.message())

    def message(self) -> dict:
        return {
            "detail": f"the request body is larger than this server takes ({self.max_bytes} bytes)"
        }


class RequireKey:
    """Every route outside PUBLIC needs the key: Bearer, or Basic with it as the password."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    def allowed(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, value = header.partition(b" ")
        given = b""
        if scheme.lower() == b"bearer":
            given = value.strip()
        elif scheme.lower() == b"basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                given = b""
        return hmac.compare_digest(given, self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path in PUBLIC or path.startswith(PUBLIC_PREFIXES) or self.allowed(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await send_json(
            send,
            401,
            {"detail": "this server needs its API key: Authorization: Bearer KEY"},
            [(b"www-authenticate", b'Bearer realm="sd3"')],
        )


class SecurityHeaders:
    """nosniff and no referrer on every answer."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                ]
            await send(message)

        await self.app(scope, receive, with_headers)
