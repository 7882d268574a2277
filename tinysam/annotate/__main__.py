"""``python -m tinysam.annotate``: serve the annotation page over a folder; COCO export and import."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tinysam.annotate.coco import export_coco, import_coco
from tinysam.annotate.propose import Proposer
from tinysam.annotate.server import MAX_REQUEST_BYTES, AnnotateServer
from tinysam.annotate.store import AnnotationStore
from tinysam.config import one_line_errors, parse_keys
from tinysam.demo.bundle import model_source, prepare
from tinysam.eval.everything import generator_settings
from tinysam.loader import load_model
from tinysam.models.onnx_graphs import METADATA
from tinysam.quant.artifact import is_quantized_dir, load_quantized

MODEL_KEYS = ("checkpoint", "model", "quantized", "onnx", "encoder", "cache")
SERVE_KEYS = (
    "command",
    "images",
    "out",
    *MODEL_KEYS,
    "host",
    "port",
    "max_request_mb",
    "pred_iou_thresh",
    "stability_score_thresh",
)
USAGE = (
    "python -m tinysam.annotate [serve] images=DIR out=DIR [checkpoint=PATH model=NAME | quantized=DIR | onnx=DIR] "
    "[encoder=browser|server] [host=127.0.0.1] [port=8000] | export-coco out=DIR coco=FILE | "
    "import-coco images=DIR out=DIR coco=FILE"
)


def proposer_for(args: dict, folder: Path | None) -> Proposer | None:
    """The generator of proposals for the served model, or ``None`` when the model is only in ONNX form."""
    thresholds = {k: args[k] for k in ("pred_iou_thresh", "stability_score_thresh") if k in args}
    if folder is not None and is_quantized_dir(folder):
        model, _ = load_quantized(folder)
        return Proposer(model, thresholds, onnx_dir=folder)
    if folder is not None:  # an export knows its checkpoint when python -m tinysam.export wrote it
        record = json.loads((folder / METADATA).read_text())
        checkpoint = record.get("checkpoint")
        if not checkpoint or not Path(checkpoint).exists() or "architecture" not in record:
            print(f"annotate: {folder} does not name a checkpoint that exists: proposals are off", flush=True)
            return None
        args = dict(args, checkpoint=checkpoint, model=record["architecture"])
    own = generator_settings(dict.fromkeys(("pred_iou_thresh", "stability_score_thresh")), args["checkpoint"])
    return Proposer(load_model(args["model"], args["checkpoint"]), dict(own, **thresholds))


def serve(args: dict) -> None:
    args = model_source(args, "annotate", USAGE)
    folder = args.get("quantized", args.get("onnx"))
    store = AnnotationStore(args["images"], args["out"])
    store.clean()
    bundle = prepare(
        args.get("checkpoint"),
        args["model"],
        folder,
        args.get("encoder", "browser"),
        Path(args.get("cache", "outputs/demo")),
    )
    limit = int(float(args.get("max_request_mb", MAX_REQUEST_BYTES / 2**20)) * 2**20)
    proposer = proposer_for(args, Path(folder) if folder else None)
    server = AnnotateServer(bundle, store, proposer, args.get("host", "127.0.0.1"), int(args.get("port", 8000)), limit)
    print(
        f"annotate: {len(store.entries)} images of {store.images_dir} -> {store.out}; serving at {server.url}",
        flush=True,
    )
    server.serve_forever()
    server.server_close()


@one_line_errors()
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and "=" not in argv[0] else "serve"
    if command == "serve":
        serve(parse_keys(argv, "annotate", USAGE, SERVE_KEYS, required=("images", "out"), positional=("command",)))
    elif command == "export-coco":
        args = parse_keys(
            argv, "annotate export-coco", USAGE, ("command", "out", "coco"), ("out", "coco"), ("command",)
        )
        counts = export_coco(args["out"], args["coco"])
        print(
            f"annotate: wrote {counts['annotations']} objects of {counts['images']} images to {args['coco']}"
            + (f"; skipped {counts['skipped']}" if counts["skipped"] else "")
        )
    elif command == "import-coco":
        keys = ("images", "out", "coco")
        args = parse_keys(argv, "annotate import-coco", USAGE, ("command", *keys), keys, ("command",))
        counts = import_coco(args["coco"], AnnotationStore(args["images"], args["out"]))
        print(f"annotate: imported {args['coco']} into {args['out']}: {counts}")
    else:
        raise ValueError(f"annotate: unknown command {command!r}; usage: {USAGE}")


if __name__ == "__main__":
    main()
