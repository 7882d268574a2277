"""The documentation: the site builds in strict mode, and the README is a front door that links into it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_site_builds_strictly(tmp_path):
    """A broken link, a page missing from the nav or an API name that no longer exists fails the build."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "tinysam.loader.load_model" in api and "Predictor" in api  # mkdocstrings rendered the docstrings


def test_readme_is_a_short_front_door():
    assert len(README.splitlines()) <= 250
    assert not re.search(r"\bsession\b|one-off|the issue|\bstage-\d", README, re.I)
    for command in ("pip install -e . && python train.py", 'pip install -e ".[dev]" && python -m pytest'):
        assert command in README


def test_readme_links_resolve():
    links = re.findall(r"\]\(((?!https?://)[^)#]+)(?:#[^)]*)?\)", README)
    assert links, "the README links into the docs"
    missing = [link for link in links if not (REPO / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_every_bench_command_of_the_readme_is_on_the_benchmarks_page():
    benchmarks = (REPO / "docs" / "benchmarks.md").read_text()
    scripts = set(re.findall(r"python (bench/\w+\.py)", README))
    assert len(scripts) >= 6
    assert all(script in benchmarks for script in scripts), scripts - set(re.findall(r"bench/\w+\.py", benchmarks))
