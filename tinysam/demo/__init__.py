"""TinySAM in the browser: a local page where the whole model runs in onnxruntime-web.

    python -m tinysam.demo [checkpoint=PATH model=NAME | quantized=DIR | onnx=DIR] [encoder=browser|server]
                           [host=127.0.0.1] [port=8000] [out=outputs/demo]

:mod:`tinysam.demo.bundle` prepares the model folder, :mod:`tinysam.demo.server` serves it with
the page of ``static/`` (plain JavaScript modules; onnxruntime-web's files are vendored in
``static/vendor/onnxruntime-web`` with their licence).
"""

from tinysam.demo.bundle import Bundle, prepare
from tinysam.demo.server import DemoServer

__all__ = ["Bundle", "DemoServer", "prepare"]
