"""Quantization: quantizer error bounds, Hessian-guided search vs min-max, calibration, artifacts, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tinysam import Predictor, build_student
from tinysam.assets import asset_path
from tinysam.loader import load_model
from tinysam.models.checkpoint import CheckpointError
from tinysam.quant.artifact import load_quantized, save_quantized
from tinysam.quant.attention import QuantMatMul
from tinysam.quant.calibrate import calibrate, collect
from tinysam.quant.fake_quant import QuantGELU, QuantLayer, wrap_model
from tinysam.quant.quantizers import TwinScale, absmax_scale, check_bits, fake_quant, qmax, quantize
from tinysam.quant.scale_search import (
    LayerSamples,
    MatMulSamples,
    hessian_distance,
    minmax_layer,
    minmax_matmul,
    search_layer,
    search_matmul,
)


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_error_bounds_per_layer_channel_and_head(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 8, generator=g) * torch.tensor([0.01, 1.0, 10.0, 100.0]).view(1, 4, 1, 1)
    for dims in [(), (1,)]:  # per layer; per channel / per head (axis 1 of (B, heads, tokens, dim))
        scale = absmax_scale(x, bits, dims)
        assert scale.shape == ((1, 1, 1, 1) if not dims else (1, 4, 1, 1))
        err = (fake_quant(x, scale, bits) - x).abs()
        assert (err <= scale / 2 + 1e-6).all(), "within half a step everywhere inside the range"
        levels = quantize(x, scale, bits)
        assert levels.min() >= -(2 ** (bits - 1)) and levels.max() <= qmax(bits) and (levels == levels.round()).all()
    per_layer = (fake_quant(x, absmax_scale(x, bits), bits) - x)[:, 0].abs().max()
    per_channel = (fake_quant(x, absmax_scale(x, bits, (1,)), bits) - x)[:, 0].abs().max()
    assert per_channel < per_layer / 10, "a small channel keeps its precision with its own scale"
    outside = fake_quant(torch.tensor([1e6]), torch.tensor(1.0), bits)
    assert outside.item() == qmax(bits), "values beyond the range clip to the top level"


def test_twin_scale_keeps_small_values_fine():
    probs = torch.softmax(torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(1)) * 3, dim=-1)
    single = fake_quant(probs, absmax_scale(probs, 8), 8)
    twin = TwinScale(small=torch.tensor(1 / 2**12), large=absmax_scale(probs, 7), bits=8)(probs)
    small = probs < 0.01
    assert (twin - probs)[small].abs().mean() < (single - probs)[small].abs().mean() / 4
    assert (twin - probs).abs().max() <= absmax_scale(probs, 7) / 2 + 1e-6


def test_unsupported_bits_are_refused():
    with pytest.raises(ValueError, match="unsupported bit width 16"):
        check_bits(16)
    with pytest.raises(ValueError, match="unsupported bit width 1"):
        QuantLayer(nn.Linear(2, 2), weight_bits=1)


@pytest.mark.parametrize("case", ["heavy_tailed", "outliers_that_do_not_matter"])
def test_search_beats_minmax_on_a_layer_with_outliers(case):
    torch.manual_seed(0)
    layer = QuantLayer(nn.Linear(32, 16), weight_bits=4, act_bits=4)
    if case == "heavy_tailed":  # ViT-like activations: a few large values stretch the min-max range
        x = torch.distributions.StudentT(2.0).sample((512, 32))
    else:
        x = torch.randn(512, 32)
        x[::97, 3] = 80.0
    with torch.no_grad():
        out = layer.layer(x)
    grads = torch.ones_like(out)
    if case == "outliers_that_do_not_matter":
        grads[::97] = 0.0  # dL/dO = 0 on the outlier rows: the Hessian-guided distance ignores them
    samples = LayerSamples(x, out, grads)
    minmax_layer(layer, samples)
    minmax = hessian_distance(layer, samples, layer.weight_scale, layer.act_scale).sum()
    report = search_layer(layer, samples, rounds=2, candidates=50)
    searched = hessian_distance(layer, samples, layer.weight_scale, layer.act_scale).sum()
    assert report["minmax"] == pytest.approx(minmax.item()) and report["searched"] == pytest.approx(searched.item())
    assert searched < (0.7 if case == "heavy_tailed" else 0.1) * minmax, (searched, minmax)
    assert layer.act_scale < x.abs().max() / qmax(4), "the search clips the outliers"


def test_hessian_weighting_follows_the_gradient():
    """Where dL/dO is zero, errors do not count: the search then ignores those outputs."""
    g = torch.Generator().manual_seed(2)
    layer = QuantLayer(nn.Conv2d(3, 4, 3, padding=1), weight_bits=4, act_bits=8)
    x = torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        out = layer.layer(x)
    grads = torch.zeros_like(out)
    grads[:, 0] = 1.0  # only channel 0 matters
    samples = LayerSamples(x, out, grads)
    per_channel = hessian_distance(layer, samples, layer.weight_scale, (x.abs().max() / 127).reshape(()))
    assert per_channel.shape == (4,) and per_channel[0] > 0 and (per_channel[1:] == 0).all()


@pytest.fixture(scope="module")
def toy_images():
    from tinysam.data.toyworld import ToyWorldConfig, generate_image, image_rng

    cfg = ToyWorldConfig(out="unused", n_train=4, n_val=0, seed=0)
    return [generate_image(image_rng(0, "train", i), cfg).image for i in range(4)]


def mask_agreement(a: Predictor, b: Predictor, images) -> float:
    ious = []
    for rgb in images:
        a.set_image(rgb)
        b.set_image(rgb)
        boxes = np.array([[20, 30, 120, 160], [100, 40, 240, 200], [10, 10, 250, 250]])
        ma, _, _ = a.predict(boxes=boxes, multimask_output=False)
        mb, _, _ = b.predict(boxes=boxes, multimask_output=False)
        inter, union = (ma & mb).sum((1, 2, 3)), (ma | mb).sum((1, 2, 3))
        ious += list(inter / np.maximum(union, 1))
    return float(np.mean(ious))


def test_calibrated_w8a8_toy_student_stays_close_and_reloads(toy_images, tmp_path):
    float_model = load_model("tinyvit_toy", asset_path("toy_student.safetensors"))
    model = load_model("tinyvit_toy", asset_path("toy_student.safetensors"))
    layers = wrap_model(model)
    samples = collect(model, layers, toy_images[:2], points_per_side=2)
    assert len(samples) > 50 and all(s.grads.abs().sum() > 0 for s in samples.values())
    report = calibrate(layers, samples, "hessian", rounds=1, candidates=20)
    # the search must earn something: the summed distance drops by more than 10%, and so does the distance of
    # the layer with the heaviest outliers (largest max / std of its calibration inputs; 0.81x measured), whose
    # activation range is clipped below the outlier (min-max takes the outlier as the range)
    assert sum(r["searched"] for r in report.values()) < 0.9 * sum(r["minmax"] for r in report.values())
    tails = {
        n: float(s.inputs.abs().max() / s.inputs.float().std()) for n, s in samples.items() if hasattr(s, "inputs")
    }
    heaviest = max(tails, key=tails.get)
    assert report[heaviest]["searched"] < 0.9 * report[heaviest]["minmax"], (heaviest, report[heaviest])
    assert layers[heaviest].act_scale < samples[heaviest].inputs.abs().max() / qmax(8), heaviest
    agreement = mask_agreement(Predictor(float_model), Predictor(model), toy_images[2:])
    assert agreement > 0.9, agreement
    save_quantized(model, layers, tmp_path / "q", {"weight_bits": 8, "act_bits": 8, "method": "hessian"})
    recipe = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert recipe["arch"] == "tinyvit_toy" and len(recipe["quantized_layers"]) == len(samples)
    reloaded = load_model("tinyvit_toy", tmp_path / "q")
    assert mask_agreement(Predictor(model), Predictor(reloaded), toy_images[2:3]) == 1.0
    with pytest.raises(ValueError, match="pass model=tinyvit_toy"):
        load_model("tinyvit_5m", tmp_path / "q")


def run_onnx_nodes(nodes: list, initializers: list, x: torch.Tensor, output: str) -> torch.Tensor:
    """Run a graph of ``nodes`` with input ``x`` (named "x") in onnxruntime; its ``output``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from tinysam.quant.int8_onnx import ONNXRUNTIME_DOMAIN

    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        initializers,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(ONNXRUNTIME_DOMAIN, 1)]
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=opsets).SerializeToString())
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


