"""The demo's HTTP server: the page, onnxruntime-web's files and the model, nothing else.

Every response carries the cross-origin isolation headers (COOP/COEP) that multi-threaded
WebAssembly needs. Routes are fixed at start: ``/`` (the page), ``/static/<file>`` (the files
shipped in ``tinysam/demo/static``), ``/model/<file>`` (the bundle's ONNX files),
``/model/info.json`` (their metadata) and, with ``encoder=server``, ``POST /api/encode``
(a float32 ``(1, 3, S, S)`` input in, the float32 embedding out).
"""

from __future__ import annotations

import errno
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

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
}
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}


def routes(bundle: Bundle) -> dict[str, Path]:
    """URL path -> file, for every file the server may send."""
    table = {"/": STATIC / "index.html"}
    for path in sorted(STATIC.rglob("*")):
        if path.is_file() and path.suffix in CONTENT_TYPES:
            table[f"/static/{path.relative_to(STATIC).as_posix()}"] = path
    table.update({f"/model/{name}": path for name, path in bundle.files().items()})
    return table


class ServerError(ValueError):
    """A server that cannot start where asked; the message is one line naming the address and the fix."""


class DemoServer(ThreadingHTTPServer):
    """Serves one bundle; ``url`` is where the page is.

    ``serve_forever()`` serves in the calling thread; ``with DemoServer(bundle, port=0) as server:``
    serves in a background thread until the block ends (notebooks, tests, benchmarks).
    """

    daemon_threads = True

    def __init__(self, bundle: Bundle, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.bundle = bundle
        self.table = routes(bundle)
        self.info = json.dumps({**bundle.metadata, "encoder": bundle.encoder_mode, "name": bundle.folder.name}).encode()
        self.encode_lock = threading.Lock()
        try:
            super().__init__((host, port), Handler)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ServerError(
                    f"port {port} on {host} is in use; pass port=<another port> (or port=0 for any)"
                ) from None
            raise

    def __enter__(self) -> "DemoServer":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class Handler(BaseHTTPRequestHandler):
    server: DemoServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass  # one line per request would drown the URL; errors still reach the page

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        for key, value in {**ISOLATION, "Content-Type": content_type, "Cache-Control": "no-cache"}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/model/info.json":
            return self._send(200, self.server.info, "application/json")
        target = self.server.table.get(path)
        if target is None:
            return self._error(404, f"{path} is not served here")
        self._send(200, target.read_bytes(), CONTENT_TYPES[target.suffix])

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        bundle = self.server.bundle
        if self.path != "/api/encode" or bundle.encode is None:
            return self._error(404, f"{self.path} is not served here (encoder=server turns /api/encode on)")
        size = bundle.metadata["image_size"]
        expected = 3 * size * size * 4
        length = int(self.headers.get("Content-Length", 0))
        if length != expected:
            return self._error(400, f"/api/encode takes a float32 (1, 3, {size}, {size}) input: {expected} bytes")
        x = np.frombuffer(bytearray(self.rfile.read(length)), np.float32).reshape(1, 3, size, size)
        with self.server.encode_lock:  # one image at a time: the model is not shared between threads
            embedding = np.ascontiguousarray(bundle.encode(x), np.float32)
        self._send(200, embedding.tobytes(), "application/octet-stream")
