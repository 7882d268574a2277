"""Helpers for tests that compose the real Hydra configs or run the entry scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tinysam.config import register_resolvers

REPO = Path(__file__).resolve().parents[1]


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """The config ``name`` with ``overrides``, composed exactly as the entry script would."""
    register_resolvers()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def run_script(script: str, overrides: list[str], cwd: Path, timeout: float = 600, **popen) -> subprocess.Popen:
    """Start ``python <script> overrides...`` in ``cwd``; returns the process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(REPO / script), *overrides],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def run_script_ok(script: str, overrides: list[str], cwd: Path, timeout: float = 600) -> str:
    """Run a script to the end; fail with its output if it exits non-zero."""
    proc = run_script(script, overrides, cwd)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out
