"""Export a model to ONNX: ``encoder.onnx`` and ``decoder.onnx``, checked against PyTorch.

    python -m tinysam.export checkpoint=PATH [model=tinyvit_5m] out=DIR [images=DIR]

The encoder takes the normalised, padded image ``(B, 3, S, S)`` and returns the image
embedding. The decoder is SAM's ONNX decoder (``segment_anything.utils.onnx.SamOnnxModel``,
the interface browser and edge deployments of SAM use) with every output kept: for N
prompts of K points each (boxes as two corner points labelled 2 and 3, padding points
labelled -1) it returns masks at the original image size (N, 4, H, W), IoU predictions
(N, 4) and low-res logits (N, 4, 256, 256); output 0 is the single-mask output, 1-3 the
multimask ones. N and K are dynamic. Both models are validated with ``onnx.checker`` and
compared with PyTorch on the given images (the reference images by default).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from segment_anything.modeling import Sam
from segment_anything.utils.onnx import SamOnnxModel

from tinysam.data.transforms import list_images, load_image, model_input
from tinysam.models.build import load_model

OPSET = 17
ENCODER, DECODER, METADATA = "encoder.onnx", "decoder.onnx", "export.json"
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")


def _onnx_export(module: torch.nn.Module, args: tuple, path: Path, inputs, outputs, dynamic_axes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on constant shapes
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def export_encoder(model: Sam, path: str | Path) -> Path:
    """The image encoder as ONNX with a dynamic batch axis."""
    size = model.image_encoder.img_size
    path = Path(path)
    dummy = torch.randn(1, 3, size, size)
    axes = {"image": {0: "batch"}, "image_embeddings": {0: "batch"}}
    _onnx_export(model.image_encoder.float().cpu().eval(), (dummy,), path, ["image"], ["image_embeddings"], axes)
    return path


def export_decoder(model: Sam, path: str | Path) -> Path:
    """SAM's ONNX prompt encoder + mask decoder + upscaling, every output kept, prompts and points dynamic."""
    path = Path(path)
    wrapper = SamOnnxModel(model.float().cpu().eval(), return_single_mask=False)
    emb_size = model.prompt_encoder.image_embedding_size
    mask_side = 4 * emb_size[0]
    dummy = (
        torch.randn(1, model.prompt_encoder.embed_dim, *emb_size),
        torch.randint(0, model.image_encoder.img_size, (2, 3, 2)).float(),
        torch.tensor([[1, 0, -1], [2, 3, -1]], dtype=torch.float),
        torch.zeros(2, 1, mask_side, mask_side),
        torch.zeros(1),
        torch.tensor([480.0, 640.0]),
    )
    axes = {
        "point_coords": {0: "prompts", 1: "points"},
        "point_labels": {0: "prompts", 1: "points"},
        "mask_input": {0: "mask_prompts"},
        "masks": {0: "prompts", 2: "height", 3: "width"},
        "iou_predictions": {0: "prompts"},
        "low_res_masks": {0: "prompts"},
    }
    _onnx_export(wrapper, dummy, path, DECODER_INPUTS, DECODER_OUTPUTS, axes)
    return path


def decoder_feed(
    embeddings: np.ndarray,
    points: np.ndarray | None,
    labels: np.ndarray | None,
    boxes: np.ndarray | None,
    mask_input: np.ndarray | None,
    original_size: tuple[int, int],
    mask_side: int,
) -> dict[str, np.ndarray]:
    """Inputs of ``decoder.onnx`` for N prompts already in the model's input frame (as ``Predictor.decode``).

    Like SAM's prompt encoder: boxes become two corner points labelled 2 and 3, and prompts
    without a box get one padding point labelled -1.
    """
    n = next(len(a) for a in (points, boxes, mask_input) if a is not None)
    coords = [np.zeros((n, 0, 2), np.float32)] if points is None else [points.astype(np.float32)]
    kinds = [np.zeros((n, 0), np.float32)] if labels is None else [labels.astype(np.float32)]
    if boxes is None:
        coords.append(np.zeros((n, 1, 2), np.float32))
        kinds.append(-np.ones((n, 1), np.float32))
    else:
        coords.append(boxes.reshape(n, 2, 2).astype(np.float32))
        kinds.append(np.tile(np.array([[2, 3]], np.float32), (n, 1)))
    has_mask = mask_input is not None
    return {
        "image_embeddings": embeddings.astype(np.float32),
        "point_coords": np.concatenate(coords, axis=1),
        "point_labels": np.concatenate(kinds, axis=1),
        "mask_input": mask_input.astype(np.float32) if has_mask else np.zeros((1, 1, mask_side, mask_side), np.float32),
        "has_mask_input": np.array([float(has_mask)], np.float32),
        "orig_im_size": np.array(original_size, np.float32),
    }


