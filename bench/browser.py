"""The demo page's model latency in headless Chromium (onnxruntime-web, WASM) vs onnxruntime in Python.

    python bench/browser.py [--models toy tinyvit_5m] [--runs 5] [--clicks 20] [--screenshot PATH] [--profile]

For each model, float and W8A8, on one thread and on all cores, side by side in one process:
the encoder (median of ``--runs`` after a warm-up) and the decoder per click (median of ``--clicks``
on one positive click), in the page (``?ep=wasm&threads=N``) and in Python on the same ONNX files.
Each model's decoder runs both ways: SAM's decoder in one graph (``?decoder=full``) and split, its image
half once per image (its time is in the encoder column) and its click half per click (W8A8: unfolded, the
same integer layers); the split rows also time the hover preview's graph (every fourth low-res logit), which
the page runs while the mouse moves.
``toy`` is the shipped toy student (256 px); ``tinyvit_5m`` is the 1024 px student with the
seeded reference weights of ``tests/reference``. The W8A8 models come from ``quantize_model`` with a short scale
search (1 round, 10 candidates, 2 images): the search changes the scales, not the graph or its speed.
Chromium is the system's (``TINYSAM_CHROMIUM`` or on PATH), driven by Playwright.

``--profile`` then times each operator of the per-click graphs in the page on all cores (onnxruntime-web's
profiler, ``?profile=ROLE``): milliseconds per click by operator type, and for the matrix products their
GFLOP and GFLOP/s. The profiler adds a fixed cost to every node, so the small shape operators read high.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tinysam.assets import asset_path
from tinysam.backends import onnx_session
from tinysam.data.toyworld import ToyWorldConfig, generate_image, image_rng
from tinysam.demo import DemoServer, prepare
from tinysam.loader import load_model
from tinysam.models.checkpoint import save_checkpoint
from tinysam.models.onnx_graphs import (
    DECODER,
    DECODER_IMAGE,
    DECODER_PREVIEW,
    DECODER_PROMPT,
    ENCODER,
    POINTS,
    decoder_feed,
    image_side,
)
from tinysam.quant.run import quantize_model
from tinysam.runtime import operator_table, operator_times

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "reference"
SOURCES = {
    "toy": ("tinyvit_toy", asset_path("toy_student.safetensors")),
    "tinyvit_5m": ("tinyvit_5m", REFERENCE / "tinysam_vit_t_seed0.safetensors"),
}


def bundles(name: str, work: Path) -> dict:
    """The float and W8A8 model folders of ``name``, and an image to click on."""
    arch, checkpoint = SOURCES[name]
    if not Path(checkpoint).is_file():
        print(f"{checkpoint} not found: {arch} with seeded random weights (latency only)")
        checkpoint = work / f"{arch}_random.safetensors"
        torch.manual_seed(0)
        save_checkpoint(load_model(arch), checkpoint)
    model = load_model(arch, checkpoint)
    size = model.image_encoder.img_size
    toys = [
        generate_image(image_rng(0, "val", i), ToyWorldConfig(out="unused", image_size=size)).image for i in range(2)
    ]
    quantize_model(model, toys, work / f"{name}_int8", rounds=1, candidates=10, points_per_side=2)
    image = work / f"{name}.png"
    Image.fromarray(toys[0]).save(image)
    return {
        "float": prepare(checkpoint, arch, None, "browser", work / "cache"),
        "W8A8": prepare(None, arch, work / f"{name}_int8", "browser", work / "cache"),
        "image": image,
    }


def median_ms(run, times: int) -> float:
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        run()
        samples.append(1000 * (time.perf_counter() - start))
    return statistics.median(samples)


def python_latency(bundle, threads: int, runs: int, clicks: int, decoder: str) -> tuple[float, float, float | None]:
    """Encoder (with the split decoder's image half), per-click decoder and (split) hover preview milliseconds of
    onnxruntime in Python."""
    meta = bundle.metadata
    size = meta["image_size"]
    encoder = onnx_session(bundle.folder / ENCODER, threads)
    x = np.zeros((1, 3, size, size), np.float32)
    encoder.run(None, {"image": x})
    encode_ms = median_ms(lambda: encoder.run(None, {"image": x}), runs)
    embedding = encoder.run(None, {"image": x})[0]
    side = meta["mask_side"]
    feed = decoder_feed(embedding, np.array([[[size / 2, size / 2]]]), np.array([[1]]), None, None, (side, side), side)
    if decoder == "split":
        image_part, prompt_part = (onnx_session(bundle.folder / n, threads) for n in (DECODER_IMAGE, DECODER_PROMPT))
        image_part.run(None, {"image_embeddings": embedding})
        encode_ms += median_ms(lambda: image_part.run(None, {"image_embeddings": embedding}), runs)
        feed = image_side(image_part, embedding) | {key: feed[key] for key in POINTS}
        session, preview = prompt_part, onnx_session(bundle.folder / DECODER_PREVIEW, threads)
        preview.run(None, feed)
        preview_ms = median_ms(lambda: preview.run(None, feed), clicks)
    else:
        session, preview_ms = onnx_session(bundle.folder / DECODER, threads), None
    session.run(None, feed)
    return encode_ms, median_ms(lambda: session.run(None, feed), clicks), preview_ms


@contextmanager
def clicked_page(browser, bundle, image: Path, query: str) -> Iterator:
    """The demo page on ``bundle`` (URL options ``query``) with ``image`` open and one click at its centre."""
    with DemoServer(bundle, port=0) as server:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        try:
            page.goto(f"{server.url}?{query}")
            page.wait_for_selector("body[data-ready=true]", timeout=300_000)
            page.set_input_files("#file", str(image))
            page.evaluate("window.demo.idle()")
            box = page.locator("#view").bounding_box()
            page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
            page.evaluate("window.demo.idle()")
            yield page
        finally:
            page.close()


def browser_latency(
    browser, bundle, image: Path, threads: int, runs: int, clicks: int, screenshot: Path | None, decoder: str
) -> tuple[float, float, float | None]:
    """Encoder (with the split decoder's image half), per-click decoder and (split) hover preview milliseconds in
    the page, WASM with ``threads`` threads."""
    with clicked_page(browser, bundle, image, f"ep=wasm&threads={threads}&decoder={decoder}") as page:
        assert page.evaluate("window.demo.info.split_decoder") or decoder == "full"
        encode_ms = statistics.median(page.evaluate(f"window.demo.timeEncoder({runs})"))
        if decoder == "split":
            encode_ms += statistics.median(page.evaluate(f"window.demo.timeImagePart({runs})"))
        decode_ms = statistics.median(page.evaluate(f"window.demo.timeDecoder({clicks})"))
        preview_ms = None
        if decoder == "split":
            preview_ms = statistics.median(page.evaluate(f"window.demo.timeDecoder({clicks}, true)"))
        if screenshot is not None:
            page.screenshot(path=str(screenshot))
    return encode_ms, decode_ms, preview_ms


def profile_ops(browser, bundle, image: Path, threads: int, clicks: int, role: str, decoder: str) -> list[tuple]:
    """:func:`tinysam.runtime.operator_times` of the page's ``role`` decoder over ``clicks`` runs, from
    onnxruntime-web's profile printed to the console."""
    lines: list[str] = []
    query = f"ep=wasm&threads={threads}&decoder={decoder}&profile={role}"
    with clicked_page(browser, bundle, image, query) as page:
        page.on("console", lambda message: lines.extend(message.text.splitlines()))
        page.evaluate(f"window.demo.timeDecoder({clicks}, {str(role == 'preview').lower()})")
        page.evaluate("window.demo.endProfiling()")
        page.wait_for_timeout(1000)  # the console messages arrive after the call returns
        events = [line.strip().rstrip(",") for line in lines if line.lstrip().startswith('{"cat" : "')]
    return operator_times([json.loads(event) for event in events])


def cell(ms: float | None) -> str:
    return "–" if ms is None else f"{ms:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["toy", "tinyvit_5m"], choices=sorted(SOURCES))
    parser.add_argument("--runs", type=int, default=5, help="encoder runs per cell (median)")
    parser.add_argument("--clicks", type=int, default=20, help="decoder runs per cell (median)")
    parser.add_argument("--screenshot", type=Path, help="save the page of the first cell here")
    parser.add_argument("--profile", action="store_true", help="then time the click graphs' operators in the page")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("TINYSAM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("bench/browser.py needs Chromium: apt-get install chromium (or set TINYSAM_CHROMIUM)")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="tinysam-bench-browser-") as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox"] if os.geteuid() == 0 else []
        )
        prepared = {name: bundles(name, Path(tmp)) for name in args.models}
        print(f"\nChromium {browser.version}, onnxruntime-web 1.31.1 (WASM, SIMD), {cores} cores\n")
        print(
            "| model | weights | decoder | threads | encoder, browser (ms) | encoder, Python (ms) | browser / Python | "
            "decoder per click, browser (ms) | decoder, Python (ms) | hover preview, browser (ms) | "
            "hover preview, Python (ms) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
        screenshot = args.screenshot
        for name, models in prepared.items():
            for precision, decoder in (("float", "full"), ("float", "split"), ("W8A8", "full"), ("W8A8", "split")):
                for threads in sorted({1, cores}):
                    bundle = models[precision]
                    enc_web, dec_web, preview_web = browser_latency(
                        browser, bundle, models["image"], threads, args.runs, args.clicks, screenshot, decoder
                    )
                    screenshot = None
                    enc_py, dec_py, preview_py = python_latency(bundle, threads, args.runs, args.clicks, decoder)
                    size = bundle.metadata["image_size"]
                    print(
                        f"| {name} ({size} px) | {precision} | {decoder} | {threads} | {enc_web:.1f} | {enc_py:.1f} | "
                        f"{enc_web / enc_py:.2f}x | {dec_web:.1f} | {dec_py:.1f} | {cell(preview_web)} | "
                        f"{cell(preview_py)} |",
                        flush=True,
                    )
        if args.profile:
            for name, models in prepared.items():
                for precision, role, decoder in (
                    ("float", "prompt", "split"),
                    ("float", "preview", "split"),
                    ("W8A8", "prompt", "split"),
                    ("W8A8", "full", "full"),
                ):
                    rows = profile_ops(browser, models[precision], models["image"], cores, args.clicks, role, decoder)
                    print("\n" + operator_table(f"{name}, {precision}, {role} graph, {cores} threads", rows))
        browser.close()


if __name__ == "__main__":
    main()
