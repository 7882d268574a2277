"""The prepared GPU check (bench/gpu_check.py) runs end to end, at toy sizes on the CPU, so it cannot rot."""

from __future__ import annotations

import json
import re

from helpers import REPO, run_python


def test_gpu_check_runs_every_step_at_tiny_sizes(tmp_path):
    code, out = run_python(
        [str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny", "--out", str(tmp_path)], REPO, timeout=1200
    )
    assert code == 0, out[-4000:]
    lines = [line for line in out.splitlines() if re.match(r"\[\d/7\] ", line)]
    assert [line.split(" (")[0] for line in lines] == [
        "[1/7] device tests",
        "[2/7] precompute",
        "[3/7] train",
        "[4/7] inference bench",
        "[5/7] everything",
        "[6/7] training throughput",
        "[7/7] SA-1B cost",
    ], out[-4000:]
    assert "FAILED" not in out and out.strip().splitlines()[-1] == "7 passed, 0 failed"
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["train"]["resumed"]["global_step"] == 3 and results["train"]["first"]["seconds_per_batch"] > 0
    assert set(results["everything"]["seconds_per_image"]) == {"dense", "dense, factored", "adaptive, factored"}
    assert results["cost"]["workers_per_gpu"] >= 1 and results["cost"]["train_gpu_hours"] > 0
