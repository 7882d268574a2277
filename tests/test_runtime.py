"""Run-time helpers: onnxruntime's operator profile read as time and FLOPs per operator type."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tinysam.backends import onnx_session
from tinysam.runtime import operator_table, operator_times


def test_operator_profile_counts_runs_time_and_flops(tmp_path):
    """A MatMul (1, 64, 128) x (128, 32) and a 3x3 Conv 16 -> 32 channels on 16 x 16, profiled over 3 runs
    (channel counts the blocked layout onnxruntime gives convolutions does not pad)."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((128, 32)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), "k"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("Conv", ["image", "k"], ["z"], pads=[1, 1, 1, 1]),
        ],
        "profiled",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 128]),
            helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 16, 16, 16]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 32]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 32, 16, 16]),
        ],
        weights,
    )
    path = tmp_path / "profiled.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    session = onnx_session(path, threads=1, profile=str(tmp_path / "profile"))
    feed = {"x": np.ones((1, 64, 128), np.float32), "image": np.ones((1, 16, 16, 16), np.float32)}
    for _ in range(3):
        session.run(None, feed)
    rows = operator_times(json.loads(Path(session.end_profiling()).read_text()))
    by_op = {op: (ms, share, gflop) for op, ms, share, gflop in rows}
    assert {"MatMul", "Conv"} <= set(by_op) <= {"MatMul", "Conv", "ReorderInput", "ReorderOutput"}
    assert by_op["MatMul"][2] == 2 * 64 * 32 * 128 / 1e9  # per run, not summed over the 3 runs
    assert by_op["Conv"][2] == 2 * (32 * 16 * 16) * (16 * 3 * 3) / 1e9
    assert abs(sum(share for _, share, _ in by_op.values()) - 1) < 1e-9 and all(ms > 0 for ms, _, _ in by_op.values())
    table = operator_table("toy graph", rows).splitlines()
    assert table[0].startswith("toy graph: ") and table[2] == "| operator | ms a run | share | GFLOP | GFLOP/s |"
    small = sum(share < 0.01 for _, _, share, _ in rows)  # summed in one row
    assert len(table) == 2 + 2 + len(rows) - small + (small > 0)
