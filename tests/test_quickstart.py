"""The README's quick start, as written, in the environment its first install command makes.

That command installs the core dependencies alone (``pip install -e .``, no extra). Here every
quick-start command runs with each distribution outside that install hidden from imports (a
``sitecustomize`` on ``PYTHONPATH``), so a command that needs an extra fails as it would after
the quick start's install. Sizes are cut down where noted (training steps, calibration
images): what is tested is that each command runs on what the install gives, not its numbers.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from helpers import REPO, hiding_env, run_python, small_train_run

VENV_SEED = {"pip", "setuptools"}  # what `python3 -m venv` itself puts into a new environment
# Cut-down sizes: the same code paths in seconds instead of minutes.
FASTER = {
    "train.py": lambda root: small_train_run(root, steps=2, every=100),
    "quantize.py": lambda root: ["calibration.count=1", "calibration.points_per_side=4", "search.candidates=10"],
}


def quick_start_commands() -> tuple[str, list[list[str]]]:
    """The quick start's install command and its ``python ...`` commands, in order, from README.md."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("Install and run the tests", 1)[0]
    install, commands = None, []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            for part in line.split("#", 1)[0].split("&&"):
                words = shlex.split(part.replace("\\", ""))
                if words[:2] == ["pip", "install"]:
                    install = " ".join(words)
                elif words and words[0] == "python":
                    commands.append(words[1:])
    return install, commands


def hidden_modules() -> list[str]:
    """Top-level modules of every installed distribution that ``pip install -e .`` does not bring."""
    wanted, todo = set(VENV_SEED), ["tinysam"]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in wanted and name != "tinysam":
            continue
        wanted.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if (req.marker is None or req.marker.evaluate({"extra": ""})) and canonicalize_name(req.name) not in wanted:
                todo.append(req.name)
    return sorted(
        top
        for top, dists in metadata.packages_distributions().items()
        if top != "tinysam"
        and top not in sys.stdlib_module_names
        and not any(canonicalize_name(d) in wanted for d in dists)
    )


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> dict:
    """Environment variables that hide every module the quick start's install does not bring."""
    return hiding_env(tmp_path_factory.mktemp("guard"), hidden_modules())


def test_the_quick_start_installs_the_core_dependencies_alone():
    install, commands = quick_start_commands()
    assert install == "pip install -e ."
    assert [c[0] for c in commands] == ["train.py", "evaluate.py", "quantize.py", "-m"], commands


def test_the_guard_hides_what_only_an_extra_brings(tmp_path, guarded):
    assert "pytest" in json.loads(guarded["TINYSAM_HIDDEN_MODULES"])  # dev extra only: hidden
    code, out = run_python(["-c", "import pytest"], tmp_path, env=guarded)
    assert code != 0 and "not installed by pip install -e ." in out
    code, out = run_python(
        ["-c", "import onnx, onnxruntime, lightning, hydra, segment_anything"], tmp_path, env=guarded
    )
    assert code == 0, out


@pytest.mark.parametrize("index", range(4), ids=["train", "evaluate", "quantize", "export"])
def test_each_quick_start_command_runs_on_the_core_install(tmp_path, guarded, index):
    _, commands = quick_start_commands()
    words = commands[index]
    (tmp_path / "tinysam").symlink_to(REPO / "tinysam")  # the README's relative paths are from the repo root
    script = words[0]
    args = ([str(REPO / script)] if script.endswith(".py") else []) + (words if script == "-m" else words[1:])
    args += FASTER.get(script, lambda root: [])(tmp_path)
    code, out = run_python(args, tmp_path, env=guarded)
    assert code == 0, out[-4000:]
    assert "Traceback" not in out
