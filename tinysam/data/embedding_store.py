"""A sharded, verified, resumable store of teacher image embeddings.

Layout of a store folder::

    manifest.json            teacher, checkpoint SHA-256, image size, pixel mean/std, dtype,
                             record shape, count, per-shard SHA-256, tinysam version, complete
    index.json               sample name -> [shard number, row]
    shards/r<rank>-<seq>.npy fixed-size records (N, C, h, w), float16, memory-mappable
    shards/r<rank>-<seq>.json the shard's sample names, per-record CRC32 and SHA-256

A shard is written under a temporary name and renamed when complete; its JSON is
renamed last and is the commit point, so a killed run leaves only whole shards.
Rerunning skips the samples of finished shards. :func:`finalize` merges the shard
JSONs into the index and the manifest. The reader memory-maps shards, returns a
record by name in O(1), checks each record's CRC32, and refuses a store whose
manifest disagrees with the requested teacher or image size, naming the field.

Verify a store: ``python -m tinysam.data.embedding_store verify DIR [--images DIR ...]``.
"""

from __future__ import annotations

import json
import logging
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from tinysam.config import one_line_errors, parse_keys
from tinysam.io import atomic_write, atomic_write_text, file_sha256
from tinysam.version import __version__

log = logging.getLogger(__name__)
FORMAT = "tinysam-embedding-store"
FORMAT_VERSION = 1
MANIFEST, INDEX, SHARDS = "manifest.json", "index.json", "shards"
# The fields a reader may insist on; a store made with other values is refused.
CHECKED_FIELDS = ("teacher", "teacher_checkpoint_sha256", "image_size", "pixel_mean", "pixel_std", "record_shape")


class StoreError(ValueError):
    """An embedding store that cannot be used; one line naming the store, the field and the fix."""


def _crc(record: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(record).view(np.uint8).data)


@dataclass(frozen=True)
class StoreSpec:
    """What the records of a store are: fixed when the store is created, checked on every resume."""

    teacher: str
    teacher_checkpoint_sha256: str
    image_size: int
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    record_shape: tuple[int, ...]
    dtype: str = "float16"
    augmentation: str = "none"

    def to_json(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher,
            "teacher_checkpoint_sha256": self.teacher_checkpoint_sha256,
            "image_size": self.image_size,
            "pixel_mean": list(self.pixel_mean),
            "pixel_std": list(self.pixel_std),
            "record_shape": list(self.record_shape),
            "dtype": self.dtype,
            "augmentation": self.augmentation,
        }


def _mismatch(store: Path, found: dict, wanted: dict, fields: Iterable[str]) -> str | None:
    for key in fields:
        if key in wanted and wanted[key] is not None and found.get(key) != wanted[key]:
            return (
                f"embedding store {store} was made with {key}={found.get(key)!r} but {key}={wanted[key]!r} is "
                "asked for; point to the matching store or recompute it (python precompute.py ...)"
            )
    return None


def read_manifest(store: str | Path) -> dict[str, Any]:
    path = Path(store) / MANIFEST
    if not path.is_file():
        raise StoreError(f"embedding store {store} has no {MANIFEST}; create it with python precompute.py")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StoreError(
            f"embedding store {store}: {MANIFEST} is not valid JSON ({err}); recompute the store"
        ) from None


def open_for_writing(store: str | Path, spec: StoreSpec) -> dict[str, Any]:
    """Create the store folder (or reopen one being written with the same spec); returns its manifest.

    Called by every rank before writing; refuses a folder made for another teacher or size.
    """
    store = Path(store)
    (store / SHARDS).mkdir(parents=True, exist_ok=True)
    wanted = {"format": FORMAT, "version": FORMAT_VERSION, **spec.to_json()}
    if (store / MANIFEST).is_file():
        found = read_manifest(store)
        problem = _mismatch(store, found, wanted, ("format", "version", *CHECKED_FIELDS, "dtype", "augmentation"))
        if problem:
            raise StoreError(problem)
        return found
    manifest = dict(wanted, tinysam_version=__version__, complete=False, count=0, shards=[])
    atomic_write_text(store / MANIFEST, json.dumps(manifest, indent=1))  # ranks racing here write the same text
    return manifest


def finished_shards(store: str | Path) -> list[Path]:
    """JSON files of the shards that were completely written, in name order."""
    return sorted(p for p in (Path(store) / SHARDS).glob("r*-*.json"))


