"""Real integer execution: the ONNX encoder and decoder with our quantized layers as integer kernels.

The decoder's integer layers are the linear layers of SAM's two-way transformer, rewritten as the
encoder's linear layers are (below); the rest of the decoder stays float.

Every linear layer of the image encoder becomes ``QuantizeLinear`` (our activation scale,
uint8 with zero point 128: the grid of our symmetric int8) followed by onnxruntime's
``MatMulIntegerToFloat`` (the int8 weight levels of our quantizer with our weight scale, stored
as uint8 with zero point 128, the bias folded in, float output). That is exactly the fake-quant
linear layer, run by an integer GEMM. A requantized convolution (``wrap_model(requantize=...)``)
becomes ``QuantizeLinear`` + ``QLinearConv`` (per-channel weight levels, output on our output
scale) + ``DequantizeLinear``: exactly its fake-quant layer, which quantizes the output too. An
integer GELU (:class:`~tinysam.quant.fake_quant.QuantGELU`) becomes ``QuantizeLinear`` +
``QLinearSigmoid`` + ``QLinearMul`` + ``DequantizeLinear``. Then every dequantize -> quantize
pair on one grid goes (calibration gives a module whose input is a quantized output that grid),
and an ``Add`` of two dequantized tensors whose sum is quantized becomes ``QLinearAdd``: TinyViT's
conv stage (convolutions, GELUs, residual adds) runs in uint8 from end to end.
The other convolutions and the attention matmuls stay float in the ONNX model: a float
convolution between float neighbours would pay a quantize and a dequantize pass and lose the
activation that onnxruntime fuses into its float convolutions; attention matmuls have per-head
scales that onnxruntime's integer matmuls cannot take. Weights are stored as uint8 because
onnxruntime computes uint8 x uint8 exactly on every x86 CPU, while its uint8 x int8 kernels
saturate on CPUs without VNNI (AVX2: pairs of products summed in int16), and its int8 x int8
kernels are exact but several times slower there.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from segment_anything.modeling import Sam
from torch import nn

from tinysam.quant.fake_quant import SIGMOID_ALPHA, SIGMOID_LEVELS, QuantGELU, QuantLayer, float_copy
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


def _graph_weight(layer: nn.Module) -> np.ndarray:
    """The layer's weight as its node holds it (transposed for a linear layer's MatMul)."""
    return (layer.weight.T if isinstance(layer, nn.Linear) else layer.weight).detach().float().contiguous().numpy()


def _in_graph(layer: nn.Module, initializers: dict) -> bool:
    """Whether some initializer holds the layer's weight."""
    target = _graph_weight(layer)
    return any(
        list(i.dims) == list(target.shape) and np.array_equal(numpy_helper.to_array(i), target)
        for i in initializers.values()
    )


def _weight_key(weight: np.ndarray) -> tuple:
    return weight.shape, weight.tobytes()


def _by_weight(layers: dict[str, QuantLayer]) -> dict[tuple, str]:
    """Layer names by their graph weight's shape and bytes, for the weights no two layers share."""
    keys = {name: _weight_key(_graph_weight(q.layer)) for name, q in layers.items()}
    counts = Counter(keys.values())
    return {key: name for name, key in keys.items() if counts[key] == 1}


def _scalar(value: float, name: str, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype), name)


def _clip_to_grid(name: str, x: str, bits: int) -> tuple[list, list, str]:
    """A Clip of uint8 ``x`` (zero point 128) to the b-bit grid [128 - 2^(b-1), 128 + 2^(b-1) - 1]."""
    inits = [_scalar(128 - qmax(bits) - 1, f"{name}_min", np.uint8), _scalar(128 + qmax(bits), f"{name}_max", np.uint8)]
    return [helper.make_node("Clip", [x, f"{name}_min", f"{name}_max"], [f"{name}_clipped"])], inits, f"{name}_clipped"


def _on_grid(name: str, x: str, bits: int) -> tuple[list, list, str]:
    """``x`` (uint8) itself at 8 bits; clipped to the b-bit grid below (integer kernels saturate at 8 bits only)."""
    return ([], [], x) if bits == 8 else _clip_to_grid(name, x, bits)


def _quantize_input(name: str, x: str, scale: float, bits: int) -> tuple[list, list, str]:
    """Nodes, initializers and output name quantizing ``x`` to uint8 (zero point 128) on the b-bit grid of ``scale``."""
    inits = [_scalar(scale, f"{name}/input_scale"), _scalar(128, f"{name}/input_zero_point", np.uint8)]
    quantize = helper.make_node(
        "QuantizeLinear", [x, f"{name}/input_scale", f"{name}/input_zero_point"], [f"{name}/input_uint8"]
    )
    nodes, more, out = _on_grid(f"{name}/input", f"{name}/input_uint8", bits)
    return [quantize, *nodes], inits + more, out


