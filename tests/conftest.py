"""Shared fixtures: the reference files in tests/reference, the shipped photos, seeded toy models and Chromium."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tinysam import build_student
from tinysam.assets import photos

REFERENCE = Path(__file__).resolve().parent / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The official-output reference files (part of the repository; see tests/reference/README.md)."""
    return REFERENCE


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    """The folder of the two photos shipped with tinysam (the reference outputs were made on them)."""
    return photos()[0].parent


@pytest.fixture(scope="session")
def reference_state_dict_spec(reference_dir: Path) -> dict:
    return json.loads((reference_dir / "tinysam_vit_t_state_dict.json").read_text())


@pytest.fixture(scope="session")
def reference_student(reference_dir: Path):
    """``tinyvit_5m`` loaded with the seeded official-architecture weights."""
    return build_student("tinyvit_5m", checkpoint=reference_dir / "tinysam_vit_t_seed0.safetensors").eval()


@pytest.fixture()
def toy_student():
    """A seeded, randomly initialised toy student in eval mode."""
    torch.manual_seed(0)
    return build_student("tinyvit_toy").eval()


def chromium_path() -> str:
    """The system Chromium (``TINYSAM_CHROMIUM`` or on PATH); a clear failure, never a skip, without it."""
    path = os.environ.get("TINYSAM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("the browser tests need Chromium: apt-get install chromium (or set TINYSAM_CHROMIUM=/path/to/it)")
    return path


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium driven by Playwright for Python (its own browser download is never used)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium refuses to sandbox as root
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=args)
        yield browser
        browser.close()
