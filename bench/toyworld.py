"""Toy-world generation speed: images/s at 256 and 1024 px (drawing + JPEG + JSON), single process.

python bench/toyworld.py [n_images]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from tinysam.data.toyworld import ToyWorldConfig, write_split


def images_per_second(image_size: int, n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ToyWorldConfig(out=tmp, image_size=image_size)
        start = time.perf_counter()
        write_split(Path(tmp) / "train", "train", n, cfg)
        return n / (time.perf_counter() - start)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    rates = {size: images_per_second(size, n) for size in (256, 1024)}
    print("| image size | images/s |")
    print("|---|---|")
    for size, rate in rates.items():
        print(f"| {size} px | {rate:.1f} |")
    print(f"256 px is {rates[256] / rates[1024]:.1f}x faster than 1024 px")


if __name__ == "__main__":
    main()