@pytest.mark.parametrize("bits", [8, 6])
def test_integer_linear_node_is_the_fake_quant_layer(bits):
    """QuantizeLinear + MatMulIntegerToFloat with our scales computes exactly the fake-quant linear layer."""
    from onnx import helper, numpy_helper

    from tinysam.quant.int8_onnx import _integer_linear

    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    quant = QuantLayer(linear, bits, bits)
    quant.act_scale, quant.enabled = torch.tensor(0.02), True
    x = 3 * torch.randn(2, 100, 64)  # beyond the clipping range of 6 bits
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"], name="/fc/MatMul")
    add = helper.make_node("Add", ["y", "bias"], ["out"], name="/fc/Add")
    nodes, inits = _integer_linear(matmul, quant, add)
    out = run_onnx_nodes(nodes, [*inits, numpy_helper.from_array(linear.bias.detach().numpy(), "bias")], x, "out")
    with torch.no_grad():
        assert (out - quant(x)).abs().max() < 1e-5
        assert (out - linear(x)).abs().max() > 0.01


@pytest.mark.parametrize("bits", [8, 6])
def test_integer_conv_node_is_the_fake_quant_requantized_conv(bits):
    """QuantizeLinear + QLinearConv + DequantizeLinear with our scales computes the fake-quant convolution
    with a quantized output; only the int32 bias rounding may move an output by one level."""
    from onnx import helper, numpy_helper

    from tinysam.quant.int8_onnx import _integer_conv

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1)
    quant = QuantLayer(conv, bits, bits, requantize=True)
    quant.act_scale, quant.out_scale, quant.enabled = torch.tensor(0.03), torch.tensor(0.02), True
    x = 2 * torch.randn(1, 16, 20, 20)  # beyond the clipping range of 6 bits
    node = helper.make_node(
        "Conv", ["x", "w", "b"], ["y"], name="/conv/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]
    )
    initializers = {"b": numpy_helper.from_array(conv.bias.detach().numpy(), "b")}
    out = run_onnx_nodes(*_integer_conv(node, quant, initializers), x, "y")
    with torch.no_grad():
        expected = quant(x)
        assert out.shape == expected.shape
        moved = (out - expected).abs() > 1e-5
        assert moved.float().mean() < 0.01 and (out - expected).abs().max() <= 0.02 * 1.001
        assert (out - conv(x)).abs().max() > 0.01
        assert out.abs().max() <= (qmax(bits) + 1) * 0.02 + 1e-6, "the output stays on the b-bit grid"


