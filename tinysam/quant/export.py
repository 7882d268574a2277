"""Real integer execution: the ONNX encoder with our quantized layers as integer kernels.

Every linear layer of the image encoder becomes ``QuantizeLinear`` (our activation scale,
uint8 with zero point 128: the grid of our symmetric int8) followed by onnxruntime's
``MatMulIntegerToFloat`` (int8 weights from our quantizer with our weight scale, the bias
folded in, float output). That is exactly the fake-quant linear layer, run by an integer
GEMM. A requantized convolution (``wrap_model(requantize=...)``) becomes ``QuantizeLinear`` +
``QLinearConv`` (per-channel int8 weights, int8 output on our output scale) +
``DequantizeLinear``: exactly its fake-quant layer, which quantizes the output too.
The other convolutions and the attention matmuls stay float in the ONNX model: on CPU,
onnxruntime's int8 convolutions need a quantize and a dequantize pass around every
convolution and lose the fused activations of its float convolutions, which made the
high-resolution stages slower than float (``bench/quantization.py``); attention matmuls have
per-head scales that onnxruntime's integer matmuls cannot take.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from segment_anything.modeling import Sam
from torch import nn

from tinysam.quant.fake_quant import QuantLayer
from tinysam.quant.quantizers import qmax, quantize

ONNXRUNTIME_DOMAIN = "com.microsoft"


def module_path(node_name: str, prefix: str) -> str:
    """The module a TorchScript-exported node came from.

    ``/layers.1/attn/qkv/MatMul`` -> ``prefix.layers.1.attn.qkv``; a Sequential child is scoped
    as ``/neck/neck.0/...`` and maps to ``prefix.neck.0``.
    """
    parts: list[str] = []
    for part in [p for p in node_name.split("/") if p][:-1]:
        parts.append(part.removeprefix(f"{parts[-1]}.") if parts else part)
    return ".".join([prefix, *parts]) if prefix else ".".join(parts)


def integer_layers(layers: dict[str, QuantLayer]) -> dict[str, QuantLayer]:
    """The enabled quantized layers the ONNX model runs in integer: linear layers and requantized convolutions."""
    return {
        n: q
        for n, q in layers.items()
        if isinstance(q, QuantLayer) and q.enabled and (isinstance(q.layer, nn.Linear) or q.requantize)
    }


def _bias_add(consumers: list[onnx.NodeProto], output: str, features: int, initializers: dict) -> onnx.NodeProto | None:
    """The ``Add`` of a constant bias of ``features`` values that alone consumes ``output``, if any."""
    if len(consumers) != 1 or consumers[0].op_type != "Add":
        return None
    other = [i for i in consumers[0].input if i != output]
    bias = initializers.get(other[0]) if len(other) == 1 else None
    return consumers[0] if bias is not None and list(bias.dims) == [features] else None


def _in_graph(layer: nn.Module, initializers: dict) -> bool:
    """Whether some initializer holds the layer's weight (transposed for a linear layer, as its MatMul has it)."""
    target = (layer.weight.T if isinstance(layer, nn.Linear) else layer.weight).detach().numpy()
    return any(
        list(i.dims) == list(target.shape) and np.array_equal(numpy_helper.to_array(i), target)
        for i in initializers.values()
    )


