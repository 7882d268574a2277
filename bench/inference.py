"""Inference speed of the student at 1024 px: every backend next to plain eager PyTorch, one run.

Same weights (the seeded reference weights of the official architecture, ``tests/reference``),
same input. Per backend: encoder latency (median of --runs after a
warm-up), GFLOP/s and its share of this machine's measured fp32 matmul peak, mask-decoder
latency per prompt batch, peak resident memory (each backend in its own process), and the
max abs difference of its embedding from eager's; for the factored decoder, time per prompt by
prompts per chunk (its ``prompt_chunk``).

    python bench/inference.py [--runs 5] [--backends eager,eager_channels_last,factored,compile,onnx] [--device cpu|cuda]
                              [--batches 1,16,64]
    (on cuda, eager and compile also run in bf16 autocast)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "reference" / "tinysam_vit_t_seed0.safetensors"
PROMPT_BATCHES = (1, 16, 64)
PROMPT_CHUNKS = (1, 2, 4, 8, 16, 64)  # the factored decoder's prompts per chunk, timed on the 64-box batch


def build(device: str):
    from tinysam.loader import load_model

    torch.manual_seed(0)
    return load_model("tinyvit_5m", REFERENCE, device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, runs: int, device: str) -> float:
    """Median seconds of ``fn()`` over ``runs`` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(backend: str, device: str, runs: int, onnx_dir: str, batches: tuple[int, ...], queue) -> None:
    """Time one backend in this (child) process and put its results on ``queue``."""
    from tinysam.predictor import Predictor

    torch.set_grad_enabled(False)
    model = build(device)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0)).to(device)
    reference = model.image_encoder(x)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    name, dtype = backend, None
    if backend.endswith("_bf16"):
        name, dtype = backend[: -len("_bf16")], torch.bfloat16
    if name == "eager_channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        name = "eager"
    predictor = Predictor(model, backend=name, onnx_dir=onnx_dir if name == "onnx" else None)
    with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        encoder_s = timed(lambda: predictor.backend.encode(x), runs, device)
        features = predictor.backend.encode(x)
        predictor.set_embedding(features.float(), (1024, 1024))
        decoder_s = {}
        for n in batches:
            boxes = torch.tensor([[100.0, 100.0, 600.0, 700.0]], device=features.device).repeat(n, 1)
            decoder_s[n] = timed(lambda b=boxes: predictor.decode(boxes=b), runs, device)
        chunk_s = {}
        if name == "factored":
            factored, default_chunk = predictor.backend.factored, predictor.backend.factored.prompt_chunk
            for chunk in PROMPT_CHUNKS:
                factored.prompt_chunk = chunk
                chunk_s[chunk] = timed(lambda b=boxes: predictor.decode(boxes=b), runs, device) / len(boxes)
            factored.prompt_chunk = default_chunk
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    diff = float((features.float().to(reference.device) - reference).abs().max())
    memory = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else (peak - base_rss) / 1024
    queue.put(
        {"encoder_s": encoder_s, "decoder_s": decoder_s, "memory_mib": memory, "max_abs_diff": diff, "chunk_s": chunk_s}
    )


def matmul_peak(device: str, n: int = 2048, runs: int = 5) -> float:
    """Measured fp32 matmul throughput of this machine, GFLOP/s."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / timed(lambda: a @ b, runs, device) / 1e9


def encoder_gflop() -> float:
    model = build("cpu")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.image_encoder(torch.randn(1, 3, 1024, 1024))
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--batches", default=",".join(map(str, PROMPT_BATCHES)), help="boxes per decoder call, comma-separated"
    )
    parser.add_argument(
        "--backends", default=None, help="default: eager,eager_channels_last,factored,compile,onnx (cpu)"
    )
    args = parser.parse_args()
    default = (
        "eager,eager_channels_last,factored,compile,onnx"
        if args.device == "cpu"
        else "eager,factored,compile,eager_bf16,compile_bf16"
    )
    backends = (args.backends or default).split(",")
    batches = tuple(int(n) for n in args.batches.split(","))
    gflop = encoder_gflop()
    peak = matmul_peak(args.device)
    ctx = mp.get_context("spawn")
    results = {}
    with tempfile.TemporaryDirectory() as onnx_dir:
        if "onnx" in backends:
            from tinysam.models.onnx_graphs import DECODER, ENCODER, export_decoder, export_encoder

            model = build("cpu")
            export_encoder(model, Path(onnx_dir) / ENCODER)
            export_decoder(model, Path(onnx_dir) / DECODER)
        for backend in backends:
            queue = ctx.Queue()
            proc = ctx.Process(target=measure, args=(backend, args.device, args.runs, onnx_dir, batches, queue))
            proc.start()
            results[backend] = queue.get()
            proc.join()
    eager = results.get("eager", next(iter(results.values())))["encoder_s"]
    threads = torch.get_num_threads()
    print(
        f"tinyvit_5m encoder at 1024 px: {gflop:.1f} GFLOP; {args.device} ({threads} threads) fp32 matmul peak "
        f"{peak:.1f} GFLOP/s; median of {args.runs} runs"
    )
    head = (
        "| backend | encoder ms | speed-up vs eager | GFLOP/s | % of matmul peak | "
        + " | ".join(f"decoder ms ({n} boxes)" for n in batches)
        + " | peak memory MiB | max abs diff vs eager |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, r in results.items():
        rate = gflop / r["encoder_s"]
        cells = [
            f"{1000 * r['encoder_s']:.0f}",
            f"{eager / r['encoder_s']:.2f}x",
            f"{rate:.1f}",
            f"{100 * rate / peak:.0f}%",
        ]
        cells += [f"{1000 * r['decoder_s'][n]:.1f}" for n in batches]
        cells += [f"{r['memory_mib']:.0f}", f"{r['max_abs_diff']:.1e}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if results.get("factored", {}).get("chunk_s"):
        sweep = ", ".join(f"{c}: {1000 * t:.1f}" for c, t in results["factored"]["chunk_s"].items())
        print(f"factored decoder, {batches[-1]} boxes, ms per prompt by prompts per chunk: {sweep}")
    fastest = min((r["encoder_s"], n) for n, r in results.items() if not n.endswith("bf16"))
    print(f"fastest float path: {fastest[1]}, {eager / fastest[0]:.2f}x eager (target >= 2x)")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