@pytest.mark.parametrize("bits", [8, 6])
def test_integer_gelu_nodes_are_the_fake_quant_gelu(bits):
    """QuantizeLinear + QLinearSigmoid + QLinearMul + DequantizeLinear with our scales compute QuantGELU:
    the same output level everywhere but at rounding ties; and QuantGELU stays close to the exact GELU."""
    import torch.nn.functional as F

    from tinysam.quant.int8_onnx import _integer_gelu

    gelu = QuantGELU(bits)
    gelu.in_scale, gelu.out_scale, gelu.enabled = torch.tensor(0.05), torch.tensor(0.04), True
    x = torch.linspace(-8, 8, 4001).reshape(1, 1, 1, -1)  # beyond the input range at both bit widths
    out = run_onnx_nodes(*_integer_gelu("/act", "x", "y", gelu), x, "y")
    with torch.no_grad():
        expected = gelu(x)
        steps = ((out - expected).abs() / 0.04).round()
        assert steps.max() <= 1 and (steps > 0).float().mean() < 0.01
        assert out.abs().max() <= (qmax(bits) + 1) * 0.04 + 1e-6, "the output stays on the b-bit grid"
        inside = x.abs() < qmax(bits) * 0.04  # where neither grid clips
        error = (expected - F.gelu(x))[inside].abs().max()
        assert 0.01 < error < 0.021 + 0.05 / 2 + 0.04 / 2, "x * sigmoid(1.702 x) within 0.021 of GELU, plus rounding"


