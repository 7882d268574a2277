"""Inference engines side by side on this CPU: PyTorch, onnxruntime and OpenVINO, float, BF16 and INT8.

    python bench/engines.py [--runs 5] [--prompts 16] [--no-compile] [--profile]

One process, the same ``tinyvit_5m`` (the seeded reference weights of ``tests/reference``) and the same
1024 px photo for every row, the runs of all rows taken in turns. The encoder: median of ``--runs`` after
two warm-up runs, its GFLOP/s and
share of this machine's measured fp32 (or int8) matmul peak, and the max abs difference of its embedding
from eager PyTorch's. The decoder: ms per prompt for ``--prompts`` point prompts a call (SAM's ONNX
decoder graph, or PyTorch's decoders on the eager embedding) and the IoU of its masks with eager's.
INT8 is the W8A8 model ``quantize_model`` writes (min-max, calibrated on the other shipped photo): its
``encoder.onnx`` / ``decoder.onnx`` run in onnxruntime and, read from the same files, in OpenVINO; one more
row has integer linear layers only (no requantized convolution, no integer GELU: :data:`LINEAR_ONLY`).
OpenVINO runs when the ``openvino`` package is installed; BF16 rows only where the CPU has ``avx512_bf16``.
The header names the CPU and its features (AVX2, AVX-512, VNNI, BF16, AMX).

The accuracy part prices each route in mIoU on the toy world: the shipped distilled toy student's
encoder run by each engine and precision (INT8: ``quantize_model``, min-max on 4 training images),
SAM's decoder in PyTorch on its embedding, box and one-click prompts on 16 validation images, mIoU
against the ground truth and against the float model.

``--profile`` then times each operator type of onnxruntime's float and INT8 encoders (``--runs`` runs, the
first included), with the GFLOP and GFLOP/s of their matrix products and convolutions.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from tinysam import Predictor, load_model
from tinysam.assets import photos
from tinysam.backends import onnx_session
from tinysam.data.transforms import load_image, model_input
from tinysam.models.onnx_graphs import DECODER, ENCODER, decoder_feed, export_decoder, export_encoder
from tinysam.quant.run import quantize_model
from tinysam.runtime import cpu_features, has_vnni, interleaved_medians, operator_table, operator_times

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "reference" / "tinysam_vit_t_seed0.safetensors"
# INT8 where the speed is: the linear layers alone, every convolution and GELU float
LINEAR_ONLY = {"method": "minmax", "requantize": (), "integer_gelu": ()}
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_header() -> tuple[str, set[str]]:
    """The CPU's model name and which of :data:`FEATURES` ``/proc/cpuinfo`` lists."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    return name, set(FEATURES) & cpu_features()


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    return interleaved_medians({"fn": fn}, runs, warmup=2)["fn"]


