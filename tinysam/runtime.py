"""Small run-time helpers every layer may use: the device to run on and its CPU features, a progress bar, a
markdown table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA when present, else the CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_features() -> set[str]:
    """The instruction-set flags ``/proc/cpuinfo`` lists for this CPU (empty where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def has_vnni() -> bool:
    """Whether this CPU has VNNI (AVX-512 or AVX), with which onnxruntime's uint8 x int8 kernels are exact."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_features())


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` under a rich progress bar with a count and an ETA."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        yield from bar.track(items, total=total, description=description)


def interleaved_medians(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of a call of each function, after ``warmup`` calls each; the runs are taken in turns (run 1
    of every function, then run 2...), so that the drift of a shared machine hits every function alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[float | str | None]], digits: int = 1) -> str:
    """A markdown table; numbers get ``digits`` decimals and ``None`` prints as ``-``."""

    def cell(value: float | str | None) -> str:
        if value is None:
            return "-"
        return value if isinstance(value, str) else f"{value:.{digits}f}"

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