def test_requantized_output_scale_is_searched_and_wrapping_checks_its_patterns(toy_images):
    model = load_model("tinyvit_toy", asset_path("toy_student.safetensors"))
    layers = wrap_model(model, requantize=["image_encoder.neck.*"])
    requantized = sorted(n for n, q in layers.items() if isinstance(q, QuantLayer) and q.requantize)
    assert requantized == ["image_encoder.neck.0", "image_encoder.neck.2"]
    samples = collect(model, layers, toy_images[:1], points_per_side=2)
    report = calibrate({n: layers[n] for n in requantized}, {n: samples[n] for n in requantized}, "hessian", 1, 20)
    for name in requantized:
        assert report[name]["searched"] < report[name]["minmax"]
        peak = samples[name].outputs.abs().max() / qmax(8)
        assert layers[name].out_scale != peak, "the output scale is searched, not min-max"
    with pytest.raises(ValueError, match=r"no quantizable layer matches \['image_encoder.nek.\*'\]"):
        wrap_model(load_model("tinyvit_toy"), requantize=["image_encoder.nek.*"])
    with pytest.raises(ValueError, match="only Conv2d outputs"):
        wrap_model(load_model("tinyvit_toy"), requantize=["image_encoder.layers.1.blocks.0.mlp.fc1"])
    with pytest.raises(ValueError, match=r"integer_gelu: no GELU matches \['image_encoder.layers.0.\*.act9'\]"):
        wrap_model(load_model("tinyvit_toy"), integer_gelu=["image_encoder.layers.0.*.act9"])
    with pytest.raises(ValueError, match="integer_gelu: image_encoder.neck.1 is LayerNorm2d"):
        wrap_model(load_model("tinyvit_toy"), integer_gelu=["image_encoder.neck.1"])


def test_calibration_keeps_integer_chains_on_one_grid(toy_images):
    """In the conv stage every module whose input is a quantized output keeps that grid as its input scale
    (so the ONNX model passes uint8 along); the integer GELUs' own scales are searched."""
    from tinysam.quant.run import INTEGER_GELU, REQUANTIZE

    model = load_model("tinyvit_toy", asset_path("toy_student.safetensors"))
    layers = wrap_model(model, requantize=REQUANTIZE, integer_gelu=INTEGER_GELU)
    samples = collect(model, layers, toy_images[:1], points_per_side=2)
    sources = {n: s.source for n, s in samples.items() if isinstance(s, LayerSamples) and s.source}
    stage = "image_encoder.layers.0"
    assert sources[f"{stage}.blocks.0.act1"] == f"{stage}.blocks.0.conv1.c"
    assert sources[f"{stage}.blocks.0.conv2.c"] == f"{stage}.blocks.0.act1"
    assert sources[f"{stage}.blocks.0.conv1.c"] == "image_encoder.patch_embed.seq.2.c"
    assert f"{stage}.blocks.0.act3" not in sources, "its input is the residual sum"
    assert len(sources) == 12  # 2 in the patch embedding, 5 in the MBConv block, 5 in the patch merging
    report = calibrate(layers, samples, "hessian", 1, 20)
    for name, source in sources.items():
        grid = layers[name].in_scale if isinstance(layers[name], QuantGELU) else layers[name].act_scale
        assert grid == layers[source].out_scale, name
    act3 = f"{stage}.blocks.0.act3"
    assert report[act3]["searched"] < report[act3]["minmax"]
    assert layers[act3].in_scale != samples[act3].inputs.abs().max() / qmax(8), "searched, not min-max"


@pytest.mark.parametrize("route", ["u8u8", "auto"])
def test_integer_onnx_encoder_is_the_fake_quant_integer_layers(toy_images, tmp_path, route):
    """The ONNX encoder runs every linear layer of the encoder as an integer GEMM, and the conv stage
    (patch embedding, MBConv blocks with their residual adds, patch merging) and the neck's
    convolutions in uint8; its embedding is the fake-quant model's with exactly those modules
    enabled, up to the model's own sensitivity to flipping one input level in 0.1% of the pixels (a
    rounding tie or the int32 bias flips a level, and the flip propagates). ``auto``: the route picked
    for this CPU on load (int8 weights where it has VNNI), within the same tolerance."""
    import onnx

    from tinysam.backends import onnx_session
    from tinysam.data.transforms import model_input
    from tinysam.quant.fake_quant import set_enabled
    from tinysam.quant.int8_onnx import export_onnx, integer_layers
    from tinysam.quant.run import INTEGER_GELU, REQUANTIZE

    model = load_model("tinyvit_toy", asset_path("toy_student.safetensors"))
    layers = wrap_model(model, requantize=REQUANTIZE, integer_gelu=INTEGER_GELU)
    samples = collect(model, layers, toy_images[:1], points_per_side=2)
    calibrate(layers, samples, "minmax")
    set_enabled(layers, True)
    export_onnx(model, layers, tmp_path)
    graph = onnx.load(str(tmp_path / "encoder.onnx")).graph
    integer = {n: q for n, q in integer_layers(layers).items() if n.startswith("image_encoder.") and n in samples}
    integer.update((n, q) for n, q in layers.items() if isinstance(q, QuantGELU))
    ops = [n.op_type for n in graph.node]
    assert ops.count("QLinearConv") == 10 and ops.count("QLinearSigmoid") == ops.count("QLinearMul") == 6
    assert ops.count("MatMulIntegerToFloat") == len(integer) - 16 > 10
    assert ops.count("QLinearAdd") == 1, "the MBConv residual"
    # uint8 from the image to the patch merging's output: one quantize in, one dequantize out
    assert ops.count("QuantizeLinear") == ops.count("MatMulIntegerToFloat") + 1 + 2  # + the neck's two inputs
    assert ops.count("DequantizeLinear") == 1 + 2

    x = model_input(model, toy_images[1])[None]
    session = onnx_session(tmp_path / "encoder.onnx", route=route)
    onnx_embedding = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    set_enabled(layers, False)
    torch.manual_seed(0)
    with torch.no_grad():
        float_embedding = model.image_encoder(x)
        for layer in integer.values():
            layer.enabled = True
        fake_embedding = model.image_encoder(x)
        step = layers["image_encoder.patch_embed.seq.0.c"].act_scale
        flips = step * torch.randn_like(x).sign() * (torch.rand_like(x) < 1e-3)
        noisy_embedding = model.image_encoder(x + flips)
    noise = (noisy_embedding - fake_embedding).abs().mean()
    assert (onnx_embedding - fake_embedding).abs().mean() < 1.5 * noise
    assert (onnx_embedding - float_embedding).abs().mean() > 1.5 * noise


