"""The online hard prompt sampler: where clicks land, their labels, determinism, checkpointed state."""

from __future__ import annotations

import pytest
import torch

from tinysam.distill.decoding import Prompts
from tinysam.distill.prompts import HardPromptSampler

SIZE = 64  # input pixels; masks are 16x16, so one mask cell is 4x4 pixels


def _cells(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cell = (points / 4).long()
    return cell[..., 1], cell[..., 0]  # rows, cols


def _batch():
    masks = torch.zeros(2, 3, 16, 16, dtype=torch.bool)
    masks[0, 0, 2:8, 2:8] = True
    masks[0, 1, 10:14, 3:12] = True
    masks[1, 0, 0:16, 0:4] = True
    masks[1, 1, 5:6, 5:15] = True
    boxes = torch.tensor(
        [[[8.0, 8, 32, 32], [12, 40, 48, 56], [0, 0, 1, 1]], [[0, 0, 16, 64], [20, 20, 60, 24], [0, 0, 1, 1]]]
    )
    valid = torch.tensor([[True, True, False], [True, True, False]])
    return masks, boxes, valid


def test_initial_points_lie_inside_their_masks():
    masks, boxes, valid = _batch()
    sampler = HardPromptSampler(prompts_per_image=5, box_fraction=0.0, seed=1)
    prompts, gt = sampler.initial(masks, boxes, valid, SIZE)
    assert len(prompts) == 4 and prompts.boxes is None and prompts.labels.tolist() == [[1]] * 4
    assert prompts.image_index.tolist() == [0, 0, 1, 1]
    rows, cols = _cells(prompts.points[:, 0])
    assert gt[torch.arange(4), rows, cols].all()


def test_initial_boxes_are_noisy_gt_boxes():
    masks, boxes, valid = _batch()
    prompts, _ = HardPromptSampler(prompts_per_image=5, box_fraction=1.0, box_noise=0.1, seed=2).initial(
        masks, boxes, valid, SIZE
    )
    assert prompts.points is None and prompts.boxes.shape == (4, 4)
    chosen = torch.stack([boxes[i, j] for i, j in ((0, 0), (0, 1), (1, 0), (1, 1))])
    diff = (prompts.boxes[:, None] - chosen[None]).abs().amin(1)  # each noisy box near one chosen GT box
    assert (diff <= 0.1 * 64 * 3).all() and not torch.equal(prompts.boxes.sort(0).values, chosen.sort(0).values)


def test_gt_miss_clicks_land_in_the_missed_part_of_the_gt():
    gt = torch.zeros(3, 16, 16, dtype=torch.bool)
    gt[:, 4:12, 4:12] = True
    current = torch.zeros_like(gt)
    current[:, 4:12, 4:8] = True  # the left half is found, the right half missed
    current[2] = gt[2]  # nothing missed: the click falls back inside the GT
    sampler = HardPromptSampler(mode="gt_miss", seed=3)
    start = Prompts(
        torch.zeros(3, dtype=torch.long), points=torch.full((3, 1, 2), 30.0), labels=torch.ones(3, 1, dtype=torch.int)
    )
    for _ in range(20):
        out = sampler.add_click(start, gt, current, None, SIZE)
        assert out.points.shape == (3, 2, 2) and out.labels[:, 1].tolist() == [1, 1, 1]
        rows, cols = _cells(out.points[:, 1])
        missed = gt & ~current
        assert missed[torch.arange(2), rows[:2], cols[:2]].all()
        assert gt[2, rows[2], cols[2]]


def test_disagreement_clicks_have_teacher_labels():
    gt = torch.zeros(400, 16, 16, dtype=torch.bool)
    teacher = torch.zeros_like(gt)
    teacher[:, 0:8] = True
    student = torch.zeros_like(gt)
    student[:, 4:12] = True  # rows 0-3: teacher only (positive); rows 8-11: student only (negative)
    sampler = HardPromptSampler(mode="disagreement", seed=4)
    start = Prompts(torch.zeros(400, dtype=torch.long), boxes=torch.zeros(400, 4))
    out = sampler.add_click(start, gt, student, teacher, SIZE)
    rows, _ = _cells(out.points[:, 0])
    labels = out.labels[:, 0]
    assert ((rows < 4) | ((rows >= 8) & (rows < 12))).all(), "clicks only where student and teacher disagree"
    assert (labels[rows < 4] == 1).all() and (labels[rows >= 8] == 0).all()
    assert 0 < labels.sum() < 400, "both kinds occur"
    assert out.boxes is start.boxes


def test_same_seed_same_prompts_and_state_round_trip():
    masks, boxes, valid = _batch()
    a, b = HardPromptSampler(seed=7), HardPromptSampler(seed=7)

    def same(pa, pb) -> bool:
        """Equal prompts: the same images, and the same box, point and label values (or both absent)."""
        fields = ("image_index", "boxes", "points", "labels")
        return all(
            (getattr(pa, f) is None and getattr(pb, f) is None) or torch.equal(getattr(pa, f), getattr(pb, f))
            for f in fields
        )

    drawn = []
    for _ in range(3):
        pa, _ = a.initial(masks, boxes, valid, SIZE)
        pb, _ = b.initial(masks, boxes, valid, SIZE)
        assert a.rounds() == b.rounds()
        assert same(pa, pb)
        drawn.append(pa)
    assert not all(same(drawn[0], p) for p in drawn[1:]), "the generator moves on between calls"
    state = a.state_dict()
    first = [a.rounds() for _ in range(10)]
    after = a.initial(masks, boxes, valid, SIZE)[0]
    c = HardPromptSampler(seed=123)
    c.load_state_dict(state)
    assert [c.rounds() for _ in range(10)] == first
    assert same(c.initial(masks, boxes, valid, SIZE)[0], after), "a restored sampler draws the same prompts"
    assert HardPromptSampler(mode="none").max_rounds == 0
    with pytest.raises(ValueError, match="prompts.mode"):
        HardPromptSampler(mode="random")


def test_prompt_grid_shows_student_and_teacher_side_by_side():
    from tinysam.distill.visualize import prompt_grid

    image = torch.zeros(3, SIZE, SIZE)
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[:, 4:8, 4:8] = True
    prompts = Prompts(
        torch.zeros(2, dtype=torch.long),
        points=torch.tensor([[[20.0, 20]], [[40, 40]]]),
        labels=torch.tensor([[1], [0]], dtype=torch.int),
    )
    mean, std = torch.full((3,), 100.0), torch.full((3,), 50.0)
    grid = prompt_grid(image, mean, std, prompts, masks, ~masks)
    assert grid.shape == (3, SIZE, 2 * SIZE) and grid.dtype == torch.uint8
    assert not torch.equal(grid[:, :, :SIZE], grid[:, :, SIZE:]), "the two panels differ"
    assert prompt_grid(image, mean, std, prompts, masks, None).shape == (3, SIZE, SIZE)
