"""Segment everything: which points each round prompts, borders, records, determinism, annotation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from tinysam import AdaptiveMaskGenerator, DenseMaskGenerator, HierarchicalMaskGenerator, Predictor, build_teacher
from tinysam.assets import asset_path
from tinysam.data.masks import grid_points, pixel_of
from tinysam.data.toyworld import ToyWorldConfig, generate
from tinysam.data.transforms import load_image
from tinysam.eval.everything import annotate
from tinysam.everything.adaptive import grid_levels
from tinysam.everything.hierarchical import lattice_points

H, W = 96, 160  # not square, on purpose


class Scripted:
    """Stands in for the decoder: every point gets the same three masks with the given logit map.

    The map is at image size and upscaling is switched off, so a test controls each pixel.
    """

    def __init__(self, logit_map: torch.Tensor, iou: float = 0.99):
        self.logit_map, self.iou, self.calls = logit_map, iou, []

    def install(self, gen) -> Scripted:
        gen._decode = self
        gen.predictor.upscale = lambda logits: logits
        return self

    def __call__(self, points: np.ndarray):
        self.calls.append(points.copy())
        n = len(points)
        return self.logit_map.expand(n, 3, *self.logit_map.shape[-2:]).clone(), torch.full((n, 3), self.iou)


def left_half_map(h: int = H, w: int = W) -> torch.Tensor:
    logits = torch.full((h, w), -20.0)
    logits[:, : w // 2] = 20.0
    return logits


@pytest.fixture()
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)


def official_round_two(points_per_side: int, size: tuple[int, int], confident: np.ndarray) -> list[list[float]]:
    """Round 2 as the official TinySAM code writes it, loop for loop, minus its out-of-image indexing."""
    ih, iw = size
    hstride, wstride = ih // points_per_side, iw // points_per_side
    k = points_per_side // 4
    out = []
    for j in range(k):
        for i in range(k):
            x, y = (i + 0.5) / k * iw, (j + 0.5) / k * ih  # SAM's build_point_grid, scaled
            candidates = [(x + wstride * dx, y + hstride * dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy]
            if x + wstride * 2 < iw:
                candidates += [(x + wstride * 2, y + hstride * dy) for dy in (-1, 0, 1)]
            if y + hstride * 2 < ih:
                candidates += [(x + wstride * dx, y + hstride * 2) for dx in (-1, 0, 1)]
            if x + wstride * 2 < iw and y + hstride * 2 < ih:
                candidates.append((x + wstride * 2, y + hstride * 2))
            for cx, cy in candidates:
                if 0 <= cx < iw and 0 <= cy < ih and not confident[int(cy), int(cx)]:
                    out.append([cx, cy])
    return out


@pytest.mark.parametrize("size", [(200, 330), (330, 200), (97, 161)])
def test_round_two_prompts_exactly_the_official_lattice_outside_confident_pixels(toy_student, size):
    """A non-square image whose sides are not multiples of 32: the integer stride shifts the lattice."""
    logits = left_half_map(*size)
    logits[: size[0] // 3, size[1] // 2 :] = 9.0  # kept, above threshold 0 but below the confidence logit 8.5
    gen = HierarchicalMaskGenerator(toy_student, points_per_side=32, points_per_batch=50)
    script = Scripted(logits).install(gen)
    rgb = np.zeros((*size, 3), dtype=np.uint8)
    records = gen.generate(rgb)
    sparse = grid_points(8, size)
    np.testing.assert_array_equal(np.concatenate(script.calls[:2])[:64], sparse)
    round_two = np.concatenate(script.calls)[64:]
    expected = official_round_two(32, size, (logits > 8.5).numpy())
    assert round_two.tolist() == expected  # the same points, bit for bit, in the same order
    assert gen.prompts_per_round == [64, len(expected)] and 0 < len(expected) < 64 * 15
    assert not np.isin(round_two.round(6), grid_points(32, size).round(6)).all(axis=1).any(), "not SAM's grid"
    assert len(records) == 1, "identical masks collapse to one under NMS"


def test_round_two_without_confident_pixels_is_fifteen_neighbours_a_point_inside_the_image(toy_student, image):
    gen = HierarchicalMaskGenerator(toy_student, points_per_side=8)
    script = Scripted(torch.full((H, W), -20.0)).install(gen)
    assert gen.generate(image) == []
    # 2x2 sparse points; the +2 neighbours of the right and bottom ones fall off the image
    expected = official_round_two(8, (H, W), np.zeros((H, W), dtype=bool))
    assert gen.prompts_per_round == [4, len(expected)] and np.concatenate(script.calls[1:]).tolist() == expected
    assert len(expected) == 15 + 11 + 11 + 8  # +2 strides reach x = W or y = H on the right and bottom
    low_iou = HierarchicalMaskGenerator(toy_student, points_per_side=8)
    Scripted(left_half_map(), iou=0.5).install(low_iou)  # below pred_iou_thresh: not kept, not confident
    assert low_iou.generate(image) == [] and low_iou.prompts_per_round == [4, len(expected)]


def test_everything_confident_skips_round_two(toy_student, image):
    gen = HierarchicalMaskGenerator(toy_student, points_per_side=8)
    Scripted(torch.full((H, W), 20.0)).install(gen)
    assert len(gen.generate(image)) == 1 and gen.prompts_per_round == [4]


def test_dense_prompts_the_full_grid_once(toy_student, image):
    gen = DenseMaskGenerator(toy_student, points_per_side=8, points_per_batch=10)
    script = Scripted(left_half_map()).install(gen)
    assert len(gen.generate(image)) == 1 and gen.prompts_per_round == [64]
    np.testing.assert_allclose(np.concatenate(script.calls), grid_points(8, (H, W)))


def test_grid_levels_partition_the_dense_grid_coarse_to_fine():
    levels = grid_levels(32, 3)
    assert [len(level) for level in levels] == [64, 256, 704]
    assert sorted(np.concatenate(levels).tolist()) == list(range(1024))
    rows, cols = np.divmod(levels[0], 32)
    assert sorted(set(rows.tolist())) == sorted(set(cols.tolist())) == list(range(2, 32, 4))
    assert [len(level) for level in grid_levels(5, 1)] == [25]
    with pytest.raises(ValueError, match="n_levels"):
        AdaptiveMaskGenerator(build_teacher("vit_toy"), points_per_side=2, n_levels=3)


def test_adaptive_prompts_coarse_to_fine_only_where_nothing_is_covered(toy_student, image):
    gen = AdaptiveMaskGenerator(toy_student, points_per_side=16, points_per_batch=1000)
    script = Scripted(left_half_map()).install(gen)
    assert len(gen.generate(image)) == 1
    dense = grid_points(16, (H, W))
    levels = grid_levels(16, 3)
    right = dense[:, 0] >= W // 2  # the left half is covered once level 0 has run
    expected = [dense[levels[0]], *(dense[level][right[level]] for level in levels[1:])]
    assert len(script.calls) == 3 and gen.prompts_per_level == [len(e) for e in expected] == [16, 32, 88]
    for call, points in zip(script.calls, expected):
        np.testing.assert_array_equal(call, points)


@pytest.mark.parametrize("fine_covers", [1, 2, 3, 5])
def test_adaptive_stops_as_soon_as_enough_prompts_cover_everything(toy_student, image, fine_covers):
    gen = AdaptiveMaskGenerator(toy_student, points_per_side=16, points_per_batch=1, fine_covers=fine_covers)
    script = Scripted(torch.full((H, W), 20.0)).install(gen)
    assert len(gen.generate(image)) == 1
    # One prompt covers everything: the coarser levels stop there; the finest takes fine_covers - 1 more
    # looks (each prompt's three masks count once), in level order.
    levels = grid_levels(16, 3)
    assert gen.prompts_per_level == [1, 0, fine_covers - 1] and len(script.calls) == fine_covers
    dense = grid_points(16, (H, W))
    np.testing.assert_array_equal(np.concatenate(script.calls), dense[[levels[0][0], *levels[2][: fine_covers - 1]]])
    with pytest.raises(ValueError, match="fine_covers"):
        AdaptiveMaskGenerator(toy_student, points_per_side=16, fine_covers=0)
    nothing = AdaptiveMaskGenerator(toy_student, points_per_side=16, points_per_batch=100, barren_neighbours=0)
    Scripted(torch.full((H, W), -20.0)).install(nothing)
    assert nothing.generate(image) == [] and nothing.prompts_per_level == [16, 64, 176]


@pytest.mark.parametrize("upscale_chunk", [1, 2, 16])
def test_round_feedback_counts_each_covering_prompt_once(toy_student, image, upscale_chunk):
    gen = DenseMaskGenerator(toy_student, points_per_side=4, points_per_batch=5, upscale_chunk=upscale_chunk)
    Scripted(left_half_map()).install(gen)
    gen.predictor.set_image(image)
    # 16 prompts of 3 masks each, in chunks that split a prompt's masks, reported at every pixel
    _, feedback = gen._prompt(grid_points(4, (H, W)), torch.arange(H * W))
    covers = feedback.covers.reshape(H, W)
    assert (covers[:, : W // 2] == 16).all() and (covers[:, W // 2 :] == 0).all()


def near_miss_map() -> torch.Tensor:
    """Every point's masks: a 36² block at logit 20 in a 40² one at logit 0: stability 36² / 40² = 0.81."""
    logits = torch.full((H, W), -20.0)
    logits[:40, :40] = 0.0
    logits[:36, :36] = 20.0
    return logits