def test_int8_weights_are_rewritten_signed_on_load_where_the_cpu_has_vnni(toy_images, tmp_path):
    """The INT8 files keep uint8 weights (exact on any x86 CPU); a session on a CPU with VNNI rewrites them to
    int8 in memory (the fast uint8 x int8 kernels, exact there) and computes the same embedding."""
    import onnx
    from onnx import numpy_helper

    from tinysam.backends import int8_route, onnx_session
    from tinysam.models.onnx_graphs import signed_int8_weights
    from tinysam.quant.run import quantize_model
    from tinysam.runtime import has_vnni

    quantize_model(
        load_model("tinyvit_toy", asset_path("toy_student.safetensors")),
        toy_images[:1],
        tmp_path,
        method="minmax",
        points_per_side=2,
    )
    graph = onnx.load(str(tmp_path / "encoder.onnx"))
    integer = [n for n in graph.graph.node if n.op_type in ("MatMulIntegerToFloat", "QLinearConv")]
    before = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    assert signed_int8_weights(graph) == len(integer) > 10
    after = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    weight = integer[0].input[1 if integer[0].op_type == "MatMulIntegerToFloat" else 3]
    assert before[weight].dtype == np.uint8 and after[weight].dtype == np.int8
    assert np.array_equal(after[weight].astype(np.int16), before[weight].astype(np.int16) - 128)
    assert signed_int8_weights(graph) == 0, "a rewritten graph has no uint8 weights left"
    assert int8_route() == ("u8s8" if has_vnni() else "u8s7")
    x = {"image": np.random.default_rng(0).normal(size=(1, 3, 256, 256)).astype(np.float32)}
    routes = ("u8u8", "u8s8", "u8s7", "auto")
    sessions = {route: onnx_session(tmp_path / "encoder.onnx", route=route) for route in routes}
    assert {route: s.int8_route for route, s in sessions.items()} == {
        "u8u8": "u8u8",
        "u8s8": "u8s8",
        "u8s7": "u8s7",
        "auto": int8_route(),
    }
    assert onnx_session(tmp_path / "decoder.onnx").int8_route == int8_route()
    if has_vnni():  # without VNNI the uint8 x int8 kernels saturate: that CPU keeps the uint8 route
        same = [sessions[r].run(None, x)[0] for r in ("u8u8", "u8s8")]
        assert np.abs(same[0] - same[1]).max() <= 1e-6
    with pytest.raises(ValueError, match="INT8 route 'u8s4'"):
        int8_route("u8s4")


