"""The demo's web server, a Starlette app on uvicorn: the page, onnxruntime-web's files and the model.

Every response carries the cross-origin isolation headers (COOP/COEP) that multi-threaded
WebAssembly needs. Routes are fixed at start: ``/`` (the page), ``/static/<file>`` (the files
shipped in ``tinysam/demo/static``), ``/model/<file>`` (the bundle's ONNX files),
``/model/info.json`` (their metadata) and, with ``encoder=server``, ``POST /api/encode``
(a float32 ``(1, 3, S, S)`` input in, the float32 embedding out). :class:`LocalServer` runs any
such app on one address; the annotation server (:mod:`tinysam.annotate`) adds its routes to these.
"""

from __future__ import annotations

import errno
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tinysam.demo.bundle import Bundle

STATIC = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".wasm": "application/wasm",
    ".onnx": "application/octet-stream",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}


class ServerError(ValueError):
    """A server that cannot start where asked; the message is one line naming the address and the fix."""


class RequestError(ValueError):
    """A request the server refuses; ``status`` is its HTTP status, the message says what to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error(status: int, message: str) -> JSONResponse:
    """A JSON ``{"error": message}`` response."""
    return JSONResponse({"error": message}, status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (whatever Content-Length says)."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > limit:
        raise RequestError(413, f"request of {declared} bytes refused: the limit is {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request refused: its body passes the limit of {limit} bytes")
    return bytes(body)


def file_response(path: Path, request: Request) -> Response:
    """``path``'s bytes with its content type (only the headers for HEAD)."""
    body = path.read_bytes()
    kind = CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
    response = Response(
        b"" if request.method == "HEAD" else body, headers={"Cache-Control": "no-cache"}, media_type=kind
    )
    response.headers["Content-Length"] = str(len(body))
    return response


def static_table(bundle: Bundle, page: str = "index.html") -> dict[str, Path]:
    """URL path -> file, for every file the server may send: ``page`` at ``/``, the static files, the model."""
    table = {"/": STATIC / page}
    for path in sorted(STATIC.rglob("*")):
        if path.is_file() and path.suffix in CONTENT_TYPES:
            table[f"/static/{path.relative_to(STATIC).as_posix()}"] = path
    table.update({f"/model/{name}": path for name, path in bundle.files().items()})
    return table


class ModelRoutes:
    """The routes every page of the model shares: its files, its metadata and the server-side encoder."""

    def __init__(self, bundle: Bundle, page: str = "index.html") -> None:
        self.bundle = bundle
        self.table = static_table(bundle, page)
        self.info = {
            **bundle.metadata,
            "encoder": bundle.encoder_mode,
            "name": bundle.folder.name,
            "split_decoder": bundle.split_decoder,
        }
        self.encode_lock = threading.Lock()

    def routes(self) -> list[Route]:
        """The Starlette routes; a catch-all for files comes last, so that other routes go before it."""
        return [
            Route("/model/info.json", lambda request: JSONResponse(self.info), methods=["GET", "HEAD"]),
            Route("/api/encode", self.encode, methods=["POST"]),
            Route("/{path:path}", self.send_file, methods=["GET", "HEAD"]),
        ]

    async def send_file(self, request: Request) -> Response:
        target = self.table.get(request.url.path)
        if target is None:
            return error(404, f"{request.url.path} is not served here")
        return file_response(target, request)

    async def encode(self, request: Request) -> Response:
        if self.bundle.encode is None:
            return error(404, "/api/encode is not served here (encoder=server turns it on)")
        size = self.bundle.metadata["image_size"]
        expected = 3 * size * size * 4
        body = await read_body(request, expected)
        if len(body) != expected:
            return error(400, f"/api/encode takes a float32 (1, 3, {size}, {size}) input: {expected} bytes")
        x = np.frombuffer(bytearray(body), np.float32).reshape(1, 3, size, size)

        def run() -> bytes:
            with self.encode_lock:  # one image at a time: the model is not shared between threads
                return np.ascontiguousarray(self.bundle.encode(x), np.float32).tobytes()

        return Response(await run_in_threadpool(run), media_type="application/octet-stream")


def isolated(app: Any) -> Any:
    """``app`` with the COOP/COEP headers on every response."""

    async def wrapped(scope: dict, receive: Any, send: Any) -> None:
        async def send_isolated(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.decode().lower() not in _LOWER]
                message = dict(message, headers=headers + [(k.encode(), v.encode()) for k, v in ISOLATION.items()])
            await send(message)

        await app(scope, receive, send_isolated if scope["type"] == "http" else send)

    return wrapped


def web_app(routes: list[Route]) -> Starlette:
    """A Starlette app of ``routes`` that answers a :class:`RequestError` with its status and message."""

    async def refused(request: Request, err: Exception) -> Response:
        return error(getattr(err, "status", 400), str(err))

    return Starlette(routes=routes, exception_handlers={RequestError: refused})


_LOWER = {key.lower() for key in ISOLATION}


class LocalServer:
    """An ASGI app served by uvicorn on ``host:port``, bound at construction (a port in use fails at once).

    ``serve_forever()`` serves in the calling thread until Ctrl-C; ``with server:`` serves in a background
    thread until the block ends (notebooks, tests, benchmarks). ``url`` is where the page is.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 8000) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as err:
            self.socket.close()
            if err.errno == errno.EADDRINUSE:
                raise ServerError(
                    f"port {port} on {host} is in use; pass port=<another port> (or port=0 for any)"
                ) from None
            raise ServerError(f"cannot listen on {host}:{port} ({err.strerror}); pass another host= or port=") from None
        self.socket.listen(128)
        self.server_address = self.socket.getsockname()
        config = uvicorn.Config(isolated(app), log_level="warning", access_log=False, lifespan="off")
        self.uvicorn = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def serve_forever(self) -> None:
        """Serve in this thread until Ctrl-C (uvicorn's own signal handling)."""
        self.uvicorn.run(sockets=[self.socket])

    def server_close(self) -> None:
        """Close the listening socket."""
        self.socket.close()

    def __enter__(self) -> LocalServer:
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uvicorn.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.server_close()


class DemoServer(LocalServer):
    """Serves one bundle to the demo page."""

    def __init__(self, bundle: Bundle, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.model = ModelRoutes(bundle)
        self.bundle, self.table = bundle, self.model.table
        super().__init__(web_app(self.model.routes()), host, port)