def _dequantize_output(name: str, x: str, out: str, bits: int) -> tuple[list, list]:
    """Nodes dequantizing uint8 ``x`` (on ``<name>/output_scale``, zero point 128) into ``out``, b-bit grid first."""
    nodes, inits, x = _on_grid(f"{name}/output", x, bits)
    dequantize = helper.make_node("DequantizeLinear", [x, f"{name}/output_scale", f"{name}/output_zero_point"], [out])
    return [*nodes, dequantize], inits


def _uint8_weight(quant: QuantLayer, name: str, transpose: bool) -> list:
    """The layer's weight levels as uint8 (zero point 128) with their float scales: ``<name>/weight_uint8|scale``.

    Our int8 levels shifted by 128: uint8 x uint8 is the integer GEMM onnxruntime computes exactly on
    every x86 CPU; its uint8 x int8 kernels sum pairs of products in int16 without VNNI and saturate.
    """
    levels = quantize(quant.layer.weight.detach(), quant.weight_scale, quant.weight_bits).to(torch.int16) + 128
    scale = quant.weight_scale.detach().flatten()
    shape = () if scale.numel() == 1 else (-1,)
    return [
        numpy_helper.from_array(
            (levels.T if transpose else levels).contiguous().numpy().astype(np.uint8), f"{name}/weight_uint8"
        ),
        numpy_helper.from_array(scale.numpy().astype(np.float32).reshape(shape), f"{name}/weight_scale"),
        numpy_helper.from_array(np.full(scale.numel(), 128, np.uint8).reshape(shape), f"{name}/weight_zero_point"),
    ]


