"""The annotation folder: one SA-1B JSON per image, written atomically under a version check.

``out/<image stem>.json`` is the SA-1B record :class:`~tinysam.data.sa1b.SA1BDataset` reads, each
annotation with its RLE mask, XYWH box, area, prompts (``point_coords``, ``point_labels``, ``box``),
``predicted_iou``, ``category`` and ``source`` (:data:`SOURCES`), plus a top-level ``annotate``
entry holding the image's state. The image is placed beside it (hard link, else copy), so the folder
is training data at every moment.

A save names the version it started from: the SHA-256 of the JSON it read (``""`` when there was
none). Under a file lock held across processes, a save whose version is not the file's current one
is refused, so two tabs (or two servers) never silently overwrite each other. A JSON that is not a
readable annotation of its image (corrupt, foreign, another image's size) is reported and replaced
only with ``replace=True``, and then kept as ``<stem>.json.replaced-<digest>``.
"""

from __future__ import annotations

import fcntl
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from tinysam.data.masks import decode_rle
from tinysam.data.sa1b import BadSample, read_annotations, sa1b_record, write_sa1b
from tinysam.data.transforms import list_images
from tinysam.io import file_sha256
from tinysam.version import __version__

SOURCES = ("manual", "auto", "edited", "imported")  # who made an object: clicks, a generator, both, another tool
STATES = ("not started", "in progress", "done")  # and two errors: "unreadable image", "unreadable annotations"
HEADER = "annotate"  # the record's top-level entry of the image's state
MAX_CATEGORY = 200


class ConflictError(ValueError):
    """A save refused because the file changed since the page read it (or is not ours to replace)."""


class AnnotationError(ValueError):
    """An object that cannot be saved as it is; the message names the image, the object and the field."""


@dataclass(frozen=True)
class ImageEntry:
    """One image of the folder: its file, its size (H, W) or why it cannot be read."""

    path: Path
    size: tuple[int, int] | None
    error: str | None = None

    @property
    def stem(self) -> str:
        return self.path.stem


