"""Small run-time helpers every layer may use: the device to run on and its CPU features, a progress bar, a
markdown table."""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
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


PRODUCTS = {"MatMul", "FusedMatMul", "Gemm", "FusedGemm", "MatMulIntegerToFloat", "MatMulInteger"}
CONVOLUTIONS = {"Conv": 1, "FusedConv": 1, "QLinearConv": 3}  # operator: its weight's input


def _shapes(event: dict, key: str) -> list[list[int]]:
    return [next(iter(shape.values()), []) for shape in event["args"].get(key, [])]


def node_flops(event: dict) -> float | None:
    """FLOPs (integer products counted as operations alike) of a profiled node as its kernel runs it (the channels a
    blocked layout pads included); ``None`` for other operators."""
    op = event["args"]["op_name"]
    inputs, (out, *_) = _shapes(event, "input_type_shape"), _shapes(event, "output_type_shape") or [[]]
    if op in PRODUCTS:  # A may be transposed (Gemm, FusedMatMul): K is its dimension that the output lacks
        a = inputs[0]
        k = a[-1] if out[-2] == a[-2] else a[-2]
        return 2.0 * math.prod(out) * k
    if op == "ConvTranspose":  # its weight is prepacked, not profiled: kernel = stride (SAM's upscaling), so each
        return 2.0 * math.prod(out) * inputs[0][1]  # output pixel gets one product per input channel
    weight = inputs[CONVOLUTIONS[op]] if op in CONVOLUTIONS and len(inputs) > CONVOLUTIONS[op] else []
    if len(weight) == 4:  # a prepacked weight (onnxruntime's NHWC QLinearConv) is not profiled: unknown
        return 2.0 * math.prod(out) * math.prod(weight[1:])  # (in / groups) x kh x kw products per output
    return None


def operator_times(events: list[dict]) -> list[tuple[str, float, float, float | None]]:
    """Where an onnxruntime graph spends its time, from its profile (Chrome trace events: onnxruntime's JSON file,
    or onnxruntime-web's console output): (operator type, ms a run, share of the time, GFLOP a run or ``None``),
    slowest first, averaged over the profile's runs (its ``model_run`` events). The profiler adds a fixed cost to
    every node, so many small operators read high."""
    runs = sum(1 for e in events if e.get("name") == "model_run") or 1
    ms: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            ms[op] += event["dur"] / 1000 / runs
            node = node_flops(event)
            if node is not None:
                flops[op] += node / 1e9 / runs
    total = sum(ms.values()) or 1.0
    return [(op, t, t / total, flops.get(op)) for op, t in sorted(ms.items(), key=lambda kv: -kv[1])]


def operator_table(title: str, rows: list[tuple[str, float, float, float | None]]) -> str:
    """:func:`operator_times`' rows under a title line with their totals, as a markdown table (types under 1% of
    the time summed in one row)."""
    total, gflop = sum(r[1] for r in rows), sum(r[3] or 0 for r in rows)
    shown, rest = [r for r in rows if r[2] >= 0.01], [r for r in rows if r[2] < 0.01]
    cells = [
        (op, f"{t:.2f}", f"{100 * share:.1f}%", *((f"{flop:.3f}", f"{flop / t * 1000:.1f}") if flop else (None, None)))
        for op, t, share, flop in shown
    ]
    if rest:
        rest_ms, rest_share = sum(r[1] for r in rest), sum(r[2] for r in rest)
        cells.append((f"{len(rest)} other types", f"{rest_ms:.2f}", f"{100 * rest_share:.1f}%", None, None))
    table = markdown_table(("operator", "ms a run", "share", "GFLOP", "GFLOP/s"), cells)
    return f"{title}: {total:.1f} ms a run profiled, {gflop:.2f} GFLOP in products and convolutions\n\n{table}"