def check_against_torch(model: Sam, out: Path, images: list[Path]) -> dict[str, float]:
    """Max abs difference of ONNX vs PyTorch embeddings, low-res logits and IoUs on ``images``."""
    import onnx
    import onnxruntime as ort

    from tinysam.predictor import Predictor

    for name in (ENCODER, DECODER):
        onnx.checker.check_model(str(out / name), full_check=True)
    encoder = ort.InferenceSession(str(out / ENCODER), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(out / DECODER), providers=["CPUExecutionProvider"])
    predictor = Predictor(model)
    worst = {"embedding": 0.0, "low_res_logits": 0.0, "iou": 0.0}
    for path in images:
        rgb = load_image(path)
        x = model_input(model, rgb)
        ours = encoder.run(None, {"image": x[None].numpy()})[0]
        predictor.set_image(rgb)
        ref = predictor.features.cpu().numpy()
        worst["embedding"] = max(worst["embedding"], float(np.abs(ours - ref).max()))
        h, w = rgb.shape[:2]
        boxes = np.array([[w * 0.2, h * 0.2, w * 0.7, h * 0.8], [w * 0.5, h * 0.1, w * 0.9, h * 0.5]])
        points = np.array([[[w * 0.4, h * 0.5], [w * 0.6, h * 0.3]]] * 2)
        labels = np.array([[1, 0], [1, 1]])
        for kw in ({"boxes": boxes}, {"point_coords": points, "point_labels": labels}):
            _, iou, low_res = predictor.predict(multimask_output=True, **kw)
            t_boxes = predictor.transform.apply_boxes(boxes, (h, w)) if "boxes" in kw else None
            t_points = predictor.transform.apply_coords(points, (h, w)) if "point_coords" in kw else None
            feed = decoder_feed(
                ref, t_points, labels if t_points is not None else None, t_boxes, None, (h, w), low_res.shape[-1]
            )
            _, onnx_iou, onnx_low = decoder.run(None, feed)
            worst["low_res_logits"] = max(worst["low_res_logits"], float(np.abs(onnx_low[:, 1:] - low_res).max()))
            worst["iou"] = max(worst["iou"], float(np.abs(onnx_iou[:, 1:] - iou).max()))
    return worst


def export(model: Sam, out: str | Path, images: list[Path], **metadata) -> dict:
    """Write ``encoder.onnx``, ``decoder.onnx`` and ``export.json`` (with the check's differences) to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    export_encoder(model, out / ENCODER)
    export_decoder(model, out / DECODER)
    diffs = check_against_torch(model, out, images)
    record = {
        "format": "tinysam-onnx",
        "opset": OPSET,
        "image_size": model.image_encoder.img_size,
        "pixel_mean": model.pixel_mean.flatten().tolist(),
        "pixel_std": model.pixel_std.flatten().tolist(),
        "max_abs_diff_vs_pytorch": diffs,
        "checked_on": [p.name for p in images],
        **metadata,
    }
    (out / METADATA).write_text(json.dumps(record, indent=2))
    return record


def reference_images() -> list[Path]:
    """The shared reference photos beside the repository, when present."""
    folder = Path(__file__).resolve().parents[2] / "shared" / "reference" / "images"
    return list_images(folder) if folder.is_dir() else []


def main(argv: list[str] | None = None) -> None:
    args = OmegaConf.from_dotlist(sys.argv[1:] if argv is None else argv)
    unknown = set(args) - {"checkpoint", "model", "out", "images"}
    if unknown or "out" not in args:
        raise SystemExit(
            f"export: unknown keys {sorted(unknown)}; usage: python -m tinysam.export "
            "checkpoint=PATH [model=tinyvit_5m] out=DIR [images=DIR]"
        )
    images = list_images(args.images) if "images" in args else reference_images()
    if not images:
        raise SystemExit("export: no images to check the export on; pass images=<folder of images>")
    name = args.get("model", "tinyvit_5m")
    model = load_model(name, args.get("checkpoint"))
    record = export(model, args.out, images, architecture=name, checkpoint=str(args.get("checkpoint")))
    print(
        f"wrote {Path(args.out) / ENCODER} and {DECODER}; max abs diff vs PyTorch: {record['max_abs_diff_vs_pytorch']}"
    )


if __name__ == "__main__":
    main()