def test_seven_bit_route_cannot_saturate_and_keeps_the_masks(toy_images, tmp_path):
    """u8s7 (CPUs without VNNI): weights halved into [-64, 63] with doubled scales (and a QLinearConv's int32 bias
    halved), so the u8s8 kernels' int16 pair sums cannot overflow; its masks stay the 8-bit model's."""
    import onnx
    from onnx import numpy_helper

    from tinysam.backends import onnx_session
    from tinysam.data.toyworld import ToyWorldConfig, generate_image, image_rng
    from tinysam.data.transforms import model_input
    from tinysam.models.onnx_graphs import signed_int8_weights
    from tinysam.predictor import Predictor
    from tinysam.quant.run import quantize_model

    quantize_model(
        load_model("tinyvit_toy", asset_path("toy_student.safetensors")), toy_images[:1], tmp_path, method="minmax",
        points_per_side=2,
    )
    graph = onnx.load(str(tmp_path / "encoder.onnx"))
    before = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    assert signed_int8_weights(graph, bits=7) > 10
    after = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    conv = next(n for n in graph.graph.node if n.op_type == "QLinearConv" and len(n.input) > 8)
    weight, scale, bias = conv.input[3], conv.input[4], conv.input[8]
    assert after[weight].dtype == np.int8 and -64 <= after[weight].min() and after[weight].max() <= 63
    assert np.abs(after[weight] * 2 - (before[weight].astype(np.int16) - 128)).max() <= 1
    assert np.array_equal(after[scale], before[scale] * np.float32(2))
    assert np.abs(after[bias] * 2 - before[bias]).max() <= 1
    assert 2 * 255 * 64 <= np.iinfo(np.int16).max  # a pair of uint8 x int7 products fits the kernels' int16 sum
    assert onnx_session(tmp_path / "encoder.onnx", route="u8s7").int8_route == "u8s7"
    # the rounding to 7 bits moves the embedding (1.8x as far from the fake-quant model's as the exact 8-bit route,
    # measured): not within the 8-bit route's tolerance, but the objects' masks stay the model's
    fake = load_model("tinyvit_toy", tmp_path)
    float_model = load_model("tinyvit_toy", asset_path("toy_student.safetensors"))
    toy = generate_image(image_rng(0, "val", 1), ToyWorldConfig(out="unused"))  # an image with its objects
    x = model_input(fake, toy.image)[None]
    with torch.no_grad():
        reference, unquantized = fake.image_encoder(x).numpy(), float_model.image_encoder(x).numpy()
    seven = onnx_session(tmp_path / "encoder.onnx", route="u8s7").run(None, {"image": x.numpy()})[0]
    exact = onnx_session(tmp_path / "encoder.onnx", route="u8u8").run(None, {"image": x.numpy()})[0]
    predictor = Predictor(fake)
    points = np.array([[t.point] for t in toy.instances])
    masks = {}
    for name, embedding in (("fake", reference), ("u8s7", seven), ("u8u8", exact), ("float", unquantized)):
        predictor.set_embedding(torch.from_numpy(embedding), toy.image.shape[:2])
        masks[name] = predictor.predict(point_coords=points, point_labels=np.ones((len(points), 1)))[0][:, 0]
    ious = {k: np.mean([(a & b).sum() / (a | b).sum() for a, b in zip(masks[k], masks["fake"])]) for k in masks}
    # 8-bit weights rounded to 7 bits on load move the masks about as far from the fake-quant model's as the float
    # model's are (measured 0.913 and 0.917; the exact route 0.948); bench/engines.py prices it in mIoU
    assert ious["u8s7"] >= ious["float"] - 0.03 and ious["u8s7"] >= 0.85, ious
    # quantized with 7-bit weights, the folder needs no rounding: the u8s7 route computes the u8u8 one exactly
    seven_bit = tmp_path / "w7"
    quantize_model(
        load_model("tinyvit_toy", asset_path("toy_student.safetensors")), toy_images[:1], seven_bit, weight_bits=7,
        method="minmax", points_per_side=2,
    )
    sessions = [onnx_session(seven_bit / "encoder.onnx", route=r) for r in ("u8u8", "u8s7")]
    runs = [session.run(None, {"image": x.numpy()})[0] for session in sessions]
    assert np.abs(runs[0] - runs[1]).max() <= 1e-6


