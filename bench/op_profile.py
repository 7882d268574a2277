"""Where an onnxruntime graph spends its time: operator types from a profile (Chrome trace events), with the
FLOPs of the matrix products and convolutions worked out from the profiled shapes.

Used by ``bench/browser.py --profile`` (onnxruntime-web's profile, read from the page's console) and
``bench/engines.py --profile`` (onnxruntime's, from its JSON file). The profiler adds a fixed cost to every
node, so many small operators read high.
"""

from __future__ import annotations

import math
from collections import defaultdict

PRODUCTS = {"MatMul", "FusedMatMul", "Gemm", "FusedGemm", "MatMulIntegerToFloat", "MatMulInteger"}
CONVOLUTIONS = {"Conv": 1, "FusedConv": 1, "QLinearConv": 3}  # operator: its weight's input


def _shapes(event: dict, key: str) -> list[list[int]]:
    return [next(iter(shape.values()), []) for shape in event["args"].get(key, [])]


def node_flops(event: dict) -> float | None:
    """FLOPs (integer products counted as operations alike) of a profiled node; ``None`` for other operators."""
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


def op_table(events: list[dict]) -> list[tuple[str, float, float, float | None]]:
    """(operator type, ms a run, share of the time, GFLOP a run or ``None``), slowest first, averaged over the
    profile's runs (its ``model_run`` events)."""
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


def print_op_table(title: str, rows: list[tuple[str, float, float, float | None]]) -> None:
    """A markdown table of :func:`op_table`'s rows (those under 1% of the time summed in one line)."""
    total, gflop = sum(r[1] for r in rows), sum(r[3] or 0 for r in rows)
    print(f"\n{title}: {total:.1f} ms a run profiled, {gflop:.2f} GFLOP in products and convolutions\n")
    print("| operator | ms a run | share | GFLOP | GFLOP/s |")
    print("|---|---|---|---|---|")
    shown = [r for r in rows if r[2] >= 0.01]
    for op, t, share, flop in shown:
        rate = f"{flop / t * 1000:.1f}" if flop else "–"
        print(f"| {op} | {t:.2f} | {100 * share:.1f}% | {f'{flop:.3f}' if flop else '–'} | {rate} |")
    rest = rows[len(shown) :]
    if rest:
        rest_ms, rest_share = sum(r[1] for r in rest), sum(r[2] for r in rest)
        print(f"| {len(rest)} other types | {rest_ms:.2f} | {100 * rest_share:.1f}% | – | – |")