def clean_partial(store: str | Path) -> None:
    """Remove a killed run's leftovers: temporary files and shards whose JSON was never committed.

    Call it before any rank writes (precompute does so on rank 0 before the post-setup barrier).
    """
    shards = Path(store) / SHARDS
    for tmp in shards.glob(".r*"):
        tmp.unlink(missing_ok=True)
    for npy in shards.glob("r*-*.npy"):
        if not npy.with_suffix(".json").is_file():
            npy.unlink(missing_ok=True)


def done_names(store: str | Path) -> set[str]:
    """Names of every sample already in a finished shard."""
    names: set[str] = set()
    for meta in finished_shards(store):
        names.update(json.loads(meta.read_text())["names"])
    return names


class ShardWriter:
    """Buffers one rank's records and writes them as whole shards of ``shard_size`` records."""

    def __init__(self, store: str | Path, rank: int, spec: StoreSpec, shard_size: int = 256) -> None:
        self.dir = Path(store) / SHARDS
        self.rank = rank
        self.spec = spec
        self.shard_size = shard_size
        existing = [int(p.stem.split("-")[1]) for p in self.dir.glob(f"r{rank:03d}-*.json")]
        self.next_seq = max(existing, default=-1) + 1
        self.names: list[str] = []
        self.records: list[np.ndarray] = []
        self.written = 0

    def add(self, name: str, record: torch.Tensor | np.ndarray) -> None:
        array = record.detach().float().cpu().numpy() if isinstance(record, torch.Tensor) else np.asarray(record)
        if tuple(array.shape) != tuple(self.spec.record_shape):
            raise StoreError(f"record {name!r} has shape {array.shape}, the store holds {self.spec.record_shape}")
        self.names.append(name)
        self.records.append(array.astype(self.spec.dtype))
        if len(self.names) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered records as one shard (no-op when empty)."""
        if not self.names:
            return
        stem = f"r{self.rank:03d}-{self.next_seq:05d}"
        data = np.stack(self.records)
        npy = self.dir / f"{stem}.npy"

        def save(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
                np.save(f, data)

        atomic_write(npy, save)
        meta = {"names": self.names, "crc32": [_crc(r) for r in data], "sha256": file_sha256(npy), "count": len(data)}
        atomic_write_text(self.dir / f"{stem}.json", json.dumps(meta))  # the commit point
        self.written += len(self.names)
        self.next_seq += 1
        self.names, self.records = [], []


def finalize(store: str | Path) -> dict[str, Any]:
    """Merge every finished shard into ``index.json`` and mark the manifest complete; returns it."""
    store = Path(store)
    manifest = read_manifest(store)
    index: dict[str, list[int]] = {}
    shards, duplicates = [], 0
    for number, meta_path in enumerate(finished_shards(store)):
        meta = json.loads(meta_path.read_text())
        shards.append({"file": f"{SHARDS}/{meta_path.stem}.npy", "count": meta["count"], "sha256": meta["sha256"]})
        for row, name in enumerate(meta["names"]):
            if name in index:
                duplicates += 1
                continue
            index[name] = [number, row]
    if duplicates:
        log.warning("embedding store %s: %d duplicate records ignored (first copy kept)", store, duplicates)
    atomic_write_text(store / INDEX, json.dumps(index))
    manifest.update(complete=True, count=len(index), shards=shards, duplicates_ignored=duplicates)
    atomic_write_text(store / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


class EmbeddingStore:
    """Read-only access to a finished store: ``store[name]`` is a float32 ``(C, h, w)`` tensor.

    Args:
        path: the store folder.
        teacher: when given, must equal the manifest's teacher name.
        image_size: when given, must equal the manifest's image size.
        teacher_checkpoint_sha256: when given, must equal the manifest's checkpoint hash.
        check_records: verify each record's CRC32 when read (cheap; catches flipped bytes).
    """

    def __init__(
        self,
        path: str | Path,
        teacher: str | None = None,
        image_size: int | None = None,
        teacher_checkpoint_sha256: str | None = None,
        check_records: bool = True,
    ) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest.get("complete"):
            raise StoreError(f"embedding store {self.path} is incomplete; run precompute again to finish it")
        wanted = {"teacher": teacher, "image_size": image_size, "teacher_checkpoint_sha256": teacher_checkpoint_sha256}
        problem = _mismatch(self.path, self.manifest, wanted, wanted)
        if problem:
            raise StoreError(problem)
        self.index: dict[str, list[int]] = json.loads((self.path / INDEX).read_text())
        self.shard_files = [self.path / s["file"] for s in self.manifest["shards"]]
        self.check_records = check_records
        self._arrays: dict[int, np.ndarray] = {}
        self._crcs: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def names(self) -> list[str]:
        return list(self.index)

    def _shard(self, number: int) -> np.ndarray:
        if number not in self._arrays:
            path = self.shard_files[number]
            try:
                self._arrays[number] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise StoreError(
                    f"embedding store {self.path}: shard {path.name} cannot be read ({err}); run "
                    f"python -m tinysam.data.embedding_store verify {self.path} and recompute"
                ) from None
            self._crcs[number] = json.loads(path.with_suffix(".json").read_text())["crc32"]
        return self._arrays[number]

    def record(self, name: str) -> np.ndarray:
        """The raw float16 record of ``name`` (a read-only view into the memory-mapped shard)."""
        if name not in self.index:
            raise KeyError(f"embedding store {self.path} has no record {name!r}; precompute it (or check data=)")
        number, row = self.index[name]
        array = self._shard(number)[row]
        if self.check_records and _crc(array) != self._crcs[number][row]:
            raise StoreError(
                f"embedding store {self.path}: record {name!r} (shard {self.shard_files[number].name}, row {row}) "
                "fails its checksum; run python -m tinysam.data.embedding_store verify and recompute the store"
            )
        return array

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(self.record(name))).float()  # torch converts fp16 6x faster than numpy


@dataclass
class VerifyReport:
    """What :func:`verify` found; ``ok`` when nothing is wrong."""

    records: int = 0
    missing_shards: list[str] = field(default_factory=list)
    corrupt_shards: list[str] = field(default_factory=list)
    corrupt_records: list[str] = field(default_factory=list)
    duplicate_records: list[str] = field(default_factory=list)
    missing_records: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.missing_shards
            or self.corrupt_shards
            or self.corrupt_records
            or self.duplicate_records
            or self.missing_records
            or self.problems
        )

    def lines(self) -> list[str]:
        out = [f"{self.records} records"]
        for label in ("missing_shards", "corrupt_shards", "corrupt_records", "duplicate_records", "missing_records"):
            items = getattr(self, label)
            if items:
                shown = ", ".join(items[:10]) + (f" (+{len(items) - 10} more)" if len(items) > 10 else "")
                out.append(f"{len(items)} {label.replace('_', ' ')}: {shown}")
        return out + self.problems + (["OK"] if self.ok else [])


def verify(store: str | Path, expected_names: Iterable[str] | None = None) -> VerifyReport:
    """Re-hash every shard and record; report missing, duplicate and corrupt records.

    ``expected_names`` (e.g. the dataset's sample names) also reports records that are absent.
    """
    store = Path(store)
    report = VerifyReport()
    manifest = read_manifest(store)
    if not manifest.get("complete"):
        report.problems.append("manifest is not complete: the run did not finish; rerun precompute")
    seen: set[str] = set()
    for entry in manifest.get("shards", []):
        path = store / entry["file"]
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            report.missing_shards.append(entry["file"])
            continue
        if file_sha256(path) != entry["sha256"]:
            report.corrupt_shards.append(entry["file"])
        meta = json.loads(meta_path.read_text())
        try:
            data = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            report.corrupt_records.extend(meta["names"])
            continue
        for row, (name, crc) in enumerate(zip(meta["names"], meta["crc32"])):
            if row >= len(data) or _crc(data[row]) != crc:
                report.corrupt_records.append(name)
            if name in seen:
                report.duplicate_records.append(name)
            seen.add(name)
    report.records = len(seen)
    index = json.loads((store / INDEX).read_text()) if (store / INDEX).is_file() else {}
    unheld = set(index) - seen
    if unheld:
        report.problems.append(f"index lists {len(unheld)} records that no shard holds")
    if expected_names is not None:
        report.missing_records = sorted(set(expected_names) - seen)
    return report


VERIFY_USAGE = "python -m tinysam.data.embedding_store verify STORE [images=DIR | images=[DIR,...]]"


def main(argv: Sequence[str] | None = None) -> int:
    """``verify STORE [images=...]``: re-hash shards and records; report missing, duplicate or corrupt ones
    (with ``images``, SA-1B folders whose samples must all be present). Exit code 1 when anything is wrong."""
    args = parse_keys(
        sys.argv[1:] if argv is None else argv,
        "embedding_store",
        VERIFY_USAGE,
        ("command", "store", "images"),
        required=("command", "store"),
        positional=("command", "store"),
    )
    if args["command"] != "verify":
        raise ValueError(f"embedding_store: unknown command {args['command']!r}; usage: {VERIFY_USAGE}")
    expected = None
    if args.get("images"):
        from tinysam.data.sa1b import find_pairs

        expected = [image.stem for image, _ in find_pairs(args["images"])[0]]
    report = verify(args["store"], expected)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(one_line_errors()(main)())