def points_with_few_prompted_neighbours(prompted: np.ndarray, level: np.ndarray, side: int, most: int) -> np.ndarray:
    """The ``level`` points (flat grid indices) with at most ``most`` prompted 8-neighbours, by explicit loops."""
    grid = np.zeros((side, side), dtype=bool)
    grid.flat[prompted] = True
    keep = []
    for index in level:
        r, c = divmod(int(index), side)
        n = sum(
            grid[r + dr, c + dc]
            for dr in (-1, 0, 1)
            for dc in (-1, 0, 1)
            if (dr or dc) and 0 <= r + dr < side and 0 <= c + dc < side
        )
        if n <= most:
            keep.append(index)
    return np.array(keep, dtype=np.int64)


@pytest.mark.parametrize(
    "near_miss, iou, margin, barren",
    [
        (False, 0.99, 0.1, True),  # nothing anywhere
        (True, 0.99, 0.1, False),  # near misses (0.81 >= 0.85 - 0.1): their neighbours stay in
        (True, 0.99, 0.03, True),  # 0.81 < 0.85 - 0.03: not near enough
        (True, 0.5, 0.1, True),  # predicted IoU below the filter: not a near miss whatever its stability
    ],
)
def test_adaptive_skips_points_whose_prompted_neighbours_came_back_with_nothing(
    toy_student, image, near_miss, iou, margin, barren
):
    gen = AdaptiveMaskGenerator(
        toy_student, points_per_side=16, points_per_batch=1000, stability_score_thresh=0.85, near_miss_margin=margin
    )
    logits = near_miss_map() if near_miss else torch.full((H, W), -20.0)
    script = Scripted(logits, iou=iou).install(gen)
    assert gen.generate(image) == []  # stability below 0.85: nothing kept, nothing covered
    levels = grid_levels(16, 3)
    # One batch a level: levels 0 and 1 are prompted whole (a level-1 point has one level-0 neighbour) ...
    expected = [levels[0], levels[1], levels[2]]
    if barren:  # ... and level 2 keeps only points with at most one prompted neighbour (2 make it barren)
        expected[2] = points_with_few_prompted_neighbours(np.concatenate(levels[:2]), levels[2], 16, 1)
        assert 0 < len(expected[2]) < len(levels[2])
    assert gen.prompts_per_level == [len(e) for e in expected]
    dense = grid_points(16, (H, W))
    for call, indices in zip(script.calls, expected):
        np.testing.assert_array_equal(call, dense[indices])
    with pytest.raises(ValueError, match="barren_neighbours"):
        AdaptiveMaskGenerator(toy_student, points_per_side=16, barren_neighbours=9)


