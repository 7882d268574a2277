"""``python -m tinysam.demo``: export (or reuse) the ONNX model, serve the page, print its URL."""

from __future__ import annotations

import sys
from pathlib import Path

from tinysam.config import one_line_errors, parse_keys
from tinysam.demo.bundle import model_source, prepare
from tinysam.demo.server import DemoServer

KEYS = ("checkpoint", "model", "quantized", "onnx", "encoder", "host", "port", "out")
USAGE = (
    "python -m tinysam.demo [checkpoint=PATH model=NAME | quantized=DIR | onnx=DIR] "
    "[encoder=browser|server] [host=127.0.0.1] [port=8000] [out=outputs/demo]"
)


@one_line_errors()
def main(argv: list[str] | None = None) -> None:
    args = model_source(parse_keys(sys.argv[1:] if argv is None else argv, "demo", USAGE, KEYS), "demo", USAGE)
    bundle = prepare(
        args.get("checkpoint"),
        args["model"],
        args.get("quantized", args.get("onnx")),
        args.get("encoder", "browser"),
        Path(args.get("out", "outputs/demo")),
    )
    server = DemoServer(bundle, args.get("host", "127.0.0.1"), int(args.get("port", 8000)))
    print(f"demo: serving {bundle.folder} (encoder in the {bundle.encoder_mode}) at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