def _quantize_input(name: str, x: str, scale: float, bits: int) -> tuple[list, list, str]:
    """Nodes, initializers and output name quantizing ``x`` to uint8 (zero point 128) on the b-bit grid of ``scale``."""
    inits = [
        numpy_helper.from_array(np.array(scale, np.float32), f"{name}/input_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), f"{name}/input_zero_point"),
    ]
    nodes = []
    if bits < 8:  # clip to the b-bit grid first; QuantizeLinear clips to 8 bits only
        nodes, more, x = _clip_to_grid(f"{name}/input", x, scale, bits)
        inits += more
    nodes.append(
        helper.make_node(
            "QuantizeLinear", [x, f"{name}/input_scale", f"{name}/input_zero_point"], [f"{name}/input_uint8"]
        )
    )
    return nodes, inits, f"{name}/input_uint8"


def _clip_to_grid(name: str, x: str, scale: float, bits: int, out: str | None = None) -> tuple[list, list, str]:
    """A Clip of ``x`` to [-2^(b-1), 2^(b-1) - 1] x ``scale``: the range of the b-bit grid."""
    out = out or f"{name}_clipped"
    inits = [
        numpy_helper.from_array(np.array(-(qmax(bits) + 1) * scale, np.float32), f"{name}_min"),
        numpy_helper.from_array(np.array(qmax(bits) * scale, np.float32), f"{name}_max"),
    ]
    return [helper.make_node("Clip", [x, f"{name}_min", f"{name}_max"], [out])], inits, out


def _int8_weight(quant: QuantLayer, name: str, transpose: bool) -> list:
    """The layer's int8 weight levels and their float scales as initializers ``<name>/weight_int8|scale``."""
    levels = quantize(quant.layer.weight.detach(), quant.weight_scale, quant.weight_bits)
    scale = quant.weight_scale.detach().flatten()
    return [
        numpy_helper.from_array(
            (levels.T if transpose else levels).contiguous().numpy().astype(np.int8), f"{name}/weight_int8"
        ),
        numpy_helper.from_array(
            scale.numpy().astype(np.float32).reshape(() if scale.numel() == 1 else -1), f"{name}/weight_scale"
        ),
    ]


def _integer_linear(node: onnx.NodeProto, quant: QuantLayer, bias_add: onnx.NodeProto | None) -> tuple[list, list]:
    """Nodes and initializers replacing ``node`` (x @ W^T) by QuantizeLinear + MatMulIntegerToFloat."""
    name = node.name
    nodes, inits, x_q = _quantize_input(name, node.input[0], float(quant.act_scale), quant.act_bits)
    inits += _int8_weight(quant, name, transpose=True)
    bias = [i for i in bias_add.input if i != node.output[0]][0] if bias_add is not None else ""
    output = bias_add.output[0] if bias_add is not None else node.output[0]
    nodes.append(
        helper.make_node(
            "MatMulIntegerToFloat",
            [
                x_q,
                f"{name}/weight_int8",
                f"{name}/input_scale",
                f"{name}/weight_scale",
                f"{name}/input_zero_point",
                "",
                bias,
            ],
            [output],
            name=name,
            domain=ONNXRUNTIME_DOMAIN,
        )
    )
    return nodes, inits


def _integer_conv(node: onnx.NodeProto, quant: QuantLayer, initializers: dict) -> tuple[list, list]:
    """Nodes and initializers replacing a float ``Conv`` by QuantizeLinear + QLinearConv + DequantizeLinear.

    Input, per-channel weights and output on our grids (uint8 with zero point 128 for activations);
    the bias is int32 on the grid of input scale x weight scale, as QLinearConv takes it.
    """
    name, bits = node.name, quant.act_bits
    act_scale, out_scale = float(quant.act_scale), float(quant.out_scale)
    nodes, inits, x_q = _quantize_input(name, node.input[0], act_scale, bits)
    inits += _int8_weight(quant, name, transpose=False)
    channels = quant.layer.weight.shape[0]
    inits += [
        numpy_helper.from_array(np.zeros(channels, np.int8), f"{name}/weight_zero_point"),
        numpy_helper.from_array(np.array(out_scale, np.float32), f"{name}/output_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), f"{name}/output_zero_point"),
    ]
    bias = ""
    if len(node.input) > 2 and node.input[2]:
        step = act_scale * quant.weight_scale.detach().flatten().double().numpy()
        levels = np.round(numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64) / step)
        inits.append(numpy_helper.from_array(levels.astype(np.int32), f"{name}/bias_int32"))
        bias = f"{name}/bias_int32"
    conv = helper.make_node(
        "QLinearConv",
        [
            x_q,
            f"{name}/input_scale",
            f"{name}/input_zero_point",
            f"{name}/weight_int8",
            f"{name}/weight_scale",
            f"{name}/weight_zero_point",
            f"{name}/output_scale",
            f"{name}/output_zero_point",
            bias,
        ],
        [f"{name}/output_uint8"],
        name=name,
    )
    conv.attribute.extend(node.attribute)
    nodes.append(conv)
    dequantized = node.output[0] if bits == 8 else f"{name}/output_dequantized"
    nodes.append(
        helper.make_node(
            "DequantizeLinear",
            [f"{name}/output_uint8", f"{name}/output_scale", f"{name}/output_zero_point"],
            [dequantized],
        )
    )
    if bits < 8:  # the b-bit grid of the output: QLinearConv saturates at 8 bits only
        clip, more, _ = _clip_to_grid(f"{name}/output", dequantized, out_scale, bits, out=node.output[0])
        nodes += clip
        inits += more
    return nodes, inits


def integer_onnx(float_path: Path, out_path: Path, layers: dict[str, QuantLayer], prefix: str) -> Counter:
    """Rewrite the float ONNX model at ``float_path`` with integer layers; returns its node count per op type."""
    model = onnx.load(str(float_path))
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    wanted = {n: q for n, q in integer_layers(layers).items() if n.startswith(f"{prefix}.")}
    replaced: dict[str, tuple[list, list]] = {}
    dropped: set[str] = set()
    found: set[str] = set()
    for node in graph.node:
        name = module_path(node.name, prefix).removesuffix(".layer")  # QuantLayer wraps ``layer``
        quant = wanted.get(name)
        if quant is None or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        weight = list(initializers[node.input[1]].dims)
        expected = list(quant.layer.weight.shape)
        if node.op_type == "MatMul" and isinstance(quant.layer, nn.Linear):
            expected = expected[::-1]
            bias_add = _bias_add(consumers[node.output[0]], node.output[0], expected[1], initializers)
            if bias_add is not None:
                dropped.add(bias_add.name)
            replacement = _integer_linear(node, quant, bias_add)
        elif node.op_type == "Conv" and quant.requantize:
            replacement = _integer_conv(node, quant, initializers)
        else:
            continue
        if weight != expected:
            raise ValueError(f"{float_path}: node {node.name} has weight {weight}, not {expected}")
        replaced[node.name] = replacement
        found.add(name)
    missing = sorted(n for n in set(wanted) - found if _in_graph(wanted[n].layer, initializers))
    if missing:  # a layer outside the encoder's forward (TinyViT's classification head) is not in the graph
        raise ValueError(f"{float_path}: no MatMul or Conv node with a constant weight for quantized layers {missing}")
    nodes, new_inits = [], []
    for node in graph.node:
        if node.name in dropped:
            continue
        if node.name in replaced:
            nodes += replaced[node.name][0]
            new_inits += replaced[node.name][1]
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    model.opset_import.append(helper.make_opsetid(ONNXRUNTIME_DOMAIN, 1))
    onnx.save(model, str(out_path))
    return Counter(node.op_type for node in graph.node)


def export_onnx(model: Sam, layers: dict[str, QuantLayer], out: str | Path) -> dict[str, str]:
    """``encoder.onnx`` (integer layers with our scales) and ``decoder.onnx`` (float) of a calibrated model.

    The pair is what ``Predictor(model, backend="onnx", onnx_dir=out)`` runs.
    """
    from tinysam.export import DECODER, ENCODER, export_decoder, export_encoder

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    enabled = {n: layer.enabled for n, layer in layers.items()}
    for layer in layers.values():
        layer.enabled = False  # export the float graph; the rewrite adds the quantization
    try:
        float_path = export_encoder(model, out / "encoder_float.onnx")
        export_decoder(model, out / DECODER)
    finally:
        for n, layer in layers.items():
            layer.enabled = enabled[n]
    try:
        with torch.no_grad():
            ops = integer_onnx(float_path, out / ENCODER, layers, "image_encoder")
    finally:
        float_path.unlink()
    return {
        "encoder": f"{ENCODER}: {ops['MatMulIntegerToFloat']} linear layers as QuantizeLinear + MatMulIntegerToFloat "
        f"and {ops['QLinearConv']} convolutions as QuantizeLinear + QLinearConv + DequantizeLinear (int8); "
        f"{ops.get('Conv', 0)} convolutions and {ops.get('MatMul', 0)} attention matmuls in float",
        "decoder": f"{DECODER} (float)",
    }
