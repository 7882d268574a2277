"""Helpers for tests that compose the real Hydra configs or run the entry scripts."""

from __future__ import annotations

import json
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


def small_train_run(root: Path, steps: int, every: int) -> list[str]:
    """A few-second toy run: 16 images, no validation, checkpoints every ``every`` steps."""
    return [
        f"paths.root_dir={root}",
        "data.toyworld.n_train=16",
        "data.toyworld.n_val=0",
        "data.val_dirs=[]",
        "data.batch_size=4",
        "data.num_workers=0",
        "prompts.prompts_per_image=4",
        "prompts.max_rounds=2",
        f"trainer.max_steps={steps}",
        f"callbacks.model_checkpoint.every_n_train_steps={every}",
        "module.image_log_every=0",
        "logger=csv",
        "~callbacks.progress_bar",
    ]


def run_python(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> tuple[int, str]:
    """Run ``python args...`` (a script of the repo, ``-m module`` ...) to the end: exit code and output."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout


def fails_in_one_line(args: list[str], cwd: Path, *expected: str, timeout: float = 600) -> str:
    """Run ``python args...``: it must exit non-zero without a traceback, its last line holding each of ``expected``."""
    code, out = run_python(args, cwd, timeout)
    assert code != 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    last = out.strip().splitlines()[-1]
    for text in expected:
        assert text in last, last
    return last


HIDING_GUARD = """
import importlib.abc, json, os, sys

HIDDEN = set(json.loads(os.environ["TINYSAM_HIDDEN_MODULES"]))


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed by pip install -e .)", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
"""


def hiding_env(folder: Path, modules: list[str]) -> dict[str, str]:
    """Environment variables under which ``python`` cannot import ``modules``, as if they were not installed."""
    (folder / "sitecustomize.py").write_text(HIDING_GUARD)
    return {"PYTHONPATH": str(folder), "TINYSAM_HIDDEN_MODULES": json.dumps(sorted(modules))}


def open_page(browser, url: str, viewport: tuple[int, int] = (1200, 1000)):
    """A page of ``url`` in the WASM runtime once it says it is ready; ``page.errors`` collects its uncaught
    errors, and its confirmation dialogs are accepted."""
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(url + "?ep=wasm")
    page.wait_for_selector("body[data-ready=true]", timeout=120_000)
    page.errors = errors
    return page


def predicted(predictor, saved: dict):
    """``Predictor.predict``'s multimask outputs (masks, scores) and the index of the best, for a saved object's or
    a page record's prompts (``point_coords``, ``point_labels``, ``box``)."""
    import numpy as np

    kwargs = {}
    if saved["point_coords"]:
        kwargs.update(point_coords=np.array(saved["point_coords"]), point_labels=np.array(saved["point_labels"]))
    if saved["box"]:
        kwargs["boxes"] = np.array(saved["box"])
    masks, scores, _ = predictor.predict(multimask_output=True, **kwargs)
    return masks, scores, int(np.argmax(scores))
