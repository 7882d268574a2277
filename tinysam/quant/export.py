"""Real integer execution: the float ONNX encoder/decoder quantized by onnxruntime with *our* scales.

onnxruntime's static QDQ quantizer inserts QuantizeLinear/DequantizeLinear around every matrix
multiplication and convolution that :mod:`tinysam.quant` quantized, with the calibrated and
searched scales given as tensor overrides (weights per output channel, activations per layer,
symmetric int8), so that onnxruntime's QDQ fusions run integer kernels. Other tensors stay float.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from segment_anything.modeling import Sam

from tinysam.quant.fake_quant import QuantLayer, weight_axis

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


def module_path(node_name: str, prefix: str) -> str:
    """The module a TorchScript-exported node came from: ``/layers.1/attn/qkv/MatMul`` -> ``prefix.layers.1.attn.qkv``."""
    parts = [p for p in node_name.split("/") if p][:-1]
    return ".".join([prefix, *parts]) if prefix else ".".join(parts)


def _weight(scale: float) -> dict:
    from onnxruntime.quantization import QuantType

    return {"scale": np.array(scale, np.float32), "zero_point": np.array(0, np.int8), "quant_type": QuantType.QInt8}


def _activation(scale: float) -> dict:
    """uint8 with zero point 128: the same grid as our symmetric int8 (onnxruntime's fast u8s8 kernels)."""
    from onnxruntime.quantization import QuantType

    return {"scale": np.array(scale, np.float32), "zero_point": np.array(128, np.uint8), "quant_type": QuantType.QUInt8}


def overrides(model_path: Path, layers: dict[str, QuantLayer], prefix: str) -> tuple[dict, list[str]]:
    """Tensor-quantization overrides carrying our scales, and the names of the nodes to quantize."""
    graph = onnx.load(str(model_path)).graph
    initializers = {i.name: i for i in graph.initializer}
    tensor_overrides, nodes = {}, []
    for node in graph.node:
        if node.op_type not in QUANTIZED_OPS or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        layer = layers.get(module_path(node.name, prefix).removesuffix(".layer"))  # QuantLayer wraps ``layer``
        if not isinstance(layer, QuantLayer) or not layer.enabled:
            continue  # attention matmuls stay float in the ONNX model
        weight = initializers[node.input[1]]
        axis = {"Conv": 0, "ConvTranspose": 1}.get(node.op_type, len(weight.dims) - 1)
        channels = weight.dims[axis]
        scales = layer.weight_scale.flatten().tolist()
        if weight_axis(layer.layer) is None:
            scales = scales * channels
        tensor_overrides[node.input[1]] = [_weight(s) for s in scales]
        tensor_overrides[node.input[1]][0]["axis"] = axis
        tensor_overrides[node.input[0]] = [_activation(float(layer.act_scale))]
        nodes.append(node.name)
    return tensor_overrides, nodes


class _Reader:
    """Feeds calibration inputs to onnxruntime (only tensors without an override use them)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def quantize_onnx(
    float_path: Path, out_path: Path, layers: dict[str, QuantLayer], prefix: str, feeds: list[dict[str, np.ndarray]]
) -> Path:
    """``float_path`` quantized to QDQ int8 with our scales, written to ``out_path``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    tensor_overrides, nodes = overrides(float_path, layers, prefix)
    if not nodes:
        raise ValueError(f"{float_path}: no node matches a quantized layer under '{prefix}'")
    quantize_static(
        str(float_path),
        str(out_path),
        _Reader(feeds),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        nodes_to_quantize=nodes,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"WeightSymmetric": True, "TensorQuantOverrides": tensor_overrides},
    )
    return out_path


def export_onnx(
    model: Sam, layers: dict[str, QuantLayer], out: str | Path, images: list[torch.Tensor]
) -> dict[str, str]:
    """``encoder.onnx`` (int8 QDQ with our scales) and ``decoder.onnx`` (float) of a calibrated model.

    ``images`` are preprocessed calibration inputs (3, S, S). The pair is what
    ``Predictor(model, backend="onnx", onnx_dir=out)`` runs.
    """
    from tinysam.export import DECODER, ENCODER, export_decoder, export_encoder

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    enabled = {n: layer.enabled for n, layer in layers.items()}
    for layer in layers.values():
        layer.enabled = False  # export the float graph; the QDQ pass adds the quantization
    try:
        float_path = export_encoder(model, out / "encoder_float.onnx")
        export_decoder(model, out / DECODER)
    finally:
        for n, layer in layers.items():
            layer.enabled = enabled[n]
    try:
        quantize_onnx(float_path, out / ENCODER, layers, "image_encoder", [{"image": x[None].numpy()} for x in images])
    finally:
        float_path.unlink()
    return {"encoder": f"{ENCODER} (int8 QDQ)", "decoder": f"{DECODER} (float)"}
