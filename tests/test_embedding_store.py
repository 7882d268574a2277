"""Teacher embedding store: round trip, crash and resume, corruption, DDP, mismatched manifests."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_config, run_script, run_script_ok

from tinysam import build_teacher
from tinysam.assets import asset_path
from tinysam.data.embedding_store import (
    EmbeddingStore,
    ShardWriter,
    StoreError,
    StoreSpec,
    finalize,
    open_for_writing,
    verify,
)
from tinysam.data.sa1b import find_pairs
from tinysam.data.transforms import load_image, prepare_image
from tinysam.distill.precompute import run
from tinysam.io import file_sha256

SPEC = StoreSpec("vit_toy", "random-init:seed=0", 256, (1.0, 2.0, 3.0), (4.0, 5.0, 6.0), (4, 2, 2))


def _toy_overrides(root: Path, n_train: int, n_val: int = 0) -> list[str]:
    return [
        f"paths.root_dir={root}",
        f"data.toyworld.n_train={n_train}",
        f"data.toyworld.n_val={n_val}",
        "data.toyworld.image_size=128",
        "num_workers=0",
    ]


def _store_dir(root: Path) -> Path:
    return root / "data" / "cache" / "embeddings" / "toyworld-vit_toy"


def _records(store: Path) -> dict[str, np.ndarray]:
    reader = EmbeddingStore(store)
    return {name: np.array(reader.record(name)) for name in reader.names()}


def test_writer_shards_and_reader_round_trip(tmp_path):
    open_for_writing(tmp_path, SPEC)
    writer = ShardWriter(tmp_path, rank=0, spec=SPEC, shard_size=3)
    data = {f"sa_{i}": torch.randn(4, 2, 2) for i in range(10)}
    for name, record in data.items():
        writer.add(name, record)
    writer.flush()
    manifest = finalize(tmp_path)
    assert manifest["complete"] and manifest["count"] == 10 and len(manifest["shards"]) == 4
    store = EmbeddingStore(tmp_path, teacher="vit_toy", image_size=256)
    assert len(store) == 10 and "sa_3" in store
    for name, record in data.items():
        assert torch.equal(store[name], record.half().float())
    assert verify(tmp_path, expected_names=data).ok
    with pytest.raises(StoreError, match="shape"):
        writer.add("bad", torch.zeros(3, 2, 2))


def test_precompute_matches_direct_teacher_forward(tmp_path):
    cfg = compose_config("precompute", _toy_overrides(tmp_path, n_train=6, n_val=2))
    store_dir = run(cfg)
    store = EmbeddingStore(store_dir, teacher="vit_toy", image_size=256)
    assert len(store) == 8
    teacher = build_teacher("vit_toy", checkpoint=asset_path("toy_teacher.safetensors"))
    pairs, _ = find_pairs([tmp_path / "data" / "toyworld" / "train", tmp_path / "data" / "toyworld" / "val"])
    mean, std = teacher.pixel_mean.flatten(), teacher.pixel_std.flatten()
    for image, _ in pairs:
        x, _ = prepare_image(load_image(image), 256, mean, std)
        with torch.inference_mode():
            direct = teacher.image_encoder(x[None])[0]
        assert torch.allclose(store[image.stem], direct.half().float(), atol=1e-3), image.stem
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert manifest["teacher_checkpoint_sha256"] == file_sha256(asset_path("toy_teacher.safetensors"))
    assert manifest["record_shape"] == [128, 16, 16]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])


def test_killed_run_resumes_to_the_same_store(tmp_path):
    n = 160
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    killed.mkdir(), clean.mkdir()
    extra = ["batch_size=1", "shard_size=8", "splits=[train]"]
    proc = run_script("precompute.py", _toy_overrides(killed, n) + extra, cwd=killed)
    shards = _store_dir(killed) / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(shards.glob("*.json"))) < 3:
        time.sleep(0.01)
        assert proc.poll() is None, "precompute finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((_store_dir(killed) / "manifest.json").read_text())
    assert not manifest["complete"], "the run was killed in the middle"
    partial = len(list(shards.glob("*.json")))
    assert 3 <= partial < n // 8

    out = run_script_ok("precompute.py", _toy_overrides(killed, n) + extra, cwd=killed)
    assert f"{n - 8 * partial} images to embed, {8 * partial} already in" in out
    run_script_ok("precompute.py", _toy_overrides(clean, n) + extra, cwd=clean)

    names = [f"sa_{i}" for i in range(1, n + 1)]
    assert verify(_store_dir(killed), expected_names=names).ok
    resumed, uninterrupted = _records(_store_dir(killed)), _records(_store_dir(clean))
    assert resumed.keys() == uninterrupted.keys() == set(names)
    for name in names:
        assert np.array_equal(resumed[name], uninterrupted[name]), name


def test_flipped_byte_is_reported_by_verify_and_reader(tmp_path):
    open_for_writing(tmp_path, SPEC)
    writer = ShardWriter(tmp_path, rank=0, spec=SPEC, shard_size=4)
    for i in range(8):
        writer.add(f"sa_{i}", torch.randn(4, 2, 2))
    writer.flush()
    finalize(tmp_path)
    shard = tmp_path / "shards" / "r000-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40  # inside the last record of the second shard
    shard.write_bytes(bytes(data))
    report = verify(tmp_path)
    assert not report.ok
    assert report.corrupt_shards == ["shards/r000-00001.npy"] and report.corrupt_records == ["sa_7"]
    store = EmbeddingStore(tmp_path)
    assert store["sa_6"].shape == (4, 2, 2)  # the rest stays readable
    with pytest.raises(StoreError, match="'sa_7'.*r000-00001.npy.*checksum"):
        store["sa_7"]
    from tinysam.data.embedding_store import main

    assert main(["verify", str(tmp_path)]) == 1


def test_two_process_ddp_covers_every_image_once(tmp_path):
    overrides = _toy_overrides(tmp_path, n_train=10, n_val=3) + [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "shard_size=2",
    ]
    run_script_ok("precompute.py", overrides, cwd=tmp_path)
    shards = sorted(p.name for p in (_store_dir(tmp_path) / "shards").glob("*.json"))
    assert any(s.startswith("r000-") for s in shards) and any(s.startswith("r001-") for s in shards)
    pairs, _ = find_pairs([tmp_path / "data" / "toyworld" / "train", tmp_path / "data" / "toyworld" / "val"])
    report = verify(_store_dir(tmp_path), expected_names=[p.stem for p, _ in pairs])
    assert report.ok and report.records == 13 and not report.duplicate_records


def test_mismatched_manifest_is_refused(tmp_path):
    open_for_writing(tmp_path, SPEC)
    ShardWriter(tmp_path, 0, SPEC).flush()
    with pytest.raises(StoreError, match="incomplete"):
        EmbeddingStore(tmp_path)
    finalize(tmp_path)
    with pytest.raises(StoreError, match=r"teacher='vit_toy' but teacher='vit_h'") as info:
        EmbeddingStore(tmp_path, teacher="vit_h")
    assert "\n" not in str(info.value)
    with pytest.raises(StoreError, match="image_size=256 but image_size=1024"):
        EmbeddingStore(tmp_path, image_size=1024)
    with pytest.raises(StoreError, match="teacher_checkpoint_sha256"):
        EmbeddingStore(tmp_path, teacher_checkpoint_sha256="abc")
    other = StoreSpec("vit_toy", "random-init:seed=0", 512, SPEC.pixel_mean, SPEC.pixel_std, SPEC.record_shape)
    with pytest.raises(StoreError, match="image_size"):
        open_for_writing(tmp_path, other)