def _integer_linear(node: onnx.NodeProto, quant: QuantLayer, bias_add: onnx.NodeProto | None) -> tuple[list, list]:
    """Nodes and initializers replacing ``node`` (x @ W^T) by QuantizeLinear + MatMulIntegerToFloat."""
    name = node.name
    nodes, inits, x_q = _quantize_input(name, node.input[0], float(quant.act_scale), quant.act_bits)
    inits += _uint8_weight(quant, name, transpose=True)
    bias = [i for i in bias_add.input if i != node.output[0]][0] if bias_add is not None else ""
    output = bias_add.output[0] if bias_add is not None else node.output[0]
    nodes.append(
        helper.make_node(
            "MatMulIntegerToFloat",
            [
                x_q,
                f"{name}/weight_uint8",
                f"{name}/input_scale",
                f"{name}/weight_scale",
                f"{name}/input_zero_point",
                f"{name}/weight_zero_point",
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

    Input, per-channel weights and output on our grids (uint8 with zero point 128);
    the bias is int32 on the grid of input scale x weight scale, as QLinearConv takes it.
    """
    name, bits = node.name, quant.act_bits
    act_scale, out_scale = float(quant.act_scale), float(quant.out_scale)
    nodes, inits, x_q = _quantize_input(name, node.input[0], act_scale, bits)
    inits += _uint8_weight(quant, name, transpose=False)
    inits += [
        _scalar(out_scale, f"{name}/output_scale"),
        _scalar(128, f"{name}/output_zero_point", np.uint8),
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
            f"{name}/weight_uint8",
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
    more_nodes, more_inits = _dequantize_output(name, f"{name}/output_uint8", node.output[0], bits)
    return [*nodes, conv, *more_nodes], inits + more_inits


def _integer_gelu(name: str, x: str, y: str, gelu: QuantGELU) -> tuple[list, list]:
    """Nodes and initializers of :class:`QuantGELU` from float ``x`` to float ``y``.

    QuantizeLinear (``in_scale``), ``QLinearSigmoid`` (a lookup table on uint8, of 1.702 x, onto
    k / 255), ``QLinearMul`` (x times the sigmoid, onto ``out_scale``), DequantizeLinear.
    """
    in_scale, bits = float(gelu.in_scale), gelu.act_bits
    nodes, inits, x_q = _quantize_input(name, x, in_scale, bits)
    inits += [
        _scalar(SIGMOID_ALPHA * in_scale, f"{name}/sigmoid_input_scale"),
        _scalar(1 / SIGMOID_LEVELS, f"{name}/sigmoid_scale"),
        _scalar(0, f"{name}/sigmoid_zero_point", np.uint8),
        _scalar(float(gelu.out_scale), f"{name}/output_scale"),
        _scalar(128, f"{name}/output_zero_point", np.uint8),
    ]
    sigmoid = [f"{name}/sigmoid_uint8", f"{name}/sigmoid_scale", f"{name}/sigmoid_zero_point"]
    nodes += [
        helper.make_node(
            "QLinearSigmoid",
            [x_q, f"{name}/sigmoid_input_scale", f"{name}/input_zero_point", *sigmoid[1:]],
            sigmoid[:1],
            domain=ONNXRUNTIME_DOMAIN,
        ),
        helper.make_node(
            "QLinearMul",
            [x_q, f"{name}/input_scale", f"{name}/input_zero_point", *sigmoid]
            + [f"{name}/output_scale", f"{name}/output_zero_point"],
            [f"{name}/output_uint8"],
            name=name,
            domain=ONNXRUNTIME_DOMAIN,
        ),
    ]
    more_nodes, more_inits = _dequantize_output(name, f"{name}/output_uint8", y, bits)
    return nodes + more_nodes, inits + more_inits


def _gelu_replacements(
    graph: onnx.GraphProto, prefix: str, gelus: dict[str, QuantGELU], consumers: dict
) -> tuple[dict[str, tuple[list, list]], set[str]]:
    """Integer GELU nodes, keyed by the first node of each exported GELU, and the other nodes they replace."""
    members: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        if (name := module_path(node.name, prefix)) in gelus:
            members[name].append(node)
    constants = {i.name for i in graph.initializer}
    replaced, dropped = {}, set()
    for name, nodes in members.items():
        inside = {o for n in nodes for o in n.output}
        x = {i for n in nodes for i in n.input if i not in inside and i not in constants}
        y = {o for n in nodes for o in n.output if any(c not in nodes for c in consumers[o])}
        if len(x) != 1 or len(y) != 1:
            raise ValueError(f"integer_gelu: {name} is not one exported GELU (inputs {sorted(x)}, outputs {sorted(y)})")
        replaced[nodes[0].name] = _integer_gelu(f"/{name}/integer_gelu", x.pop(), y.pop(), gelus[name])
        dropped.update(n.name for n in nodes[1:])
    missing = sorted(set(gelus) - set(members))
    if missing:
        raise ValueError(f"integer_gelu: no exported nodes for {missing}")
    return replaced, dropped


def _integer_adds(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Each Add of two dequantized tensors whose sum only a QuantizeLinear reads becomes one ``QLinearAdd``."""
    producer = {o: node for node in nodes for o in node.output}
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in nodes:
        for i in node.input:
            readers[i].append(node)
    fused, gone = {}, set()
    for node in nodes:
        sources = [producer.get(i) for i in node.input]
        after = readers[node.output[0]] if node.op_type == "Add" else []
        if (
            len(after) == 1
            and after[0].op_type == "QuantizeLinear"
            and all(p is not None and p.op_type == "DequantizeLinear" for p in sources)
        ):
            (a, b), q = sources, after[0]
            fused[node.name] = helper.make_node(
                "QLinearAdd",
                [*a.input, *b.input, *q.input[1:]],
                list(q.output),
                name=node.name,
                domain=ONNXRUNTIME_DOMAIN,
            )
            gone.add(id(q))
    return [fused.get(n.name, n) for n in nodes if id(n) not in gone]


def _fold_requantization(nodes: list[onnx.NodeProto], initializers: dict, outputs: set[str]) -> list[onnx.NodeProto]:
    """Drop each DequantizeLinear -> QuantizeLinear pair on one grid: the uint8 tensor flows on as it is."""
    producer = {o: node for node in nodes for o in node.output}

    def same(a: str, b: str) -> bool:
        return np.array_equal(numpy_helper.to_array(initializers[a]), numpy_helper.to_array(initializers[b]))

    alias = {}
    for node in nodes:
        source = producer.get(node.input[0]) if node.op_type == "QuantizeLinear" else None
        if (
            source is not None
            and source.op_type == "DequantizeLinear"
            and all(same(a, b) for a, b in zip(source.input[1:], node.input[1:], strict=True))
        ):
            alias[node.output[0]] = source.input[0]
    kept = [n for n in nodes if not (n.op_type == "QuantizeLinear" and n.output[0] in alias)]
    for node in kept:
        node.input[:] = [alias.get(i, i) for i in node.input]
    used = {i for n in kept for i in n.input} | outputs
    return [n for n in kept if n.op_type != "DequantizeLinear" or n.output[0] in used]


def integer_onnx(float_path: Path, out_path: Path, layers: dict[str, QuantLayer | QuantGELU], prefix: str) -> Counter:
    """Rewrite the float ONNX model at ``float_path`` with integer layers; returns its node count per op type.

    A node is a layer's by its scope (the module that exported it) or, in a graph whose computation is
    arranged otherwise (the split decoder's), by its constant weight: the layer's own.
    """
    model = onnx.load(str(float_path))
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    wanted = {n: q for n, q in integer_layers(layers).items() if n.startswith(f"{prefix}.")}
    gelus = {n: q for n, q in layers.items() if isinstance(q, QuantGELU) and q.enabled and n.startswith(f"{prefix}.")}
    replaced, dropped = _gelu_replacements(graph, prefix, gelus, consumers)
    found: set[str] = set()
    by_weight = _by_weight(wanted)
    for node in graph.node:
        if len(node.input) < 2 or node.input[1] not in initializers:
            continue
        name = module_path(node.name, prefix).removesuffix(".layer")  # QuantLayer wraps ``layer``
        if name not in wanted and node.op_type in ("MatMul", "Conv"):  # the only nodes rewritten below
            name = by_weight.get(_weight_key(numpy_helper.to_array(initializers[node.input[1]])), name)
        quant = wanted.get(name)
        if quant is None:
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
    initializers.update((i.name, i) for i in new_inits)
    nodes = _fold_requantization(_integer_adds(nodes), initializers, {o.name for o in graph.output})
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    del graph.initializer[:]
    graph.initializer.extend(i for name, i in initializers.items() if name in used)
    model.opset_import.append(helper.make_opsetid(ONNXRUNTIME_DOMAIN, 1))
    onnx.save(model, str(out_path))
    return Counter(node.op_type for node in graph.node)


def export_onnx(model: Sam, layers: dict[str, QuantLayer | QuantGELU], out: str | Path) -> dict[str, str]:
    """``encoder.onnx``, ``decoder.onnx`` and the split decoder with our quantized layers as integer kernels, and
    ``export.json`` (the runtime metadata of :func:`~tinysam.models.onnx_graphs.onnx_metadata`) of a calibrated model.

    In the decoder that is every linear layer of SAM's two-way transformer (the per-prompt work
    over the image tokens); its small token MLPs (hypernetworks, IoU head; ``Gemm`` nodes), the
    attention matmuls and the upscaling stay float. The pair is what
    ``Predictor(model, backend="onnx", onnx_dir=out)`` runs, everything mode included. The split decoder
    (``decoder_image.onnx``, ``decoder_prompt.onnx``, ``decoder_preview.onnx``, unfolded: see
    :mod:`tinysam.models.onnx_graphs`) runs the same integer layers, the first layer's image side once per image.
    """
    from tinysam.models.onnx_graphs import (
        DECODER,
        DECODER_IMAGE,
        DECODER_PROMPT,
        ENCODER,
        METADATA,
        export_decoder,
        export_encoder,
        export_split_decoder,
        onnx_metadata,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    enabled = {n: layer.enabled for n, layer in layers.items()}
    for layer in layers.values():
        layer.enabled = False  # export the float graphs; the rewrite adds the quantization
    with tempfile.TemporaryDirectory(prefix=".float-", dir=out) as tmp:
        try:
            float_paths = {
                ENCODER: (export_encoder(model, Path(tmp) / ENCODER), "image_encoder"),
                DECODER: (export_decoder(model, Path(tmp) / DECODER), "mask_decoder"),
            }
            for path in export_split_decoder(float_copy(model), tmp, fold=False):
                float_paths[path.name] = (path, "mask_decoder")
        finally:
            for n, layer in layers.items():
                layer.enabled = enabled[n]
        with torch.no_grad():
            ops = {name: integer_onnx(path, out / name, layers, prefix) for name, (path, prefix) in float_paths.items()}
    integer = {name: counts["MatMulIntegerToFloat"] for name, counts in ops.items()}
    if integer[DECODER_IMAGE] + integer[DECODER_PROMPT] != integer[DECODER]:
        raise ValueError(f"{out}: the split decoder's integer layers {integer} are not decoder.onnx's")
    (out / METADATA).write_text(json.dumps(onnx_metadata(model), indent=2))
    encoder, decoder = ops[ENCODER], ops[DECODER]
    return {
        "encoder": f"{ENCODER}: {encoder['MatMulIntegerToFloat']} linear layers as MatMulIntegerToFloat, "
        f"{encoder['QLinearConv']} convolutions as QLinearConv and {encoder['QLinearSigmoid']} GELUs as "
        f"QLinearSigmoid + QLinearMul (int8), with {encoder['QuantizeLinear']} QuantizeLinear and "
        f"{encoder['DequantizeLinear']} DequantizeLinear where float and integer meet; "
        f"{encoder.get('Conv', 0)} convolutions and {encoder.get('MatMul', 0)} attention matmuls in float",
        "decoder": f"{DECODER}: {decoder['MatMulIntegerToFloat']} linear layers of the two-way transformer as "
        f"MatMulIntegerToFloat (int8); {decoder.get('Gemm', 0)} token MLP layers, {decoder.get('MatMul', 0)} "
        f"attention matmuls and the upscaling in float; split: {integer[DECODER_IMAGE]} of them once per image "
        f"({DECODER_IMAGE}), {integer[DECODER_PROMPT]} per click ({DECODER_PROMPT} and its preview)",
    }
