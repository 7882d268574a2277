"""The README's quick start, as written, in the environment its first install command makes.

That command installs the core dependencies alone (``pip install -e .``, no extra). Here a new
virtual environment gets exactly those distributions (and pip and setuptools, which ``venv``
seeds), linked from this one, and every quick-start command runs in it: a command that needs an
extra fails as it would after the quick start's install. Sizes are cut down where noted
(training steps, calibration images): what is tested is that each command runs on what the
install gives, not its numbers.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
from helpers import REPO, small_train_run
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

VENV_SEED = {"pip", "setuptools"}  # what `python3 -m venv` itself puts into a new environment
# Cut-down sizes: the same code paths in seconds instead of minutes.
FASTER = {
    "train.py": lambda root: small_train_run(root, steps=2, every=100),
    "quantize.py": lambda root: ["calibration.count=1", "calibration.points_per_side=4", "search.candidates=10"],
}


def quick_start_commands() -> tuple[str, list[list[str]]]:
    """The quick start's install command and its ``python ...`` commands, in order, from README.md.

    They are the bash blocks from "Quick start" up to "Entry points", less the test command's block.
    """
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("## Entry points", 1)[0]
    install, commands = None, []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        if '".[dev]"' in block:
            continue
        for line in block.splitlines():
            for part in line.split("#", 1)[0].split("&&"):
                words = shlex.split(part.replace("\\", ""))
                if words[:2] == ["pip", "install"]:
                    install = " ".join(words)
                elif words and words[0] == "python":
                    commands.append(words[1:])
    return install, commands


def core_distributions() -> set[str]:
    """The distributions ``pip install -e .`` brings into a new environment: tinysam's requirements, recursively."""
    wanted, todo = set(), ["tinysam", *VENV_SEED]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in wanted:
            continue
        wanted.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return wanted


@pytest.fixture(scope="module")
def core_python(tmp_path_factory) -> str:
    """The python of a new virtual environment holding only the core install, linked from this environment."""
    root = tmp_path_factory.mktemp("core-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = next(root.glob("lib/python*/site-packages"))
    for name in core_distributions():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for top in {Path(f).parts[0] for f in dist.files or []} - {".."}:  # ".." holds scripts, outside
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    return str(root / "bin" / "python")


CLEAN_ENV = {"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}


def run_in(python: str, args: list[str], cwd: Path) -> tuple[int, str]:
    proc = subprocess.run(
        [python, *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        env={**CLEAN_ENV, "HOME": str(cwd)},
    )
    return proc.returncode, proc.stdout


def test_the_quick_start_installs_the_core_dependencies_alone():
    install, commands = quick_start_commands()
    assert install == "pip install -e ."
    assert [c[:2] for c in commands] == [
        ["train.py"],
        ["evaluate.py"],
        ["quantize.py"],
        ["-m", "tinysam.export"],
        ["-m", "tinysam.demo"],
        ["-m", "tinysam.annotate"],
    ], commands


def test_the_core_environment_lacks_what_only_an_extra_brings(tmp_path, core_python):
    for module in ("pytest", "transformers"):  # the dev and grounded extras
        code, out = run_in(core_python, ["-c", f"import {module}"], tmp_path)
        assert code != 0 and "No module named" in out
    code, out = run_in(
        core_python, ["-c", "import onnx, onnxruntime, lightning, hydra, segment_anything, tinysam"], tmp_path
    )
    assert code == 0, out


@pytest.mark.parametrize("index", range(4), ids=["train", "evaluate", "quantize", "export"])
def test_each_quick_start_command_runs_on_the_core_install(tmp_path, core_python, index):
    _, commands = quick_start_commands()
    words = commands[index]
    (tmp_path / "tinysam").symlink_to(REPO / "tinysam")  # the README's relative paths are from the repo root
    script = words[0]
    args = ([str(REPO / script)] if script.endswith(".py") else []) + (words if script == "-m" else words[1:])
    args += FASTER.get(script, lambda root: [])(tmp_path)
    code, out = run_in(core_python, args, tmp_path)
    assert code == 0, out[-4000:]
    assert "Traceback" not in out


def serve(python: str, words: list[str], cwd: Path, ready: str) -> tuple[subprocess.Popen, str]:
    """Start a serving quick-start command on a free port; its process and URL once it prints ``ready``."""
    proc = subprocess.Popen(
        [python, *words, "port=0"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**CLEAN_ENV, "HOME": str(cwd)},
    )
    lines = []
    for line in proc.stdout:  # export messages, then "<name>: ... at URL"
        lines.append(line)
        if line.startswith(ready):
            break
    if not lines or not lines[-1].startswith(ready):
        proc.terminate()
        pytest.fail("".join(lines))
    return proc, lines[-1].split(" at ")[-1].strip()


def test_the_quick_start_demo_serves_its_page_on_the_core_install(tmp_path, core_python):
    """A serving quick-start command runs until stopped: start it on a free port, fetch the page and the model."""
    _, commands = quick_start_commands()
    proc, url = serve(core_python, commands[4], tmp_path, "demo: serving")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            assert "TinySAM in the browser" in response.read().decode()
        with urllib.request.urlopen(url + "model/info.json", timeout=30) as response:
            assert json.load(response)["image_size"] == 256
        with urllib.request.urlopen(url + "static/vendor/onnxruntime-web/ort-wasm-simd-threaded.wasm", timeout=30) as r:
            assert r.headers["Content-Type"] == "application/wasm" and len(r.read()) > 1_000_000
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_quick_start_annotator_serves_a_folder_on_the_core_install(tmp_path, core_python):
    """``python -m tinysam.annotate images=DIR out=DIR`` with two toy images: the page, the list, a save."""
    from PIL import Image

    from tinysam.data.toyworld import ToyWorldConfig, generate_image, image_rng

    _, commands = quick_start_commands()
    images = tmp_path / "photos"
    images.mkdir()
    for i in range(2):
        Image.fromarray(generate_image(image_rng(0, "val", i), ToyWorldConfig(out="unused")).image).save(
            images / f"{i}.png"
        )
    words = [
        f"images={images}" if w == "images=DIR" else f"out={tmp_path / 'labels'}" if w == "out=DIR" else w
        for w in commands[5]
    ]
    proc, url = serve(core_python, words, tmp_path, "annotate:")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            assert "TinySAM annotator" in response.read().decode()
        with urllib.request.urlopen(url + "api/images", timeout=30) as response:
            assert [row["state"] for row in json.load(response)["images"]] == ["not started"] * 2
        save = urllib.request.Request(
            url + "api/annotations/0", json.dumps({"version": "", "objects": []}).encode(), method="PUT"
        )
        with urllib.request.urlopen(save, timeout=30) as response:
            assert json.load(response)["objects"] == 0
        assert (tmp_path / "labels" / "0.json").is_file() and (tmp_path / "labels" / "0.png").is_file()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