def peaks(runs: int, n: int = 2048) -> tuple[float, float]:
    """Measured fp32 and int8 (``torch._int_mm``) matmul throughput, GFLOP/s and GOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    qa, qb = torch.randint(-128, 128, (n, n), dtype=torch.int8), torch.randint(-128, 128, (n, n), dtype=torch.int8)
    ops = 2 * n**3 / 1e9
    return ops / median_seconds(lambda: a @ b, runs), ops / median_seconds(lambda: torch._int_mm(qa, qb), runs)


def openvino_model(path: Path, precision: str):
    """``path`` compiled by OpenVINO for the CPU with ``precision`` as its inference precision hint."""
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY"}
    return core.compile_model(core.read_model(str(path)), "CPU", config)


def toy_accuracy(has_openvino: bool, bf16: bool, tmp: Path) -> None:
    """Box and 1-click mIoU (vs GT, vs float) of the toy student with its encoder run by each route."""
    from tinysam.assets import asset_path
    from tinysam.data.layouts import CocoLayout
    from tinysam.data.toyworld import ToyWorldConfig, generate
    from tinysam.data.transforms import list_images
    from tinysam.eval.prompt_miou import image_ious

    world = generate(ToyWorldConfig(out=str(tmp / "toy"), n_train=4, n_val=16, seed=0))
    checkpoint = asset_path("toy_student.safetensors")
    model = load_model("tinyvit_toy", checkpoint)
    export_encoder(model, tmp / "toy_float.onnx")
    with torch.inference_mode(False), torch.enable_grad():
        calibration = [load_image(p) for p in list_images(world / "train")]
        quantize_model(load_model("tinyvit_toy", checkpoint), calibration, tmp / "toy_int8", method="minmax")
        quantize_model(load_model("tinyvit_toy", checkpoint), calibration, tmp / "toy_int8_linear", **LINEAR_ONLY)

    def bf16_autocast(x: np.ndarray) -> np.ndarray:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.image_encoder(torch.from_numpy(x)).float().numpy()

    routes: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "PyTorch fp32": lambda x: model.image_encoder(torch.from_numpy(x)).numpy(),
    }
    for route in ("u8u8", "u8s8", "u8s7"):  # u8s8 is exact only with VNNI: without it, its row shows the saturation
        session = onnx_session(tmp / "toy_int8" / ENCODER, route=route)
        routes[f"onnxruntime int8 {route}"] = lambda x, s=session: s.run(None, {"image": x})[0]
    session = onnx_session(tmp / "toy_int8_linear" / ENCODER)
    routes[f"onnxruntime int8 linear layers only, {session.int8_route}"] = lambda x: session.run(None, {"image": x})[0]
    if bf16:
        routes["PyTorch bf16 autocast"] = bf16_autocast
    if has_openvino:
        for precision in ["f32"] + (["bf16"] if bf16 else []):
            compiled = openvino_model(tmp / "toy_float.onnx", precision)
            routes[f"OpenVINO {precision}"] = lambda x, c=compiled: np.asarray(c({"image": x})[0])
    float_predictor, predictor = Predictor(model), Predictor(model)
    scores: dict[str, dict[str, list[float]]] = {name: {} for name in routes}
    val = CocoLayout(str(world / "val"), str(world / "val" / "instances.json"))
    for _, rgb, gt in val.instances({}):
        float_predictor.set_image(rgb)
        x = model_input(model, rgb)[None].numpy()
        for name, encode in routes.items():
            predictor.set_embedding(torch.from_numpy(encode(x)), rgb.shape[:2])
            for kind, refs in image_ious(predictor, gt, 1, True, float_predictor).items():
                scores[name].setdefault(f"{kind} vs GT", []).extend(refs["gt"].tolist())
                scores[name].setdefault(f"{kind} vs float", []).extend(refs["teacher"].tolist())
    columns = ["box vs GT", "box vs float", "1_click vs GT", "1_click vs float"]
    print("\ntoy student (256 px), encoder by route, SAM's decoder in PyTorch; 16 toy validation images")
    print("| route | " + " | ".join(columns) + " | box vs GT, points lost |")
    print("|---|" + "---|" * (len(columns) + 1))
    base = float(np.mean(scores["PyTorch fp32"]["box vs GT"]))
    for name, values in scores.items():
        cells = [f"{np.mean(values[c]):.3f}" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + f" | {100 * (base - np.mean(values['box vs GT'])):+.2f} |")


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=16, help="point prompts per decoder call")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out (its first call is slow)")
    parser.add_argument("--profile", action="store_true", help="then time onnxruntime's encoders operator by operator")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    name, features = cpu_header()
    fp32_peak, int8_peak = peaks(args.runs)
    try:
        import openvino  # noqa: F401

        has_openvino = True
    except ImportError:
        has_openvino = False
    bf16 = "avx512_bf16" in features or "amx_bf16" in features
    model = load_model("tinyvit_5m", REFERENCE)
    photo, calibration = (load_image(p) for p in photos())
    x = model_input(model, photo)[None]
    with FlopCounterMode(display=False) as counter:
        model.image_encoder(x)
    gflop = counter.get_total_flops() / 1e9

    eager = Predictor(model)
    eager.set_image(photo)
    reference = eager.features
    h, w = photo.shape[:2]
    rng = np.random.default_rng(0)
    points = np.stack([rng.uniform(0, w, args.prompts), rng.uniform(0, h, args.prompts)], 1)[:, None]
    labels = np.ones((args.prompts, 1), np.int64)
    _, _, reference_logits = eager.predict(point_coords=points, point_labels=labels)
    t_points = eager.transform.apply_coords(points, (h, w))
    feed = decoder_feed(reference.numpy(), t_points, labels, None, None, (256, 256), 256)

    encoders: dict[str, tuple[Callable[[], object], Callable[[], torch.Tensor], str]] = {}
    decoders: dict[str, Callable[[], np.ndarray]] = {}
    unreadable: list[str] = []

    def torch_encoder(module: torch.nn.Module, inp: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: module(inp)

    encoders["PyTorch eager"] = (torch_encoder(model.image_encoder, x),) * 2 + ("fp32",)
    channels_last = load_model("tinyvit_5m", REFERENCE).to(memory_format=torch.channels_last)
    xl = x.contiguous(memory_format=torch.channels_last)
    encoders["PyTorch channels-last"] = (torch_encoder(channels_last.image_encoder, xl),) * 2 + ("fp32",)
    if not args.no_compile:
        compiled = torch.compile(model.image_encoder, dynamic=False)
        encoders["PyTorch torch.compile"] = (torch_encoder(compiled, x),) * 2 + ("fp32",)
    if bf16:

        def autocast_bf16() -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model.image_encoder(x).float()

        encoders["PyTorch bf16 autocast"] = (autocast_bf16, autocast_bf16, "bf16")

    for backend in ("eager", "factored"):
        predictor = Predictor(model, backend=backend)
        predictor.set_embedding(reference, (h, w))
        decoders[f"PyTorch {backend}"] = lambda p=predictor: p.predict(point_coords=points, point_labels=labels)[2]

    with tempfile.TemporaryDirectory() as tmp:
        folder, int8, int8_linear = Path(tmp) / "float", Path(tmp) / "int8", Path(tmp) / "int8_linear"
        folder.mkdir()
        export_encoder(model, folder / ENCODER)
        export_decoder(model, folder / DECODER)
        with torch.inference_mode(False), torch.enable_grad():  # calibration needs gradients
            for out, kwargs in ((int8, {"method": "minmax"}), (int8_linear, LINEAR_ONLY)):
                quantize_model(load_model("tinyvit_5m", REFERENCE), [calibration], out, points_per_side=2, **kwargs)
        image = x.numpy()
        # INT8 on every route: uint8 weights (exact on every x86 CPU), int8 weights (exact with VNNI only) and
        # 7-bit weights on the same fast kernels (exact on every x86 CPU)
        int8_routes = (("int8", int8, "u8u8"), ("int8", int8, "u8s8"), ("int8", int8, "u8s7"))
        for kind, where, route in (("fp32", folder, "auto"), *int8_routes):
            session = onnx_session(where / ENCODER, route=route)
            run = lambda s=session: s.run(None, {"image": image})[0]  # noqa: E731
            label = f"onnxruntime {kind}" + (f" {route}" if kind == "int8" else "")
            encoders[label] = (run, lambda r=run: torch.from_numpy(r()), kind)
            decoder = onnx_session(where / DECODER, route=route)
            decoders[label] = lambda d=decoder: d.run(None, feed)[2][:, 1:]
            if route == "u8s8" and not has_vnni():
                unreadable.append("onnxruntime int8 u8s8 rows: this CPU has no VNNI, where those kernels saturate")
            if has_openvino and route in ("auto", "u8u8"):  # OpenVINO reads the files as they are
                precisions = ["f32"] + (["bf16"] if bf16 and kind == "fp32" else [])
                for precision in precisions:
                    label = f"OpenVINO {kind if kind == 'int8' else precision}"
                    try:
                        compiled_ov = openvino_model(where / ENCODER, precision)
                        decoder_ov = openvino_model(where / DECODER, precision)
                    except Exception as err:  # an operator OpenVINO does not read: said, not fatal
                        unreadable.append(f"{label}: {' '.join(str(err).split())[:300]}")
                        continue
                    run_ov = lambda c=compiled_ov: c({"image": image})[0]  # noqa: E731
                    precision_name = kind if kind == "int8" else precision
                    encoders[label] = (run_ov, lambda r=run_ov: torch.from_numpy(np.asarray(r())), precision_name)
                    decoders[label] = lambda c=decoder_ov: np.asarray(c(feed)[2])[:, 1:]

        linear_only = onnx_session(int8_linear / ENCODER)
        run_linear = lambda s=linear_only: s.run(None, {"image": image})[0]  # noqa: E731
        label = f"onnxruntime int8 linear layers only, {linear_only.int8_route}"
        encoders[label] = (run_linear, lambda: torch.from_numpy(run_linear()), "int8")

        print(
            f"CPU: {name}; features: {', '.join(sorted(features)) or 'none of ' + ', '.join(FEATURES)}; "
            f"{torch.get_num_threads()} threads; fp32 matmul peak {fp32_peak:.1f} GFLOP/s, int8 {int8_peak:.1f} GOP/s; "
            f"OpenVINO {'installed' if has_openvino else 'not installed'}"
        )
        print(f"tinyvit_5m encoder at 1024 px ({gflop:.1f} GFLOP), median of {args.runs} runs")
        print(
            "| engine | precision | encoder ms | speed-up vs eager | GOP/s | % of its matmul peak | max abs diff vs eager |"
        )
        print("|---|---|---|---|---|---|---|")
        encoder_s = interleaved_medians({label: fn for label, (fn, _, _) in encoders.items()}, args.runs, warmup=2)
        eager_s = encoder_s["PyTorch eager"]
        for label, (_, output, precision) in encoders.items():
            seconds = encoder_s[label]
            rate = gflop / seconds
            peak = int8_peak if precision == "int8" else fp32_peak
            diff = float((output().float() - reference).abs().max())
            print(
                f"| {label} | {precision} | {1000 * seconds:.0f} | {eager_s / seconds:.2f}x | {rate:.1f} "
                f"| {100 * rate / peak:.0f}% | {diff:.1e} |"
            )
        print(f"\nmask decoder, {args.prompts} point prompts a call, on the eager embedding")
        print("| engine | ms per prompt | speed-up vs eager | mean mask IoU vs eager |")
        print("|---|---|---|---|")
        decoder_s = interleaved_medians(decoders, args.runs, warmup=2)
        eager_d = decoder_s["PyTorch eager"] / args.prompts
        for label, fn in decoders.items():
            seconds = decoder_s[label] / args.prompts
            logits = np.asarray(fn())
            agreement = np.mean(
                [mask_iou(a, b) for a, b in zip(logits.reshape(-1, 256, 256), reference_logits.reshape(-1, 256, 256))]
            )
            print(f"| {label} | {1000 * seconds:.1f} | {eager_d / seconds:.2f}x | {agreement:.4f} |")
        for line in unreadable:
            print(f"not measured: {line}")
        if args.profile:
            for kind, where in (("fp32", folder), ("int8", int8)):
                session = onnx_session(where / ENCODER, profile=str(Path(tmp) / f"profile-{kind}"))
                for _ in range(args.runs):
                    session.run(None, {"image": image})
                rows = operator_times(json.loads(Path(session.end_profiling()).read_text()))
                route = f", route {session.int8_route}" if session.int8_route else ""
                title = f"onnxruntime {kind} encoder{route}, {torch.get_num_threads()} threads"
                print("\n" + operator_table(title, rows))
        toy_accuracy(has_openvino, bf16, Path(tmp))


if __name__ == "__main__":
    main()
