"""The model folder the demo page loads: ``encoder.onnx``, ``decoder.onnx``, ``export.json`` and, where the folder
has them, the split decoder's three graphs (float exports and quantized folders write them).

A folder written by ``python -m tinysam.export`` or ``quantize.py`` is used as it is; a checkpoint
is exported once into a cache folder keyed by its content, and reused while it matches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tinysam.assets import asset_path
from tinysam.backends import onnx_session
from tinysam.data.toyworld import ToyWorldConfig, generate_image, image_rng
from tinysam.export import export
from tinysam.io import file_sha256
from tinysam.loader import load_model
from tinysam.models.onnx_graphs import DECODER, ENCODER, METADATA, SPLIT_DECODER

ENCODER_MODES = ("browser", "server")
SOURCES = ("checkpoint", "quantized", "onnx")
METADATA_KEYS = ("image_size", "pixel_mean", "pixel_std", "mask_threshold", "embedding_shape", "mask_side")


@dataclass
class Bundle:
    """A model folder ready to serve, with the metadata the page needs and, for ``encoder=server``, the encoder."""

    folder: Path
    metadata: dict
    encoder_mode: str = "browser"
    encode: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)

    @property
    def split_decoder(self) -> bool:
        """Whether the folder holds the split decoder (image half, click half and its preview)."""
        return all((self.folder / name).is_file() for name in SPLIT_DECODER)

    def files(self) -> dict[str, Path]:
        """The model files the server may send, by name."""
        names = [DECODER] + ([ENCODER] if self.encoder_mode == "browser" else [])
        names += list(SPLIT_DECODER) if self.split_decoder else []
        return {name: self.folder / name for name in names}


def read_folder(folder: str | Path, encoder_mode: str, what: str) -> Bundle:
    """A folder written by ``tinysam.export`` or ``quantize.py``; one-line errors name what is missing."""
    folder = Path(folder)
    fix = "write it with python -m tinysam.export or python quantize.py"
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist; {fix}")
    needed = ([ENCODER] if encoder_mode == "browser" else []) + [DECODER, METADATA]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{what} folder {folder} lacks {', '.join(missing)}; {fix}")
    try:
        metadata = json.loads((folder / METADATA).read_text())
        metadata = {key: metadata[key] for key in METADATA_KEYS}
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{folder / METADATA}: unreadable or missing field ({err}); {fix} again") from None
    return Bundle(folder, metadata, encoder_mode)


def onnx_encoder(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """Image embeddings from ``encoder.onnx`` run by onnxruntime in Python."""

    session = onnx_session(path)
    return lambda x: session.run(None, {"image": x})[0]


def torch_encoder(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """Image embeddings from the PyTorch model's image encoder."""

    def encode(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.image_encoder(torch.from_numpy(x).to(model.device)).float().cpu().numpy()

    return encode


def export_checkpoint(model_name: str, checkpoint: str | Path, out: Path, encoder_mode: str) -> Bundle:
    """Export ``checkpoint`` once into ``out`` (reused while its checkpoint digest and mode match)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist; pass checkpoint=PATH (see the README's Demo)")
    digest = file_sha256(checkpoint) if checkpoint.is_file() else file_sha256(checkpoint / "model.safetensors")
    key = {"architecture": model_name, "checkpoint_sha256": digest}
    with_encoder = encoder_mode == "browser"
    folder = out / f"{model_name}-{digest[:12]}{'' if with_encoder else '-decoder'}"
    model = load_model(model_name, checkpoint)
    record = json.loads((folder / METADATA).read_text()) if (folder / METADATA).is_file() else {}
    stale = any(record.get(k) != v for k, v in key.items()) or record.get("with_encoder") != with_encoder
    if stale or not all((folder / name).is_file() for name in SPLIT_DECODER):
        print(f"demo: exporting {model_name} from {checkpoint} to {folder}", flush=True)
        check_image = generate_image(image_rng(0, "val", 0), ToyWorldConfig(out="unused")).image
        export(model, folder, [check_image], with_encoder, checkpoint=str(checkpoint), **key)
    bundle = read_folder(folder, encoder_mode, "exported model")
    bundle.encode = torch_encoder(model) if encoder_mode == "server" else None
    return bundle


def model_source(args: dict[str, Any], prog: str, usage: str) -> dict[str, Any]:
    """A command's ``key=value`` arguments with one model source (``checkpoint`` + ``model``, ``quantized`` or
    ``onnx``): the shipped distilled toy student when none is given, a one-line error when two are."""
    sources = [key for key in SOURCES if key in args]
    if len(sources) > 1:
        raise ValueError(f"{prog}: give one of {' / '.join(sources)}; usage: {usage}")
    if not sources:  # a fresh clone: the shipped distilled toy student
        args.setdefault("checkpoint", asset_path("toy_student.safetensors"))
        args.setdefault("model", "tinyvit_toy")
    args.setdefault("model", "tinyvit_5m")
    return args


def prepare(
    checkpoint: str | Path | None,
    model: str,
    folder: str | Path | None,
    encoder_mode: str,
    cache: Path,
) -> Bundle:
    """The bundle to serve: a ready folder (``folder``) or an export of ``checkpoint``."""
    if encoder_mode not in ENCODER_MODES:
        raise ValueError(f"encoder={encoder_mode!r}: choose one of {ENCODER_MODES}")
    if folder is None:
        return export_checkpoint(model, checkpoint, cache, encoder_mode)
    bundle = read_folder(folder, encoder_mode, "model")
    if encoder_mode == "server":
        if not (bundle.folder / ENCODER).is_file():
            raise FileNotFoundError(f"model folder {folder} lacks {ENCODER}, which encoder=server runs in Python")
        bundle.encode = onnx_encoder(bundle.folder / ENCODER)
    return bundle