def test_integer_onnx_decoder_is_the_fake_quant_transformer(toy_images, tmp_path):
    """The ONNX decoder runs every linear layer of SAM's two-way transformer as an integer GEMM: its
    low-res masks are the fake-quant decoder's with exactly those layers enabled (float elsewhere),
    far closer than one-level flips in 0.1% of the image embedding move them."""
    import onnx
    import onnxruntime as ort
    from segment_anything.utils.onnx import SamOnnxModel

    from tinysam.data.transforms import model_input
    from tinysam.models.onnx_graphs import DECODER_INPUTS, decoder_feed
    from tinysam.quant.fake_quant import set_enabled
    from tinysam.quant.int8_onnx import export_onnx, integer_layers

    model = load_model("tinyvit_toy", asset_path("toy_student.safetensors"))
    layers = wrap_model(model)
    calibrate(layers, collect(model, layers, toy_images[:1], points_per_side=2), "minmax")
    set_enabled(layers, True)
    info = export_onnx(model, layers, tmp_path)
    transformer = {n: q for n, q in integer_layers(layers).items() if n.startswith("mask_decoder.transformer.")}
    ops = [n.op_type for n in onnx.load(str(tmp_path / "decoder.onnx")).graph.node]
    assert ops.count("MatMulIntegerToFloat") == len(transformer) == 32
    assert info["decoder"].startswith("decoder.onnx: 32")

    set_enabled(layers, False)
    with torch.no_grad():
        embedding = model.image_encoder(model_input(model, toy_images[1])[None])
    side = 4 * model.prompt_encoder.image_embedding_size[0]
    points = np.array([[[40.0, 60.0]], [[150.0, 100.0]], [[200.0, 30.0]]], np.float32)
    feed = decoder_feed(embedding.numpy(), points, np.ones((3, 1), np.float32), None, None, (side, side), side)
    session = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    _, onnx_iou, onnx_low = session.run(None, feed)
    onnx_masks = torch.from_numpy(onnx_low)
    check_split_decoder(tmp_path, embedding.numpy(), feed, onnx_iou, onnx_low)
    decoder = SamOnnxModel(model, return_single_mask=False).eval()
    inputs = [torch.from_numpy(feed[name]) for name in DECODER_INPUTS]
    torch.manual_seed(0)
    with torch.no_grad():
        float_masks = decoder(*inputs)[2]
        for layer in transformer.values():
            layer.enabled = True
        fake_masks = decoder(*inputs)[2]
        step = transformer["mask_decoder.transformer.layers.0.cross_attn_token_to_image.k_proj"].act_scale
        flips = step * torch.randn_like(embedding).sign() * (torch.rand_like(embedding) < 1e-3)
        noisy_masks = decoder(inputs[0] + flips, *inputs[1:])[2]
    noise = (noisy_masks - fake_masks).abs().mean()
    assert (onnx_masks - fake_masks).abs().mean() < 0.01 * noise
    assert (fake_masks - float_masks).abs().mean() > noise


def check_split_decoder(folder: Path, embedding: np.ndarray, feed: dict, iou: np.ndarray, low: np.ndarray) -> None:
    """The INT8 split decoder runs decoder.onnx's integer layers (the first layer's image side once per image) and
    computes its outputs, up to the float sums' order; its preview is every fourth low-res logit."""
    import onnx
    import onnxruntime as ort

    from tinysam.models.onnx_graphs import DECODER_IMAGE, DECODER_PREVIEW, DECODER_PROMPT, POINTS, image_side

    integer = {
        name: [n.op_type for n in onnx.load(str(folder / name)).graph.node].count("MatMulIntegerToFloat")
        for name in (DECODER_IMAGE, DECODER_PROMPT, DECODER_PREVIEW)
    }
    assert integer == {DECODER_IMAGE: 3, DECODER_PROMPT: 29, DECODER_PREVIEW: 29}
    session = {name: ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"]) for name in integer}
    side = image_side(session[DECODER_IMAGE], embedding) | {key: feed[key] for key in POINTS}
    split_iou, split_low = session[DECODER_PROMPT].run(None, side)
    np.testing.assert_allclose(split_low, low, rtol=0, atol=1e-3 * np.abs(low).max())
    np.testing.assert_allclose(split_iou, iou, rtol=0, atol=1e-5)
    _, preview = session[DECODER_PREVIEW].run(None, side)
    np.testing.assert_allclose(preview, low[..., 2::4, 2::4], rtol=0, atol=1e-3 * np.abs(low).max())


def test_quantize_script_and_its_errors(tmp_path):
    from helpers import run_script

    out = tmp_path / "q"
    proc = run_script(
        "quantize.py",
        [
            f"out={out}",
            "calibration.count=2",
            "search.candidates=10",
            "search.rounds=1",
            "calibration.points_per_side=2",
        ],
        cwd=tmp_path,
    )
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-3000:]
    assert "W8A8 (hessian)" in text and (out / "model.safetensors").is_file()
    # the INT8 ONNX encoder carries our scales and agrees with the fake-quant model
    import onnx

    fake = load_model("tinyvit_toy", out)
    layer = fake.image_encoder.layers[1].blocks[0].mlp.fc1
    graph = onnx.load(str(out / "encoder.onnx")).graph
    scales = {
        float(onnx.numpy_helper.to_array(i)) for i in graph.initializer if i.name.endswith("_scale") and not i.dims
    }
    assert any(abs(s - float(layer.act_scale)) < 1e-9 for s in scales), "our activation scale is in the graph"
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulIntegerToFloat") >= 16 and ops.count("QLinearConv") == 10  # conv stage and neck
    assert ops.count("QLinearSigmoid") == 6 and ops.count("DequantizeLinear") == 3
    from tinysam.data.toyworld import ToyWorldConfig, generate_image, image_rng

    images = [generate_image(image_rng(0, "val", i), ToyWorldConfig(out="unused")).image for i in range(2)]
    assert mask_agreement(Predictor(fake), Predictor(fake, backend="onnx", onnx_dir=out), images) > 0.85
    empty = tmp_path / "empty"
    empty.mkdir()
    for overrides, message in [
        ([f"calibration.images={empty}", "calibration.toyworld=null"], "holds no .jpg/.png images"),
        (["model=tinyvit_5m"], "look like 'tinyvit_toy'"),
        (["weight_bits=16"], "unsupported bit width 16"),
    ]:
        proc = run_script("quantize.py", [f"out={tmp_path / 'bad'}", *overrides], cwd=tmp_path)
        text, _ = proc.communicate(timeout=300)
        assert proc.returncode != 0 and message in text, (overrides, text[-2000:])


