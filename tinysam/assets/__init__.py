"""Small files shipped with tinysam: the toy teacher and the default distilled toy student (recipes in their JSON)."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent


def asset_path(name: str) -> str:
    """Absolute path of a shipped asset; a clear error when it is not there."""
    path = ASSETS / name
    if not path.is_file():
        raise FileNotFoundError(f"tinysam asset {name!r} is missing from {ASSETS}; reinstall tinysam")
    return str(path)
