"""The data engine: annotate a folder in the browser with the model in the loop, save SA-1B records, fine-tune.

    python -m tinysam.annotate images=DIR out=DIR [checkpoint=PATH model=NAME | quantized=DIR | onnx=DIR]
    python -m tinysam.annotate export-coco out=DIR coco=FILE
    python -m tinysam.annotate import-coco images=DIR out=DIR coco=FILE

:mod:`~tinysam.annotate.store` owns the folder (versioned atomic saves), :mod:`~tinysam.annotate.propose`
the semi-automatic stage, :mod:`~tinysam.annotate.coco` COCO in and out, :mod:`~tinysam.annotate.server`
the page's server (the demo's, with the folder's routes added).
"""

from tinysam.annotate.coco import export_coco, import_coco
from tinysam.annotate.propose import Proposer
from tinysam.annotate.server import AnnotateServer
from tinysam.annotate.store import SOURCES, AnnotationStore, ConflictError

__all__ = ["SOURCES", "AnnotateServer", "AnnotationStore", "ConflictError", "Proposer", "export_coco", "import_coco"]
