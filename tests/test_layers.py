"""The package's layers point one way: no module imports a higher layer, inside functions included.

base (version, io, config, runtime, assets) <- models <- data <- predictor/backends
<- everything/grounded/quant <- loader <- eval/distill <- export <- demo, the package's front door <- annotate
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tinysam"
LAYERS = [
    ("tinysam.version", "tinysam.io", "tinysam.config", "tinysam.runtime", "tinysam.assets"),
    ("tinysam.models",),
    ("tinysam.data",),
    ("tinysam.predictor", "tinysam.backends"),
    ("tinysam.everything", "tinysam.grounded", "tinysam.quant"),
    ("tinysam.loader",),
    ("tinysam.eval", "tinysam.distill"),
    ("tinysam.export",),
    ("tinysam.demo", "tinysam"),
    ("tinysam.annotate",),  # the data engine: the demo's server, the generators, the loader and the folder
]
# units of one layer that may use each other: the base helpers, and the predictor with its backends
SAME_LAYER_OK = {0, 3}
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """Every tinysam module ``path`` imports, at any depth (functions, ``if __name__`` blocks)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; write the absolute tinysam path")
            found.append((node.lineno, node.module or ""))
    return [(line, name) for line, name in found if name == "tinysam" or name.startswith("tinysam.")]


def package_imports() -> dict[str, set[str]]:
    """For each unit, the other units it imports (the table the docs' design page describes)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = unit_of(module_name(path))
        graph.setdefault(source, set()).update(unit_of(name) for _, name in imports(path) if unit_of(name) != source)
    return graph


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(path)) for path in PACKAGE.rglob("*.py")}
    assert units <= set(LAYER_OF), f"modules outside any layer: {sorted(units - set(LAYER_OF))}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_climbs(path):
    source = unit_of(module_name(path))
    for line, name in imports(path):
        target = unit_of(name)
        if target == source:
            continue
        here, there = LAYER_OF[source], LAYER_OF[target]
        allowed = there < here or (there == here and here in SAME_LAYER_OK)
        assert allowed, (
            f"{path.relative_to(PACKAGE.parent)}:{line}: {source} (layer {here}) imports {name} (layer {there})"
        )


def test_the_checker_catches_a_climb(tmp_path):
    """The walk sees imports inside functions too (a climb hidden there is still a climb)."""
    hidden = tmp_path / "m.py"
    hidden.write_text("def f():\n    from tinysam.quant.artifact import load_quantized\n")
    assert imports(hidden) == [(2, "tinysam.quant.artifact")]
    assert LAYER_OF[unit_of("tinysam.quant.artifact")] > LAYER_OF["tinysam.models"]