def test_more_than_255_masks_get_their_areas(toy_student, image):
    """pycocotools' ``area`` fails on 256 RLEs or more (a uint8 count): a busy image must not."""
    gen = DenseMaskGenerator(toy_student, points_per_side=16, points_per_batch=256, output_mode="coco_rle")
    gen.predictor.upscale = lambda logits: logits

    def squares(points: np.ndarray):  # a 3x3 square around each point: 256 masks that NMS keeps apart
        logits = torch.full((len(points), 3, H, W), -20.0)
        for i, (x, y) in enumerate(points.astype(int)):
            logits[i, :, y - 1 : y + 2, x - 1 : x + 2] = 20.0
        return logits, torch.full((len(points), 3), 0.99)

    gen._decode = squares
    records = gen.generate(image)
    assert len(records) == 256 and all(r["area"] == 9 for r in records)


@pytest.mark.parametrize("points_per_side", [1, 2, 3, 4, 5, 8, 13, 32, 64])
def test_lattice_never_leaves_the_image(points_per_side):
    for size in [(1, 1), (3, 500), (500, 3), (17, 23), (200, 330), (1024, 683)]:
        sparse = grid_points(max(1, points_per_side // 4), size)
        points = lattice_points(sparse, points_per_side, size)
        assert len(points) <= 15 * len(sparse)
        cols, rows = points.astype(np.int64).T
        assert (rows >= 0).all() and (rows < size[0]).all() and (cols >= 0).all() and (cols < size[1]).all()
    # points_per_side=2 on an even width: the official code would index column W (out of range) for x + 1 stride
    assert lattice_points(np.array([[50.0, 50.0]]), 2, (100, 100)).tolist() == [[0.0, 0.0], [0.0, 50.0], [50.0, 0.0]]


def test_grid_points_never_index_outside_the_image():
    for size in [(1, 1), (3, 500), (500, 3), (17, 23)]:
        rows, cols = pixel_of(grid_points(32, size), size)
        assert rows.min() >= 0 and rows.max() < size[0] and cols.min() >= 0 and cols.max() < size[1]
    edge = np.array([[0.0, 0.0], [23.0, 17.0], [22.999, 16.999], [-0.5, 30.0]])
    rows, cols = pixel_of(edge, (17, 23))
    assert rows.tolist() == [0, 16, 16, 16] and cols.tolist() == [0, 22, 22, 0]


@pytest.mark.parametrize("size", [(40, 300), (300, 40), (33, 33)])
def test_real_model_records_validate_at_any_aspect_ratio(size):
    model = build_teacher("vit_toy", asset_path("toy_teacher.safetensors"))
    rgb = np.random.default_rng(1).integers(0, 255, (*size, 3), dtype=np.uint8)
    rgb[size[0] // 4 : size[0] // 2, size[1] // 4 : size[1] // 2] = (250, 20, 20)  # something to segment
    kwargs = {"points_per_side": 8, "pred_iou_thresh": 0.5, "stability_score_thresh": 0.5}
    binary = HierarchicalMaskGenerator(model, **kwargs).generate(rgb)
    again = HierarchicalMaskGenerator(model, **kwargs).generate(rgb)
    assert len(binary) > 0
    assert len(again) == len(binary) and all(
        (a["segmentation"] == b["segmentation"]).all() for a, b in zip(binary, again)
    )
    coco = HierarchicalMaskGenerator(model, output_mode="coco_rle", **kwargs).generate(rgb)
    for b, c in zip(binary, coco):
        assert set(b) == {
            "segmentation",
            "area",
            "bbox",
            "predicted_iou",
            "point_coords",
            "stability_score",
            "crop_box",
        }
        mask = b["segmentation"]
        assert mask.dtype == bool and mask.shape == size and mask.sum() == b["area"]
        ys, xs = np.nonzero(mask)
        assert b["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        ((x, y),) = b["point_coords"]
        assert 0 <= x < size[1] and 0 <= y < size[0]
        assert b["predicted_iou"] >= 0.5 and b["stability_score"] >= 0.5 and b["crop_box"] == [0, 0, size[1], size[0]]
        assert (mask_utils.decode(c["segmentation"]).astype(bool) == mask).all()
    with pytest.raises(ValueError, match="output_mode"):
        DenseMaskGenerator(model, output_mode="png")


def test_annotate_folder_writes_sa1b_json_skips_bad_images_and_scores_ar(tmp_path):
    world = generate(ToyWorldConfig(out=str(tmp_path / "w"), n_train=1, n_val=3, seed=5))
    (world / "val" / "broken.jpg").write_bytes(b"not a jpeg")
    model = build_teacher("vit_toy", asset_path("toy_teacher.safetensors"))
    report = annotate(
        model,
        tmp_path / "run",
        images=str(world / "val"),
        out=str(tmp_path / "masks"),
        mode="hierarchical",
        overlays=True,
        annotations=str(world / "val" / "instances.json"),
        generator={"points_per_side": 8, "pred_iou_thresh": 0.6, "stability_score_thresh": 0.8},
    )
    assert report["skipped"] == {"unreadable image": 1} and report["images"] == 3 and report["scored_images"] == 3
    written = sorted(p.name for p in (tmp_path / "masks").glob("*.json"))
    assert len(written) == 3 and len(list((tmp_path / "masks").glob("*_overlay.png"))) == 3
    record = json.loads((tmp_path / "masks" / written[0]).read_text())
    assert set(record) == {"image", "annotations"} and record["image"]["width"] == 256
    for ann in record["annotations"]:
        assert mask_utils.area(ann["segmentation"]) == ann["area"]
    assert report["masks"] > 0 and 0 < report["proposals"]["AR@100"] <= 100
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["proposals"] == report["proposals"]


SAM_KWARGS = {"points_per_side": 16, "points_per_batch": 48, "pred_iou_thresh": 0.6, "stability_score_thresh": 0.8}


@pytest.fixture(scope="module")
def sam_run(tmp_path_factory):
    """A toy image, the toy teacher and SAM's own generator's records for it (uncompressed RLE)."""
    from segment_anything import SamAutomaticMaskGenerator

    out = tmp_path_factory.mktemp("sam_run")
    world = generate(ToyWorldConfig(out=str(out / "w"), n_train=1, n_val=1, seed=3))
    rgb = np.asarray(load_image(next((world / "val").glob("*.jpg"))))
    model = build_teacher("vit_toy", asset_path("toy_teacher.safetensors"))
    sam = SamAutomaticMaskGenerator(model, crop_n_layers=0, output_mode="uncompressed_rle", **SAM_KWARGS)
    return model, rgb, sam.generate(rgb)


@pytest.mark.parametrize("output_mode", ["binary_mask", "uncompressed_rle", "coco_rle"])
def test_dense_returns_sam_automatic_mask_generator_records_exactly(sam_run, output_mode):
    """The cheaper pipeline (IoU filter before upscaling, chunked, bulk RLE) changes no record."""
    from segment_anything.utils.amg import coco_encode_rle, rle_to_mask

    model, rgb, sam = sam_run
    convert = {"binary_mask": rle_to_mask, "uncompressed_rle": lambda rle: rle, "coco_rle": coco_encode_rle}
    ours = DenseMaskGenerator(model, upscale_chunk=5, output_mode=output_mode, backend="eager", **SAM_KWARGS)
    ours = ours.generate(rgb)
    assert len(ours) == len(sam) > 3
    for a, b in zip(ours, sam):
        assert set(a) == set(b)
        for key in a:
            if key == "segmentation":
                expected = convert[output_mode](b[key])
                assert (a[key] == expected).all() if output_mode == "binary_mask" else a[key] == expected
            else:
                assert a[key] == b[key], key


def test_onnx_backend_serves_everything_mode_with_the_same_masks(sam_run):
    model, rgb, _ = sam_run
    eager = DenseMaskGenerator(model, output_mode="coco_rle", backend="eager", **SAM_KWARGS).generate(rgb)
    onnx = DenseMaskGenerator(model, backend="onnx", output_mode="coco_rle", **SAM_KWARGS).generate(rgb)
    assert len(eager) > 3 and abs(len(onnx) - len(eager)) <= 1
    ious = mask_utils.iou([m["segmentation"] for m in eager], [m["segmentation"] for m in onnx], [0] * len(onnx))
    assert (ious.max(axis=1) >= 0.95).mean() >= 0.95 and (ious.max(axis=0) >= 0.95).mean() >= 0.95


def test_auto_backend_is_factored_on_the_cpu_and_eager_for_a_decoder_it_cannot_fold(sam_run):
    from tinysam.backends import EagerBackend, FactoredBackend
    from tinysam.quant.fake_quant import wrap_model

    model, _, _ = sam_run
    assert type(DenseMaskGenerator(model).predictor.backend) is FactoredBackend, "the generators' default"
    assert type(Predictor(model).backend) is EagerBackend, "Predictor's default stays SAM's own decoder"
    quantized = build_teacher("vit_toy", asset_path("toy_teacher.safetensors"))
    wrap_model(quantized)
    assert type(Predictor(quantized, backend="auto").backend) is EagerBackend


def test_factored_backend_serves_everything_mode_with_sams_masks(sam_run):
    """The factored decoder (same maths, other summation order) keeps every one of SAM's masks."""
    model, rgb, sam = sam_run
    ours = DenseMaskGenerator(model, backend="factored", output_mode="coco_rle", **SAM_KWARGS).generate(rgb)
    sam_rles = [mask_utils.frPyObjects(m["segmentation"], *m["segmentation"]["size"]) for m in sam]
    assert len(ours) == len(sam) > 3
    ious = mask_utils.iou([m["segmentation"] for m in ours], sam_rles, [0] * len(sam))
    assert (ious.max(axis=1) >= 0.95).all() and (ious.max(axis=0) >= 0.95).all()
    assert max(abs(a["predicted_iou"] - b["predicted_iou"]) for a, b in zip(ours, sam)) < 1e-4


def test_shipped_stuff_teacher_is_everything_modes_default_and_covers_more_in_round_one(tmp_path):
    """The default model of ``evaluate.py task=everything`` segments backgrounds, so round 2 has less left.

    On a world with annotated backgrounds, at the toy thresholds and high_score_thresh=4, round 1 of the
    shipped stuff teacher marks more of the image confident than the objects-only toy teacher's does.
    """
    from helpers import compose_config

    from tinysam.models.checkpoint import read_metadata

    cfg = compose_config("evaluate", ["task=everything"])
    assert cfg.checkpoint == asset_path("toy_teacher_stuff.safetensors")
    assert cfg.dataset.toyworld.stuff_regions == 4
    assert read_metadata(cfg.checkpoint)["weights_dtype"] == "float16"
    world = generate(ToyWorldConfig(out=str(tmp_path / "w"), n_train=1, n_val=3, seed=0, stuff_regions=4))
    round_two = {}
    for name in ("toy_teacher", "toy_teacher_stuff"):
        model = build_teacher("vit_toy", asset_path(f"{name}.safetensors"))
        gen = HierarchicalMaskGenerator(model, pred_iou_thresh=0.7, stability_score_thresh=0.85, high_score_thresh=4)
        round_two[name] = 0
        for path in sorted((world / "val").glob("*.jpg")):
            gen.generate(np.asarray(load_image(path)))
            round_two[name] += sum(gen.prompts_per_stage[1:])  # no round 2 when round 1 covers everything
    assert round_two["toy_teacher_stuff"] < 0.9 * round_two["toy_teacher"], round_two  # measured: 1710 vs 2671


def test_the_default_command_takes_the_toy_models_thresholds_and_a_real_checkpoint_keeps_sams(tmp_path):
    """``evaluate.py task=everything`` leaves the two thresholds to the checkpoint: the shipped toy models' JSON
    names 0.7 / 0.85 (their predicted IoUs run lower than SAM's); a checkpoint without them gets SAM's 0.88 / 0.95;
    a value on the command line wins."""
    from helpers import compose_config

    from tinysam.eval.everything import generator_settings

    cfg = compose_config("evaluate", ["task=everything"])
    assert cfg.task.generator.pred_iou_thresh is None and cfg.task.checkpoint == cfg.checkpoint
    assert cfg.task.generator.backend == "auto"
    generator = dict(cfg.task.generator)
    toy = generator_settings(generator, cfg.checkpoint)
    assert (toy["pred_iou_thresh"], toy["stability_score_thresh"]) == (0.7, 0.85)
    official = tmp_path / "sam_vit_b.pth"  # an official checkpoint: no JSON beside it
    official.write_bytes(b"")
    real = generator_settings(generator, official)
    assert (real["pred_iou_thresh"], real["stability_score_thresh"]) == (0.88, 0.95)
    assert generator_settings(dict(generator, pred_iou_thresh=0.5), cfg.checkpoint)["pred_iou_thresh"] == 0.5
    assert generator_settings(generator, None)["pred_iou_thresh"] == 0.88
    report = annotate(
        build_teacher("vit_toy", asset_path("toy_teacher_stuff.safetensors")),
        tmp_path / "run",
        images=str(generate(ToyWorldConfig(out=str(tmp_path / "w"), n_train=0, n_val=1, stuff_regions=4)) / "val"),
        out=str(tmp_path / "masks"),
        mode="adaptive",
        generator={"points_per_side": 16, "pred_iou_thresh": None, "stability_score_thresh": None},
        checkpoint=cfg.checkpoint,
    )
    assert report["thresholds"] == {"pred_iou_thresh": 0.7, "stability_score_thresh": 0.85} and report["masks"] > 0