def test_not_a_quantized_dir(tmp_path):
    with pytest.raises(CheckpointError, match="not a quantized model directory"):
        load_quantized(tmp_path)
    assert build_student("tinyvit_toy") is not None


def test_quantized_attention_computes_the_same_when_disabled():
    """Wrapping (BatchNorm folding, explicit attention through QuantMatMul) changes nothing until enabled."""
    torch.manual_seed(0)
    model = build_student("tinyvit_toy").eval()
    x = torch.randn(1, 3, 256, 256)
    points = torch.tensor([[[40.0, 60.0]], [[200.0, 100.0]]])
    labels = torch.ones(2, 1, dtype=torch.int)

    def run(m):
        with torch.no_grad():
            emb = m.image_encoder(x)
            sparse, dense = m.prompt_encoder(points=(points, labels), boxes=None, masks=None)
            low, iou = m.mask_decoder(emb, m.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=True)
        return emb, low, iou

    before = run(model)
    modules = wrap_model(model)
    after = run(model)
    for a, b in zip(before, after):
        assert (a - b).abs().max() < 1e-4
    matmuls = [n for n, m in modules.items() if isinstance(m, QuantMatMul)]
    assert any(n.startswith("image_encoder.") and n.endswith(".attn.qk") for n in matmuls)
    assert any(n.startswith("mask_decoder.transformer.") and n.endswith(".av") for n in matmuls)


def test_matmul_scales_are_per_head_and_searched():
    g = torch.Generator().manual_seed(3)
    mm = QuantMatMul(heads=2, bits=4)
    a = torch.randn(8, 2, 16, 8, generator=g) * torch.tensor([1.0, 50.0]).view(1, 2, 1, 1)
    b = torch.distributions.StudentT(2.0).sample((8, 2, 8, 16))
    out = a @ b
    samples = MatMulSamples(a, b, out, torch.ones_like(out))
    minmax_matmul(mm, samples)
    assert mm.a_scale[0, 1] > 20 * mm.a_scale[0, 0], "each head gets its own scale"
    report = search_matmul(mm, samples, rounds=2, candidates=30)
    assert report["searched"] < 0.8 * report["minmax"]
    probs = torch.softmax(torch.randn(8, 2, 16, 16, generator=g) * 3, dim=-1)
    av = QuantMatMul(heads=2, bits=8, softmax_input=True)
    v = torch.randn(8, 2, 16, 8, generator=g)
    samples = MatMulSamples(probs, v, probs @ v, torch.ones(8, 2, 16, 8))
    report = search_matmul(av, samples, rounds=1, candidates=30)
    assert report["searched"] < report["minmax"] and (av.a_small < av.a_scale).all()
