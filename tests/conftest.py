"""Shared fixtures: the reference files in ../shared/reference and seeded toy models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tinysam import build_student

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("TINYSAM_REFERENCE", REPO.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The official-output reference files; their absence is a failure, never a skip."""
    if not (REFERENCE / "tinysam_vit_t_seed0.safetensors").is_file():
        raise FileNotFoundError(
            f"reference files not found in {REFERENCE}; check out shared/ beside the repo or set TINYSAM_REFERENCE"
        )
    return REFERENCE


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
