"""Export a model to ONNX: ``encoder.onnx`` and ``decoder.onnx`` (and, for a float model, the split decoder
``decoder_image.onnx`` + ``decoder_prompt.onnx`` that a page runs per image and per click), checked against PyTorch.

    python -m tinysam.export checkpoint=PATH|random [model=tinyvit_5m] out=DIR [images=DIR]

The graphs are those of :mod:`tinysam.models.onnx_graphs`. Both are validated with ``onnx.checker``
and compared with PyTorch on the given images (the two photos shipped with tinysam by default); the files
appear in ``out`` only once all of that succeeded.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from segment_anything.modeling import Sam

from tinysam.assets import photos
from tinysam.config import one_line_errors, parse_keys
from tinysam.data.transforms import list_images, load_image, model_input
from tinysam.io import check_writable
from tinysam.loader import RANDOM, load_model
from tinysam.models.onnx_graphs import (
    DECODER,
    DECODER_IMAGE,
    DECODER_PREVIEW,
    DECODER_PROMPT,
    ENCODER,
    METADATA,
    POINTS,
    SPLIT_DECODER,
    decoder_feed,
    export_decoder,
    export_encoder,
    export_split_decoder,
    image_side,
    onnx_metadata,
)
from tinysam.predictor import Predictor


def check_against_torch(model: Sam, out: Path, images: Sequence[Path | np.ndarray]) -> dict[str, float]:
    """Max abs difference of ONNX vs PyTorch embeddings, low-res logits and IoUs on ``images`` (files or RGB arrays).

    The decoder is run on PyTorch's embeddings; the embeddings are compared when ``out`` holds an encoder.
    """
    import onnx
    import onnxruntime as ort

    names = [name for name in (ENCODER, DECODER, *SPLIT_DECODER) if (out / name).is_file()]
    for name in names:
        onnx.checker.check_model(str(out / name), full_check=True)
    session = {name: ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"]) for name in names}
    encoder, decoder = session.get(ENCODER), session[DECODER]
    predictor = Predictor(model)
    worst = {"low_res_logits": 0.0, "iou": 0.0} | ({"embedding": 0.0} if encoder else {})
    if DECODER_PROMPT in session:
        worst |= {"split_low_res_logits": 0.0, "split_iou": 0.0, "preview_low_res_logits": 0.0}
    for image in images:
        rgb = load_image(image) if isinstance(image, Path) else image
        predictor.set_image(rgb)
        ref = predictor.features.cpu().numpy()
        if encoder is not None:
            ours = encoder.run(None, {"image": model_input(model, rgb)[None].numpy()})[0]
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
            if DECODER_PROMPT in session:
                side = image_side(session[DECODER_IMAGE], ref)
                prompt = {key: feed[key] for key in POINTS}
                split_iou, split_low = session[DECODER_PROMPT].run(None, side | prompt)
                worst["split_low_res_logits"] = max(
                    worst["split_low_res_logits"], float(np.abs(split_low[:, 1:] - low_res).max())
                )
                worst["split_iou"] = max(worst["split_iou"], float(np.abs(split_iou[:, 1:] - iou).max()))
                _, preview = session[DECODER_PREVIEW].run(None, side | prompt)
                worst["preview_low_res_logits"] = max(
                    worst["preview_low_res_logits"], float(np.abs(preview[:, 1:] - low_res[..., 2::4, 2::4]).max())
                )
    return worst


def export(
    model: Sam, out: str | Path, images: Sequence[Path | np.ndarray], with_encoder: bool = True, **metadata
) -> dict:
    """Write ``encoder.onnx``, ``decoder.onnx``, the split decoder (float models) and ``export.json`` (with the
    check's differences) to ``out``.

    ``with_encoder=False`` writes the decoder alone (for a model whose embeddings are computed
    elsewhere). Everything is written and checked in a temporary sibling folder first, so a
    failed export leaves ``out`` as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        work = Path(tmp)
        names = [ENCODER, DECODER] if with_encoder else [DECODER]
        if with_encoder:
            export_encoder(model, work / ENCODER)
        export_decoder(model, work / DECODER)
        try:
            names += [path.name for path in export_split_decoder(model, work)]
        except TypeError:  # a quantized decoder: decoder.onnx alone
            pass
        diffs = check_against_torch(model, work, images)
        record = {
            **onnx_metadata(model),
            "max_abs_diff_vs_pytorch": diffs,
            "checked_on": [p.name if isinstance(p, Path) else f"array {p.shape[1]}x{p.shape[0]}" for p in images],
            "with_encoder": with_encoder,
            **metadata,
        }
        (work / METADATA).write_text(json.dumps(record, indent=2))
        out.mkdir(exist_ok=True)
        for name in (*names, METADATA):
            shutil.move(work / name, out / name)
    return record


USAGE = "python -m tinysam.export checkpoint=PATH|random [model=tinyvit_5m] out=DIR [images=DIR]"


@one_line_errors()
def main(argv: list[str] | None = None) -> None:
    args = parse_keys(
        sys.argv[1:] if argv is None else argv,
        "export",
        USAGE,
        ("checkpoint", "model", "out", "images"),
        required=("checkpoint", "out"),
    )
    images = list_images(args["images"]) if "images" in args else photos()
    if not images:
        raise ValueError(f"export: images={args['images']} holds no .jpg/.png image to check the export on")
    check_writable(args["out"])
    name = args.get("model", "tinyvit_5m")
    if args["checkpoint"] == RANDOM:
        print(f"export: checkpoint=random: exporting randomly initialised {name} weights (for tests and timing only)")
    model = load_model(name, args["checkpoint"])
    record = export(model, args["out"], images, architecture=name, checkpoint=str(args["checkpoint"]))
    files = ", ".join(sorted(path.name for path in Path(args["out"]).glob("*.onnx")))
    print(f"wrote {files} to {args['out']}; max abs diff vs PyTorch: {record['max_abs_diff_vs_pytorch']}")


if __name__ == "__main__":
    main()
