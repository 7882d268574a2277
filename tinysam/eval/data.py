"""What the evaluation tasks read: a COCO-layout dataset (images, instances, detections) and progress."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tinysam.data.toyworld import ToyWorldConfig, generate

T = TypeVar("T")


@dataclass
class CocoLayout:
    """A folder of images with a COCO/LVIS instances file and, optionally, a detector's results file.

    ``toyworld`` is given for the embedded default: the toy world is generated (or reused) first.
    """

    images: str
    annotations: str
    detections: str | None = None
    toyworld: ToyWorldConfig | None = None

    def prepare(self) -> CocoLayout:
        """Generate the toy world when this dataset is the toy world; return self."""
        if self.toyworld is not None:
            generate(self.toyworld)
        return self

    @property
    def images_dir(self) -> Path:
        return Path(self.images)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA when present, else the CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` under a rich progress bar with a count and an ETA."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        yield from bar.track(items, total=total, description=description)
