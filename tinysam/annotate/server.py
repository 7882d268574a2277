"""The annotation server: the demo's model routes plus the folder's images, annotations and proposals.

Routes besides :class:`~tinysam.demo.server.ModelRoutes`' (``/`` is ``annotate.html`` here):

- ``GET /api/images``: every image with its state; the proposal thresholds; the request limit.
- ``GET /api/images/<stem>/file``: the image's bytes.
- ``GET /api/annotations/<stem>`` / ``PUT`` (``{version, state, objects, replace}``): read / save, 409 when stale.
- ``POST /api/propose/<stem>`` (``{pred_iou_thresh, stability_score_thresh}``): proposed objects, not saved.
- ``POST /api/propose-all`` (the same body) starts proposals for every image not started, saved as
  ``source: auto``; ``GET /api/propose-all`` reports its progress.

Only names of the listed images are reachable, and only ``out`` is written.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tinysam.annotate.propose import Proposer
from tinysam.annotate.store import AnnotationError, AnnotationStore, ConflictError
from tinysam.data.transforms import ImageError, load_image
from tinysam.demo.bundle import Bundle
from tinysam.demo.server import LocalServer, ModelRoutes, error, file_response, read_body, web_app

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 64 << 20  # a save of ~1000 full-HD masks; ``max_request_mb=`` changes it
SMALL_REQUEST_BYTES = 4096


class FolderJob:
    """Proposals for every image not started, run in a background thread; ``status`` is its progress."""

    def __init__(self, store: AnnotationStore, proposer: Proposer) -> None:
        self.store, self.proposer = store, proposer
        self.status: dict[str, Any] = {"running": False, "done": 0, "total": 0, "written": 0, "skipped": {}}
        self.thread: threading.Thread | None = None

    def start(self, thresholds: dict[str, float]) -> dict[str, Any]:
        if self.status["running"]:
            return self.status
        stems = [s for s, e in self.store.entries.items() if not e.error and not self.store.json_path(s).exists()]
        self.status = {"running": True, "done": 0, "total": len(stems), "written": 0, "skipped": {}}
        self.thread = threading.Thread(target=self.run, args=(stems, thresholds), daemon=True)
        self.thread.start()
        return self.status

    def run(self, stems: list[str], thresholds: dict[str, float]) -> None:
        skipped = self.status["skipped"]
        for stem in stems:
            try:
                objects = self.proposer.propose(load_image(self.store.entry(stem).path), **thresholds)
                self.store.save(stem, objects, version="")
                self.status["written"] += 1
            except (ImageError, FileNotFoundError, AnnotationError, ConflictError) as err:
                skipped[stem] = str(err)  # an image opened meanwhile keeps what its annotator saved
            self.status["done"] += 1
        self.status["running"] = False
        log.info("proposals: %d of %d images written, skipped %s", self.status["written"], len(stems), skipped)


class AnnotateServer(LocalServer):
    """Serves the annotation page over ``store`` with the model of ``bundle``; ``proposer`` runs the generator."""

    def __init__(
        self,
        bundle: Bundle,
        store: AnnotationStore,
        proposer: Proposer | None,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.store, self.proposer, self.max_request_bytes = store, proposer, max_request_bytes
        self.model = ModelRoutes(bundle, page="annotate.html")
        self.job = FolderJob(store, proposer) if proposer else None
        routes = [
            Route("/api/images", self.images),
            Route("/api/images/{stem}/file", self.image_file, methods=["GET", "HEAD"]),
            Route("/api/annotations/{stem}", self.annotations, methods=["GET", "PUT"]),
            Route("/api/propose/{stem}", self.propose, methods=["POST"]),
            Route("/api/propose-all", self.propose_all, methods=["GET", "POST"]),
        ]
        super().__init__(web_app(routes + self.model.routes()), host, port)

    def _stem(self, request: Request) -> str:
        stem = request.path_params["stem"]
        self.store.entry(stem)  # KeyError (-> 404) for anything not listed
        return stem

    async def images(self, request: Request) -> Response:
        listing = await run_in_threadpool(self.store.listing)
        return JSONResponse(
            {
                "images": listing,
                "thresholds": self.proposer.thresholds if self.proposer else None,
                "max_request_bytes": self.max_request_bytes,
                "out": str(self.store.out),
            }
        )

    async def image_file(self, request: Request) -> Response:
        try:
            return file_response(self.store.entry(self._stem(request)).path, request)
        except KeyError as err:
            return error(404, str(err.args[0]))

    async def annotations(self, request: Request) -> Response:
        try:
            stem = self._stem(request)
        except KeyError as err:
            return error(404, str(err.args[0]))
        if request.method == "GET":
            return JSONResponse(await run_in_threadpool(self.store.read, stem))
        try:
            body = json.loads(await read_body(request, self.max_request_bytes))
            objects, version = body["objects"], body["version"]
            state, replace = body.get("state", "in progress"), bool(body.get("replace", False))
            if not isinstance(objects, list) or not isinstance(version, str):
                raise TypeError("objects must be a list and version a string")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            return error(400, f"a save is JSON {{version, state, objects}}: {type(err).__name__} {err}")
        try:
            new = await run_in_threadpool(self.store.save, stem, objects, version, state, replace)
        except ConflictError as err:
            return error(409, str(err))
        except AnnotationError as err:
            return error(400, str(err))
        return JSONResponse({"version": new, "objects": len(objects), "state": state})

    async def _thresholds(self, request: Request) -> dict[str, float]:
        raw = await read_body(request, SMALL_REQUEST_BYTES)
        body = json.loads(raw) if raw else {}
        if not isinstance(body, dict):
            raise TypeError("the body is a JSON object of thresholds")
        return {k: float(v) for k, v in body.items()}

    async def propose(self, request: Request) -> Response:
        if self.proposer is None:
            return error(404, "proposals need the model in Python: start the server with checkpoint= or quantized=")
        try:
            stem = self._stem(request)
            thresholds = await self._thresholds(request)
            rgb = await run_in_threadpool(load_image, self.store.entry(stem).path)
            objects = await run_in_threadpool(lambda: self.proposer.propose(rgb, **thresholds))
        except KeyError as err:
            return error(404, str(err.args[0]))
        except (ValueError, TypeError, json.JSONDecodeError) as err:  # ImageError is a ValueError
            return error(400, str(err))
        return JSONResponse({"objects": objects, "thresholds": dict(self.proposer.thresholds, **thresholds)})

    async def propose_all(self, request: Request) -> Response:
        if self.job is None:
            return error(404, "proposals need the model in Python: start the server with checkpoint= or quantized=")
        if request.method == "GET":
            return JSONResponse(self.job.status)
        try:
            thresholds = await self._thresholds(request)
            unknown = set(thresholds) - set(self.proposer.thresholds)
            if unknown:
                raise ValueError(f"unknown thresholds {sorted(unknown)}")
        except (ValueError, TypeError, json.JSONDecodeError) as err:
            return error(400, str(err))
        return JSONResponse(self.job.start(thresholds))
