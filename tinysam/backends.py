"""Inference backends of :class:`~tinysam.predictor.Predictor`: eager PyTorch (plain or with the mask
decoder factored), ``torch.compile``, onnxruntime, OpenVINO (float32 or bfloat16).

Each backend runs the two halves of a SAM-family model: ``encode`` (normalised, padded
images to image embeddings) and ``decode`` (prompts in the model's input frame to low-res
mask logits and IoU predictions). Outputs agree with eager PyTorch to float tolerance.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import Sam

from tinysam.models.factored_decoder import FactoredMaskDecoder
from tinysam.models.onnx_graphs import (
    DECODER,
    ENCODER,
    decoder_feed,
    export_decoder,
    export_encoder,
    signed_int8_weights,
)
from tinysam.runtime import has_vnni

BACKENDS = ("auto", "eager", "factored", "compile", "onnx", "openvino", "openvino_bf16")


class EagerBackend:
    """Plain PyTorch, as the model is."""

    def __init__(self, model: Sam) -> None:
        self.model = model
        self.image_encoder: torch.nn.Module = model.image_encoder
        self.mask_decoder: torch.nn.Module = model.mask_decoder

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(images)

    def decode(
        self,
        features: torch.Tensor,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._decode_with(self.mask_decoder, features, points, labels, boxes, mask_input, multimask_output)

    def _decode_with(
        self, decoder, features, points, labels, boxes, mask_input, multimask_output, one_dense: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the prompts and run ``decoder``; ``one_dense`` passes the dense embedding all prompts share once."""
        point_prompt = None if points is None else (points.float(), labels.int())
        sparse, dense = self.model.prompt_encoder(
            points=point_prompt,
            boxes=None if boxes is None else boxes.float(),
            masks=None if mask_input is None else mask_input.float(),
        )
        return decoder(
            image_embeddings=features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense[:1] if one_dense else dense,
            multimask_output=multimask_output,
        )


class FactoredBackend(EagerBackend):
    """Eager PyTorch with the mask decoder factored: image-side work done once for all prompts.

    Point and box prompts go through :class:`~tinysam.models.factored_decoder.FactoredMaskDecoder`
    (SAM's maths, summed in another order: outputs agree to float rounding); mask inputs, which
    make the dense embedding differ per prompt, go through the plain decoder.
    """

    def __init__(self, model: Sam) -> None:
        super().__init__(model)
        self.factored = FactoredMaskDecoder(model.mask_decoder)

    def decode(self, features, points, labels, boxes, mask_input, multimask_output):
        if mask_input is not None:
            return super().decode(features, points, labels, boxes, mask_input, multimask_output)
        return self._decode_with(self.factored, features, points, labels, boxes, None, multimask_output, one_dense=True)


class CompiledBackend(EagerBackend):
    """``torch.compile`` of the encoder (static shapes) and the mask decoder (dynamic prompt count)."""

    def __init__(self, model: Sam) -> None:
        super().__init__(model)
        self.image_encoder = torch.compile(model.image_encoder, dynamic=False)
        self.mask_decoder = torch.compile(model.mask_decoder, dynamic=True)


INT8_ROUTES = ("auto", "u8u8", "u8s8", "u8s7")


def int8_route(route: str = "auto") -> str:
    """The integer kernels an INT8 graph runs on: ``u8s8`` (int8 weights, fast) where the CPU has VNNI and they
    are exact, else ``u8s7`` (the same fast kernels on weights rounded to 7 bits, which cannot saturate them).
    ``u8u8`` (uint8 weights, exact on every x86 CPU, slow) is there to ask for. ``TINYSAM_INT8_ROUTE``
    overrides ``auto``."""
    route = os.environ.get("TINYSAM_INT8_ROUTE", route) if route == "auto" else route
    if route not in INT8_ROUTES:
        raise ValueError(f"INT8 route {route!r}: choose one of {INT8_ROUTES} (TINYSAM_INT8_ROUTE)")
    if route == "auto":
        return "u8s8" if has_vnni() else "u8s7"
    return route


def onnx_session(path: str | Path, threads: int | None = None, route: str = "auto", profile: str | None = None):
    """An onnxruntime CPU session with every graph optimisation on.

    An INT8 graph (uint8 weights, as ``quantize.py`` writes them) runs on the route :func:`int8_route` picks
    for the CPU that loads it: on ``u8s8`` its weights are rewritten to int8 in memory, on ``u8s7`` to 7-bit
    levels (:func:`~tinysam.models.onnx_graphs.signed_int8_weights`); the file is left as it is, so a folder
    moves between machines. ``session.int8_route`` says which route it took (``None`` for a float graph).
    ``profile``: a path prefix for onnxruntime's operator profile (``session.end_profiling()`` writes it and
    returns its path).
    """
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    if profile is not None:
        options.enable_profiling, options.profile_file_prefix = True, profile
    graph = onnx.load(str(path))
    source: str | bytes = str(path)
    taken = None
    if any(node.op_type in ("MatMulIntegerToFloat", "QLinearConv") for node in graph.graph.node):
        taken = int8_route(route)
        if taken != "u8u8" and signed_int8_weights(graph, bits=7 if taken == "u8s7" else 8):
            source = graph.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    session.int8_route = taken
    return session


