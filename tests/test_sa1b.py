"""SA-1B reader on the toy world and on hand-made broken files."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tinysam.data.masks import encode_rle
from tinysam.data.sa1b import SA1BDataset, SkippedSample, SkipReport, collate_samples
from tinysam.data.toyworld import ToyWorldConfig, generate


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return generate(ToyWorldConfig(out=str(tmp_path_factory.mktemp("toy") / "world"), n_train=4, n_val=1, seed=5))


def test_reads_toy_world(world):
    ds = SA1BDataset(world / "train", image_size=256, max_masks=5)
    assert len(ds) == 4 and ds.names() == ["sa_1", "sa_2", "sa_3", "sa_4"]
    for i in range(len(ds)):
        s = ds[i]
        k = len(s["boxes"])
        assert 1 <= k <= 5
        assert s["image"].shape == (3, 256, 256) and s["masks"].shape == (k, 64, 64) and s["masks"].dtype == torch.bool
        assert s["points"].shape == (k, 2) and s["image_id"] == i + 1
        for mask, box, point in zip(s["masks"], s["boxes"], s["points"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert len(xs) > 0
            # the XYXY box encloses the (4x down-sampled) mask, up to one low-res pixel
            assert box[0] <= xs.min() * 4 + 4 and box[2] >= xs.max() * 4 and box[1] <= ys.min() * 4 + 4
            assert box[3] >= ys.max() * 4 and box[2] > box[0] and box[3] > box[1]
            assert box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3], "point lies inside its box"


def test_resizes_longest_side_and_pads_like_sam(tmp_path, world):
    wide = tmp_path / "wide"
    wide.mkdir()
    mask = np.zeros((100, 300), bool)
    mask[20:60, 200:290] = True
    Image.fromarray(np.full((100, 300, 3), 128, np.uint8)).save(wide / "sa_9.jpg")
    ann = {
        "id": 1,
        "segmentation": encode_rle(mask),
        "bbox": [200, 20, 90, 40],
        "area": int(mask.sum()),
        "point_coords": [[250.0, 40.0]],
        "predicted_iou": 1.0,
        "stability_score": 1.0,
        "crop_box": [0, 0, 300, 100],
    }
    (wide / "sa_9.json").write_text(
        json.dumps(
            {"image": {"image_id": 9, "file_name": "sa_9.jpg", "height": 100, "width": 300}, "annotations": [ann]}
        )
    )
    s = SA1BDataset(wide, image_size=240, mask_size=60)[0]
    assert s["input_size"] == (80, 240) and s["original_size"] == (100, 300)
    assert torch.equal(s["image"][:, 80:], torch.zeros(3, 160, 240)), "zero padding after normalisation"
    assert torch.allclose(s["boxes"][0], torch.tensor([160.0, 16, 232, 48]))  # XYWH -> XYXY, scaled 0.8
    assert torch.allclose(s["points"][0], torch.tensor([200.0, 32.0]))
    assert s["masks"][0, 4:12, 40:58].all() and s["masks"][0].sum() == 8 * 18


def test_mask_subset_changes_with_epoch_and_is_seeded(world):
    ds = SA1BDataset(world / "train", image_size=256, max_masks=2)
    first = ds[0]["boxes"]
    assert torch.equal(first, SA1BDataset(world / "train", image_size=256, max_masks=2)[0]["boxes"])
    subsets = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        subsets.add(tuple(ds[0]["boxes"].flatten().tolist()))
    assert len(subsets) > 1


def _copy_pair(world: Path, folder: Path, name: str) -> tuple[Path, Path]:
    src = world / "train" / "sa_1"
    image, record = folder / f"{name}.jpg", folder / f"{name}.json"
    shutil.copy(src.with_suffix(".jpg"), image)
    shutil.copy(src.with_suffix(".json"), record)
    return image, record


@pytest.fixture()
def broken(tmp_path, world) -> Path:
    folder = tmp_path / "broken"
    folder.mkdir()
    _copy_pair(world, folder, "sa_100")  # good
    image, _ = _copy_pair(world, folder, "sa_101")  # truncated JPEG
    image.write_bytes(image.read_bytes()[:400])
    image, _ = _copy_pair(world, folder, "sa_102")  # CMYK JPEG: readable
    Image.open(image).convert("CMYK").save(image)
    image, _ = _copy_pair(world, folder, "sa_103")  # grayscale JPEG: readable
    Image.open(image).convert("L").save(image)
    image, record = _copy_pair(world, folder, "sa_104")  # 16-bit PNG: readable
    grey16 = np.asarray(Image.open(image).convert("L")).astype(np.uint16) * 257
    image.unlink()
    Image.fromarray(grey16).save(folder / "sa_104.png")
    record.rename(folder / "sa_104.json") if record.exists() else None
    _, record = _copy_pair(world, folder, "sa_105")  # bad JSON
    record.write_text(record.read_text()[:-20])
    _, record = _copy_pair(world, folder, "sa_106")  # RLE of the wrong size
    data = json.loads(record.read_text())
    data["annotations"][0]["segmentation"]["size"] = [10, 10]
    record.write_text(json.dumps(data))
    _, record = _copy_pair(world, folder, "sa_107")  # no usable mask
    data = json.loads(record.read_text())
    data["annotations"] = []
    record.write_text(json.dumps(data))
    image, record = _copy_pair(world, folder, "sa_108")  # image without annotation
    record.unlink()
    return folder


def test_broken_files_are_skipped_and_counted(broken, caplog):
    caplog.set_level(logging.WARNING, logger="tinysam.data.sa1b")
    ds = SA1BDataset(broken, image_size=256, max_masks=4)
    assert [o.path.endswith("sa_108.jpg") for o in ds.orphans] == [True]
    assert len(ds) == 8
    outcome = {ds.names()[i]: ds[i] for i in range(len(ds))}
    readable = {"sa_100", "sa_102", "sa_103", "sa_104"}
    for name, sample in outcome.items():
        assert isinstance(sample, SkippedSample) == (name not in readable), name
    reasons = {name: s.reason for name, s in outcome.items() if isinstance(s, SkippedSample)}
    assert reasons["sa_101"].startswith("unreadable image")
    assert reasons["sa_105"].startswith("malformed JSON")
    assert reasons["sa_106"].startswith("RLE size mismatch")
    assert reasons["sa_107"].startswith("no usable mask")
    assert outcome["sa_104"]["image"].shape == (3, 256, 256)
    # each bad file is logged once, however often it is read
    ds[1]
    assert sum("sa_101" in r.message for r in caplog.records) == 1


def test_loader_pass_survives_bad_files_and_reports(broken):
    ds = SA1BDataset(broken, image_size=256, max_masks=4)
    report = SkipReport("broken")
    used = 0
    for batch in DataLoader(ds, batch_size=3, collate_fn=collate_samples):
        n = len(batch.get("name", []))
        used += n
        report.add(n, batch["skipped"])
        if n:
            assert batch["masks"].shape[:2] == batch["valid"].shape == batch["boxes"].shape[:2]
            assert batch["valid"].sum() == sum(
                (batch["masks"][i][batch["valid"][i]].flatten(1).any(1)).sum() for i in range(n)
            )
    assert used == 4 and report.skipped == 4
    summary = report.end_pass()
    assert "skipped 4 of 8" in summary and "RLE size mismatch" in summary
    assert report.seen == 0


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SA1BDataset(tmp_path / "nope")
