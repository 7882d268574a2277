"""Small files shipped with tinysam: the toy teacher, the default distilled toy student (recipes in their
JSON) and two photos that exports are checked on."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent


def asset_path(name: str) -> str:
    """Absolute path of a shipped asset; a clear error when it is not there."""
    path = ASSETS / name
    if not path.is_file():
        raise FileNotFoundError(f"tinysam asset {name!r} is missing from {ASSETS}; reinstall tinysam")
    return str(path)


def photos() -> list[Path]:
    """The shipped photos (``sam_truck.jpg``, ``tinysam_picture1.jpg``), sorted by name."""
    found = sorted((ASSETS / "images").glob("*.jpg"))
    if not found:
        raise FileNotFoundError(f"tinysam's photos are missing from {ASSETS / 'images'}; reinstall tinysam")
    return found
