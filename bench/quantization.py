"""Quantization side by side in one run: float vs fake-quant (Hessian-guided and min-max) vs INT8 onnxruntime.

Accuracy on the toy world (the shipped distilled toy student, calibrated on 8 training images
drawn per seed from 64, evaluated on the 16 validation images): box and 1-click mIoU against the
float model and against ground truth, mean ± std over the seeds. Speed and size at 1024 px
(``tinyvit_5m``, the reference weights): encoder latency of eager PyTorch, our fastest float path
(onnxruntime) and the INT8 onnxruntime encoder; decoder latency per prompt (``--decoder-prompts``
single-point prompts in one call, as segment-everything batches them) of the same three.

    python bench/quantization.py [--bits 8] [--candidates 100] [--runs 11] [--seeds 0 1 2] [--decoder-prompts 16]

The INT8 model is what ``python quantize.py`` writes: linear layers in integer, the conv stage
(patch embedding, MBConv blocks, patch merging) in uint8 from end to end, the neck's
convolutions in integer, the decoder's two-way transformer's linear layers in integer. The float
and INT8 onnxruntime models run interleaved, so that machine
drift affects both alike.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from tinysam import Predictor
from tinysam.assets import asset_path
from tinysam.assets import photos as shipped_photos
from tinysam.backends import onnx_session
from tinysam.data.layouts import CocoLayout
from tinysam.data.toyworld import ToyWorldConfig, generate
from tinysam.data.transforms import list_images, load_image, model_input
from tinysam.eval.prompt_miou import image_ious
from tinysam.loader import load_model
from tinysam.models.onnx_graphs import export_encoder
from tinysam.quant.run import quantize_model
from tinysam.runtime import interleaved_medians

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "reference"


def quantized(arch: str, checkpoint, images, bits: int, method: str, candidates: int, out: Path):
    model = load_model(arch, checkpoint)
    quantize_model(model, images, out, bits, bits, method, candidates=candidates)
    return model


def accuracy(predictors: dict[str, Predictor], reference: Predictor, val: CocoLayout) -> dict[str, dict[str, float]]:
    scores: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    skipped: dict = {}
    for _, rgb, gt in val.instances(skipped):
        reference.set_image(rgb)
        for name, predictor in predictors.items():
            predictor.set_image(rgb)
            for kind, refs in image_ious(predictor, gt, 1, True, reference).items():
                scores[name][f"{kind} vs GT"] += refs["gt"].tolist()
                scores[name][f"{kind} vs float"] += refs["teacher"].tolist()
    return {n: {k: float(np.mean(v)) for k, v in s.items()} for n, s in scores.items()}


def mib(*paths: Path) -> float:
    return sum(p.stat().st_size for p in paths) / 2**20


def seeded_accuracy(world: Path, student: Path, seed: int, args, tmp: Path) -> dict[str, dict[str, float]]:
    """The accuracy rows for one seed: its 8 calibration images drawn from the world's training split."""
    torch.manual_seed(seed)
    train = list_images(world / "train")
    pick = np.random.default_rng(seed).choice(len(train), size=8, replace=False)
    calib = [load_image(train[i]) for i in sorted(pick)]
    float_model = load_model("tinyvit_toy", student)
    out = tmp / f"seed{seed}"
    hessian = quantized("tinyvit_toy", student, calib, args.bits, "hessian", args.candidates, out / "hessian")
    minmax = quantized("tinyvit_toy", student, calib, args.bits, "minmax", args.candidates, out / "minmax")
    predictors = {
        "float (eager)": Predictor(float_model),
        "fake-quant, min-max": Predictor(minmax),
        "fake-quant, Hessian-guided": Predictor(hessian),
        "INT8 onnxruntime, Hessian-guided": Predictor(hessian, backend="onnx", onnx_dir=out / "hessian"),
    }
    val = CocoLayout(images=str(world / "val"), annotations=str(world / "val" / "instances.json"))
    return accuracy(predictors, Predictor(float_model), val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration sets (8 images each)")
    parser.add_argument("--decoder-prompts", type=int, default=16, help="point prompts per decoder call")
    parser.add_argument("--decoder-runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        world = generate(ToyWorldConfig(out=str(tmp / "toy"), n_train=64, n_val=16, seed=0))
        student = asset_path("toy_student.safetensors")
        runs = [seeded_accuracy(world, student, seed, args, tmp) for seed in args.seeds]
        acc = {name: {k: [r[name][k] for r in runs] for k in runs[0][name]} for name in runs[0]}

        # speed and size at 1024 px
        ref = REFERENCE / "tinysam_vit_t_seed0.safetensors"
        big = load_model("tinyvit_5m", ref)
        photo = load_image(shipped_photos()[0])
        export_encoder(big, tmp / "float.onnx")
        quantized("tinyvit_5m", ref, [photo], args.bits, "minmax", args.candidates, tmp / "big")
        x = model_input(big, photo)[None]
        with torch.inference_mode():
            (eager_s,) = interleaved_medians({"eager": lambda: big.image_encoder(x)}, args.runs).values()
        float_sess, int8_sess = onnx_session(tmp / "float.onnx"), onnx_session(tmp / "big" / "encoder.onnx")
        ort_s, int8_s = interleaved_medians(
            {
                "float": lambda: float_sess.run(None, {"image": x.numpy()}),
                "int8": lambda: int8_sess.run(None, {"image": x.numpy()}),
            },
            args.runs,
        ).values()
        # the decoder: one Predictor.decode call on --decoder-prompts single-point prompts, as everything mode sends
        decoders = {
            "eager": Predictor(big),
            "float": Predictor(big, backend="onnx"),
            "int8": Predictor(big, backend="onnx", onnx_dir=tmp / "big"),
        }
        decoders["eager"].set_image(photo)
        for predictor in decoders.values():
            predictor.set_embedding(decoders["eager"].features, photo.shape[:2])
        rng = np.random.default_rng(0)
        h, w = photo.shape[:2]
        points = rng.uniform(0, 1, (args.decoder_prompts, 1, 2)) * [w, h]
        coords = torch.as_tensor(decoders["eager"].transform.apply_coords(points, (h, w)), dtype=torch.float)
        labels = torch.ones(args.decoder_prompts, 1, dtype=torch.int)
        with torch.inference_mode():
            decoder_s = interleaved_medians(
                {
                    name: lambda p=predictor: p.decode(points=coords, labels=labels, multimask_output=True)
                    for name, predictor in decoders.items()
                },
                args.decoder_runs,
            )
        sizes = {
            "float": mib(ref),
            "int8": mib(tmp / "big" / "model.safetensors"),
            "float_onnx": mib(tmp / "float.onnx"),
            "int8_onnx": mib(tmp / "big" / "encoder.onnx"),
        }

    print(
        f"W{args.bits}A{args.bits}; toy world: toy student, 8 calibration images drawn from 64 per seed "
        f"(seeds {args.seeds}), 16 validation images; mean ± std over seeds ({torch.get_num_threads()} threads)"
    )
    kinds = list(next(iter(acc.values())))
    print("| model | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for name, values in acc.items():
        print(
            f"| {name} | "
            + " | ".join(f"{np.mean(values[k]):.3f} ± {np.std(values[k], ddof=1):.3f}" for k in kinds)
            + " |"
        )
    loss = {
        k: [100 * (f - q) for f, q in zip(acc["float (eager)"][k], acc["INT8 onnxruntime, Hessian-guided"][k])]
        for k in kinds
        if "GT" in k
    }
    print(
        "INT8 mIoU loss vs float, points: "
        + ", ".join(f"{k} {np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}" for k, v in loss.items())
        + " (target <= 1)"
    )
    print(
        f"tinyvit_5m encoder at 1024 px, median of {args.runs}: eager {1000 * eager_s:.0f} ms, "
        f"onnxruntime float {1000 * ort_s:.0f} ms, onnxruntime INT8 {1000 * int8_s:.0f} ms; "
        f"INT8 vs our fastest float path: {ort_s / int8_s:.2f}x (target >= 1.5x), vs eager: {eager_s / int8_s:.2f}x"
    )
    per_prompt = {k: 1000 * v / args.decoder_prompts for k, v in decoder_s.items()}
    print(
        f"tinyvit_5m decoder at 1024 px, {args.decoder_prompts} point prompts per call, median of "
        f"{args.decoder_runs}, ms per prompt: eager {per_prompt['eager']:.0f}, onnxruntime float "
        f"{per_prompt['float']:.0f}, onnxruntime INT8 {per_prompt['int8']:.0f}; INT8 vs float onnxruntime: "
        f"{decoder_s['float'] / decoder_s['int8']:.2f}x, vs eager: {decoder_s['eager'] / decoder_s['int8']:.2f}x"
    )
    print(
        f"size on disk: float safetensors {sizes['float']:.1f} MiB, int8 safetensors {sizes['int8']:.1f} MiB, "
        f"float encoder ONNX {sizes['float_onnx']:.1f} MiB, INT8 encoder ONNX {sizes['int8_onnx']:.1f} MiB"
    )


if __name__ == "__main__":
    main()