class OnnxBackend:
    """onnxruntime on ``encoder.onnx`` / ``decoder.onnx`` of ``onnx_dir`` (exported now when not given)."""

    def __init__(self, model: Sam, onnx_dir: str | Path | None = None) -> None:
        folder = self._folder(model, onnx_dir)
        self.model = model
        self.mask_side = 4 * model.prompt_encoder.image_embedding_size[0]
        self._load(folder)

    def _load(self, folder: Path) -> None:
        encoder, decoder = onnx_session(folder / ENCODER), onnx_session(folder / DECODER)
        self._run_encoder = lambda images: encoder.run(None, {"image": images})[0]
        self._run_decoder = lambda feed: decoder.run(None, feed)

    def _folder(self, model: Sam, onnx_dir: str | Path | None) -> Path:
        """``onnx_dir``, checked, or a temporary folder the model is exported to now."""
        if onnx_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tinysam-onnx-")
            onnx_dir = Path(self._tmp.name)
            export_encoder(model, onnx_dir / ENCODER)
            export_decoder(model, onnx_dir / DECODER)
        onnx_dir = Path(onnx_dir)
        for name in (ENCODER, DECODER):
            if not (onnx_dir / name).is_file():
                raise FileNotFoundError(
                    f"{onnx_dir / name} is missing; export it: python -m tinysam.export checkpoint=PATH out={onnx_dir}"
                )
        return onnx_dir

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self._run_encoder(images.float().cpu().numpy())))

    def decode(self, features, points, labels, boxes, mask_input, multimask_output):
        if points is None and boxes is None:
            raise ValueError("the onnx backend needs a point or box prompt (SAM's ONNX decoder has no mask-only mode)")

        def numpy(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.cpu().numpy()

        side = self.mask_side  # the decoder's image-size masks are not used here: keep them small
        feed = decoder_feed(
            numpy(features), numpy(points), numpy(labels), numpy(boxes), numpy(mask_input), (side, side), side
        )
        _, iou, low_res = (np.asarray(output) for output in self._run_decoder(feed))
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return torch.from_numpy(low_res[:, keep]), torch.from_numpy(iou[:, keep])


class OpenVinoBackend(OnnxBackend):
    """OpenVINO on the same ``encoder.onnx`` / ``decoder.onnx`` (exported now when ``onnx_dir`` is not given).

    ``precision="bf16"`` runs them in bfloat16 on CPUs with ``avx512_bf16`` or AMX (OpenVINO's inference
    precision hint; elsewhere OpenVINO keeps float32). Measured with ``bench/engines.py``: the 1024 px
    encoder 1.9x faster than the fastest float engine, for no mIoU lost on the toy world. Needs the ``openvino``
    extra; the INT8 graphs of ``quantize.py`` use operators OpenVINO does not read (use ``onnx``).
    """

    def __init__(self, model: Sam, onnx_dir: str | Path | None = None, precision: str = "f32") -> None:
        self.precision = precision
        super().__init__(model, onnx_dir)

    def _load(self, folder: Path) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise ImportError('backend="openvino" needs OpenVINO: pip install "tinysam[openvino]"') from None
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY"}
        compiled = {}
        for name in (ENCODER, DECODER):
            try:
                compiled[name] = core.compile_model(core.read_model(str(folder / name)), "CPU", config)
            except RuntimeError as err:  # OpenVINO's conversion error: an operator it cannot read
                raise ValueError(
                    f"OpenVINO cannot run {folder / name} ({' '.join(str(err).split())[:200]}); "
                    "use backend='onnx' for quantize.py's INT8 folders"
                ) from None
        self._run_encoder = lambda images: compiled[ENCODER]({"image": images})[0]
        self._run_decoder = lambda feed: [compiled[DECODER](feed)[i] for i in range(3)]


def auto_backend(model: Sam) -> str:
    """The fastest backend that computes the model's own maths for its device: ``factored`` on the CPU (the
    mask decoder's image side shared by all prompts; several times faster for many prompts, measured), else
    ``eager`` (the factored decoder is not measured on GPUs) and for a decoder it cannot fold (fake-quantized)."""
    if model.device.type != "cpu":
        return "eager"
    try:
        FactoredMaskDecoder(model.mask_decoder)
    except TypeError:  # a quantized or foreign decoder: only SAM's own can be factored
        return "eager"
    return "factored"


def make_backend(name: str, model: Sam, onnx_dir: str | Path | None = None):
    """The backend called ``name`` (one of :data:`BACKENDS`; ``auto``: :func:`auto_backend`) for ``model``."""
    if name == "auto":
        name = auto_backend(model)
    if name == "eager":
        return EagerBackend(model)
    if name == "factored":
        return FactoredBackend(model)
    if name == "compile":
        return CompiledBackend(model)
    if name == "onnx":
        return OnnxBackend(model, onnx_dir)
    if name in ("openvino", "openvino_bf16"):
        return OpenVinoBackend(model, onnx_dir, "bf16" if name == "openvino_bf16" else "f32")
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