def image_size(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """(H, W) of an image as the page shows it (EXIF orientation applied), or why it cannot be read."""
    try:
        with Image.open(path) as im:
            im.verify()  # the file's structure (and a PNG's checksums)
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated a quarter turn
                w, h = h, w
        return (h, w), None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        return None, f"unreadable image: {path.name} ({type(err).__name__}: {err}); re-export or remove it"


def version_of(path: Path) -> str:
    """The version a save must name: the SHA-256 of the file's bytes, ``""`` for no file."""
    return file_sha256(path) if path.is_file() else ""


def clean_object(obj: dict[str, Any], size: tuple[int, int], where: str) -> dict[str, Any]:
    """One object from the page (or a generator) as an SA-1B annotation; area and box recomputed from the mask."""
    try:
        rle = obj["segmentation"]
        if list(rle["size"]) != list(size) or not isinstance(rle["counts"], str):
            raise AnnotationError(
                f"{where}: segmentation has size {rle['size']}, the image is {list(size)}; re-decode the object"
            )
        mask = decode_rle(rle)
        points = [[float(x), float(y)] for x, y in obj.get("point_coords") or []]
        labels = obj.get("point_labels")
        labels = [1] * len(points) if labels is None else [int(v) for v in labels]  # a generator's: one positive
        box = obj.get("box")
        box = [float(v) for v in box] if box is not None else None
        category = obj.get("category") or None
        source = obj.get("source", "manual")
        iou = obj.get("predicted_iou")
    except (KeyError, TypeError, ValueError) as err:
        raise AnnotationError(f"{where}: malformed object ({type(err).__name__}: {err})") from None
    if len(labels) != len(points) or any(v not in (0, 1) for v in labels):
        raise AnnotationError(f"{where}: point_labels must be one 0 or 1 per point of point_coords")
    if box is not None and len(box) != 4:
        raise AnnotationError(f"{where}: box must be [x0, y0, x1, y1]")
    if not all(math.isfinite(v) for v in [c for p in points for c in p] + (box or [])):
        raise AnnotationError(f"{where}: point_coords and box must be finite numbers")
    if source not in SOURCES:
        raise AnnotationError(f"{where}: source {source!r} is not one of {', '.join(SOURCES)}")
    if category is not None and (not isinstance(category, str) or len(category) > MAX_CATEGORY):
        raise AnnotationError(f"{where}: category must be text of at most {MAX_CATEGORY} characters")
    ys, xs = mask.nonzero()
    if not len(xs):
        raise AnnotationError(f"{where}: the mask is empty; delete the object or add a click")
    return {
        "segmentation": {"size": [int(size[0]), int(size[1])], "counts": rle["counts"]},
        "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
        "area": len(xs),
        "predicted_iou": None if iou is None else float(iou),
        "point_coords": points,
        "point_labels": labels,
        "box": box,
        "category": category,
        "source": source,
    }


class AnnotationStore:
    """The images of ``images`` and their annotations in ``out``; the only writer of ``out``."""

    def __init__(self, images: str | Path, out: str | Path) -> None:
        self.images_dir, self.out = Path(images), Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, ImageEntry] = {}
        for path in list_images(self.images_dir):
            if path.stem in self.entries:  # a.jpg and a.png would share out/a.json
                self.entries[path.stem] = ImageEntry(
                    self.entries[path.stem].path,
                    None,
                    f"two images share the name {path.stem} ({self.entries[path.stem].path.name}, {path.name}); "
                    "rename one",
                )
                continue
            self.entries[path.stem] = ImageEntry(path, *image_size(path))

    def entry(self, stem: str) -> ImageEntry:
        """The image named ``stem``; a ``KeyError`` for any name not listed (nothing outside the folder is
        reachable)."""
        if stem not in self.entries:
            raise KeyError(f"{stem!r} is not an image of {self.images_dir}")
        return self.entries[stem]

    def json_path(self, stem: str) -> Path:
        return self.out / f"{self.entry(stem).stem}.json"

    def read(self, stem: str, objects: bool = True) -> dict[str, Any]:
        """The image's annotations for the page: version, state, objects, or the error that stops them.

        ``objects=False`` checks the record but not each mask (the listing's quick look; ``objects`` then
        holds the annotations as stored)."""
        entry = self.entry(stem)
        path = self.json_path(stem)
        view: dict[str, Any] = {"stem": stem, "name": entry.path.name, "version": version_of(path), "objects": []}
        if entry.error:
            return dict(view, state="unreadable image", error=entry.error)
        view.update(height=entry.size[0], width=entry.size[1], state="not started", error=None)
        if not path.is_file():
            return view
        try:
            record = read_annotations(path)
            if [record["image"]["height"], record["image"]["width"]] != list(entry.size):
                raise BadSample(
                    f"{path.name} describes a {record['image']['height']}x{record['image']['width']} image, "
                    f"{entry.path.name} is {entry.size[0]}x{entry.size[1]}"
                )
            found = record["annotations"]
            for i, ann in enumerate(found if objects else []):
                obj = clean_object(dict({"source": "imported"}, **ann), entry.size, f"{path.name} annotation {i}")
                found[i] = dict(obj, stability_score=ann.get("stability_score"))
            state = (record.get(HEADER) or {}).get("state", "in progress")
        except (BadSample, AnnotationError, TypeError, KeyError) as err:
            message = f"{path} is not an annotation of {entry.path.name} ({err})"
            return dict(view, state="unreadable annotations", error=f"{message}; saving replaces it (a copy is kept)")
        return dict(view, state=state if state in STATES else "in progress", objects=found)

    def listing(self) -> list[dict[str, Any]]:
        """Every image with its state and object count (for the page's list)."""
        rows = []
        for stem in self.entries:
            view = self.read(stem, objects=False)
            rows.append(
                {k: view.get(k) for k in ("stem", "name", "state", "error")} | {"objects": len(view["objects"])}
            )
        return rows

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's write lock (one writer at a time, across threads and processes)."""
        with open(self.out / ".annotate.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def save(
        self, stem: str, objects: list[dict[str, Any]], version: str, state: str = "in progress", replace: bool = False
    ) -> str:
        """Write the image's objects if the file is still at ``version``; returns the new version.

        ``replace``: the annotator agreed to replace an unreadable or foreign JSON (a copy is kept).
        """
        entry = self.entry(stem)
        if entry.error:
            raise AnnotationError(f"{entry.path.name}: {entry.error}")
        if state not in STATES[1:]:
            raise AnnotationError(f"{entry.path.name}: state must be one of {', '.join(STATES[1:])}")
        annotations = [clean_object(o, entry.size, f"{entry.path.name} object {i}") for i, o in enumerate(objects)]
        path = self.json_path(stem)
        with self.locked():
            current = self.read(stem)
            if current["version"] != version:
                raise ConflictError(
                    f"{path.name} changed since this page read it (saved from another tab or tool); "
                    "reload the image to see the saved version"
                )
            if current["state"] == "unreadable annotations":
                if not replace:
                    raise ConflictError(current["error"].replace("saving replaces it", "confirm to replace it"))
                shutil.copy2(path, path.with_name(f"{path.name}.replaced-{version[:12]}"))
            image_id = list(self.entries).index(stem)
            record = sa1b_record(
                entry.path.name,
                image_id,
                entry.size,
                annotations,
                **{HEADER: {"state": state, "by": f"tinysam {__version__}"}},
            )
            write_sa1b(self.out, record, image_file=entry.path)
            return version_of(path)

    def stale_temporaries(self) -> list[Path]:
        """Temporary files a killed writer left in ``out`` (never read as annotations)."""
        return sorted(p for p in self.out.glob(".*.json.*.tmp") if p.is_file())

    def clean(self) -> int:
        """Remove :meth:`stale_temporaries` (under the lock, so no running save loses its file); returns how many."""
        with self.locked():
            stale = self.stale_temporaries()
            for path in stale:
                os.unlink(path)
        return len(stale)
