"""Embedding-store throughput next to the teacher forward it replaces, side by side in one run.

Writes N records of 256x64x64 float16 (2 MiB, a 1024 px SAM embedding), reads them back
at random from the page cache (with and without the per-record CRC check), and times
one SAM ViT-B image-encoder forward at 1024 px on the same machine.

    python bench/embedding_store.py [n_records]
"""

from __future__ import annotations

import sys
import tempfile
import time

import numpy as np
import torch

from tinysam import build_teacher
from tinysam.data.embedding_store import EmbeddingStore, ShardWriter, StoreSpec, finalize, open_for_writing

SHAPE = (256, 64, 64)
MIB = 1 << 20


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    record_bytes = int(np.prod(SHAPE)) * 2
    spec = StoreSpec("bench", "none", 1024, (0.0,) * 3, (1.0,) * 3, SHAPE)
    rng = np.random.default_rng(0)
    records = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(16)]
    with tempfile.TemporaryDirectory() as tmp:
        open_for_writing(tmp, spec)
        writer = ShardWriter(tmp, 0, spec, shard_size=128)
        start = time.perf_counter()
        for i in range(n):
            writer.add(f"sa_{i}", records[i % len(records)])
        writer.flush()
        finalize(tmp)
        write_s = time.perf_counter() - start

        reads = {}
        order = rng.permutation(np.resize(np.arange(n), 4 * n))
        for check in (True, False):
            store = EmbeddingStore(tmp, check_records=check)
            for i in range(n):  # warm the page cache
                store.record(f"sa_{i}")
            start = time.perf_counter()
            for i in order:
                store[f"sa_{i}"]  # float32 tensor, as training reads it
            reads[check] = len(order) / (time.perf_counter() - start)

    teacher = build_teacher("vit_b")
    x = torch.zeros(1, 3, 1024, 1024)
    with torch.inference_mode():
        start = time.perf_counter()
        teacher.image_encoder(x)
        forward_s = time.perf_counter() - start

    print(
        f"records: {n} x {record_bytes / MIB:.0f} MiB ({n * record_bytes / MIB / 1024:.2f} GiB), torch threads: {torch.get_num_threads()}"
    )
    print("| operation | records/s | GB/s | vs ViT-B forward |")
    print("|---|---|---|---|")
    print(
        f"| write (fp16, fsync, SHA-256, CRC32) | {n / write_s:.0f} | {n * record_bytes / write_s / 1e9:.2f} | {forward_s * n / write_s:.0f}x |"
    )
    for check, rate in reads.items():
        label = "random read, CRC checked" if check else "random read, unchecked"
        print(f"| {label} | {rate:.0f} | {rate * record_bytes / 1e9:.2f} | {forward_s * rate:.0f}x |")
    print(f"| SAM ViT-B image encoder, 1024 px | {1 / forward_s:.3f} | - | 1x |")


if __name__ == "__main__":
    main()
