"""Real integer execution: the ONNX encoder with our quantized linear layers as integer kernels.

Every linear layer of the image encoder becomes ``QuantizeLinear`` (our activation scale,
uint8 with zero point 128: the grid of our symmetric int8) followed by onnxruntime's
``MatMulIntegerToFloat`` (int8 weights from our quantizer with our weight scale, the bias
folded in, float output). That is exactly the fake-quant linear layer, run by an integer
GEMM. Convolutions and the attention matmuls stay float in the ONNX model: on CPU,
onnxruntime's int8 convolutions need a quantize and a dequantize pass around every
convolution and lose the fused activations of its float convolutions, which made the
encoder slower than float (``bench/quantization.py``); attention matmuls have per-head
scales that onnxruntime's integer matmuls cannot take.
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


def integer_linear_layers(layers: dict[str, QuantLayer]) -> dict[str, QuantLayer]:
    """The enabled quantized linear layers, which the ONNX model runs as integer GEMMs."""
    return {
        n: q for n, q in layers.items() if isinstance(q, QuantLayer) and q.enabled and isinstance(q.layer, nn.Linear)
    }


def _bias_add(consumers: list[onnx.NodeProto], output: str, features: int, initializers: dict) -> onnx.NodeProto | None:
    """The ``Add`` of a constant bias of ``features`` values that alone consumes ``output``, if any."""
    if len(consumers) != 1 or consumers[0].op_type != "Add":
        return None
    other = [i for i in consumers[0].input if i != output]
    bias = initializers.get(other[0]) if len(other) == 1 else None
    return consumers[0] if bias is not None and list(bias.dims) == [features] else None


def _in_graph(weight: torch.Tensor, initializers: dict) -> bool:
    """Whether some initializer holds ``weight`` transposed, as a MatMul of that linear layer would."""
    target = weight.detach().T.numpy()
    return any(
        list(i.dims) == list(target.shape) and np.array_equal(numpy_helper.to_array(i), target)
        for i in initializers.values()
    )


def _integer_linear(node: onnx.NodeProto, quant: QuantLayer, bias_add: onnx.NodeProto | None) -> tuple[list, list]:
    """Nodes and initializers replacing ``node`` (x @ W^T) by QuantizeLinear + MatMulIntegerToFloat."""
    name = node.name
    weight = quantize(quant.layer.weight.detach(), quant.weight_scale, quant.weight_bits).T.contiguous()
    scale = quant.weight_scale.detach().flatten()
    inits = [
        numpy_helper.from_array(weight.numpy().astype(np.int8), f"{name}/weight_int8"),
        numpy_helper.from_array(
            scale.numpy().astype(np.float32).reshape(() if scale.numel() == 1 else -1), f"{name}/weight_scale"
        ),
        numpy_helper.from_array(np.array(float(quant.act_scale), np.float32), f"{name}/input_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), f"{name}/input_zero_point"),
    ]
    nodes, x = [], node.input[0]
    if quant.act_bits < 8:  # clip to the b-bit grid first; QuantizeLinear clips to 8 bits only
        limit = qmax(quant.act_bits) * float(quant.act_scale)
        inits += [
            numpy_helper.from_array(np.array(-limit - float(quant.act_scale), np.float32), f"{name}/input_min"),
            numpy_helper.from_array(np.array(limit, np.float32), f"{name}/input_max"),
        ]
        nodes.append(helper.make_node("Clip", [x, f"{name}/input_min", f"{name}/input_max"], [f"{name}/input_clipped"]))
        x = f"{name}/input_clipped"
    nodes.append(
        helper.make_node(
            "QuantizeLinear", [x, f"{name}/input_scale", f"{name}/input_zero_point"], [f"{name}/input_uint8"]
        )
    )
    bias = [i for i in bias_add.input if i != node.output[0]][0] if bias_add is not None else ""
    output = bias_add.output[0] if bias_add is not None else node.output[0]
    nodes.append(
        helper.make_node(
            "MatMulIntegerToFloat",
            [
                f"{name}/input_uint8",
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


def integer_onnx(float_path: Path, out_path: Path, layers: dict[str, QuantLayer], prefix: str) -> Counter:
    """Rewrite the float ONNX model at ``float_path`` with integer linear layers; returns its node count per op type."""
    model = onnx.load(str(float_path))
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    wanted = {n: q for n, q in integer_linear_layers(layers).items() if n.startswith(f"{prefix}.")}
    replaced: dict[str, tuple[list, list]] = {}
    dropped: set[str] = set()
    found: set[str] = set()
    for node in graph.node:
        name = module_path(node.name, prefix).removesuffix(".layer")  # QuantLayer wraps ``layer``
        quant = wanted.get(name)
        if node.op_type != "MatMul" or quant is None or node.input[1] not in initializers:
            continue
        out_features, in_features = quant.layer.weight.shape
        if list(initializers[node.input[1]].dims) != [in_features, out_features]:
            raise ValueError(
                f"{float_path}: node {node.name} has weight {initializers[node.input[1]].dims}, not {[in_features, out_features]}"
            )
        bias_add = _bias_add(consumers[node.output[0]], node.output[0], out_features, initializers)
        if bias_add is not None:
            dropped.add(bias_add.name)
        replaced[node.name] = _integer_linear(node, quant, bias_add)
        found.add(name)
    missing = sorted(n for n in set(wanted) - found if _in_graph(wanted[n].layer.weight, initializers))
    if missing:  # a layer outside the encoder's forward (TinyViT's classification head) is not in the graph
        raise ValueError(f"{float_path}: no MatMul node with a constant weight for quantized linear layers {missing}")
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
    """``encoder.onnx`` (integer linear layers with our scales) and ``decoder.onnx`` (float) of a calibrated model.

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
        "encoder": f"{ENCODER}: {ops['MatMulIntegerToFloat']} linear layers as QuantizeLinear + MatMulIntegerToFloat (int8); "
        f"{ops.get('Conv', 0)} convolutions and {ops.get('MatMul', 0)} attention matmuls in float",
        "decoder": f"{DECODER} (float)",
    }
