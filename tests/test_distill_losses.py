"""Distillation losses against hand-computed values, a regression fixture, and the batched decoder."""

from __future__ import annotations

import math

import pytest
import torch

from tinysam import build_student
from tinysam.distill.decoding import DecoderOutputs, Prompts, decode
from tinysam.distill.losses import DistillLoss, dice_loss, hard_mask_weights, mask_iou, sigmoid_focal_loss


def _outputs(low_res: torch.Tensor, iou: torch.Tensor, fill: float = 0.0) -> DecoderOutputs:
    n = len(low_res)
    return DecoderOutputs(low_res, iou, torch.full((n, 5, 4), fill), torch.full((n, 2, 2, 2), fill))


def test_mask_iou_by_hand():
    gt = torch.tensor([[[1, 1], [0, 0]]], dtype=torch.bool)
    logits = torch.tensor([[[[5.0, -1], [-1, -1]], [[1.0, 1], [1, 0]], [[-1.0, -1], [-1, -1]]]])
    assert torch.allclose(mask_iou(logits, gt), torch.tensor([[0.5, 2 / 3, 0.0]]), atol=1e-5)


def test_hard_mask_weight_by_hand():
    gt = torch.tensor([[[1, 1], [0, 0]]], dtype=torch.bool)
    teacher = torch.tensor([[[[1.0, 1], [-1, -1]]]])  # IoU 1
    student = torch.tensor([[[[1.0, -1], [-1, -1]]]])  # IoU 0.5
    expected = 1 / (1 + math.exp(-(1 / 0.5 - 1)))  # sigmoid(1) = 0.731
    assert hard_mask_weights(teacher, student, gt).item() == pytest.approx(expected, abs=1e-5)
    # a student as good as the teacher gets sigmoid(0) = 0.5
    assert hard_mask_weights(teacher, teacher, gt).item() == pytest.approx(0.5, abs=1e-5)


def test_focal_and_dice_by_hand():
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[1, 1], [0, 0]]], dtype=torch.bool)
    # p = 0.5 everywhere: ce = ln 2, (1 - p_t)^2 = 0.25; alpha 0.25 on positives, 0.75 on negatives
    expected_focal = (2 * 0.25 + 2 * 0.75) * 0.25 * math.log(2) / 4
    assert sigmoid_focal_loss(logits, target).item() == pytest.approx(expected_focal, abs=1e-6)
    # dice = 1 - (2 * sum(p t) + 1) / (sum p + sum t + 1) = 1 - 3 / 5
    assert dice_loss(logits, target).item() == pytest.approx(0.4, abs=1e-6)


def test_output_loss_by_hand_with_and_without_hard_weights():
    gt = torch.tensor([[[1, 1], [0, 0]]], dtype=torch.bool)
    teacher = _outputs(torch.tensor([[[[2.0, 2], [-2, -2]]]]), torch.tensor([[0.9]]))
    student = _outputs(torch.tensor([[[[1.0, -1], [-1, -1]]]]), torch.tensor([[0.5]]))
    # mean |s - t| over pixels = (1 + 3 + 1 + 1) / 4 = 1.5; IoU term |0.5 - 0.9| = 0.4
    plain = DistillLoss(0, 0, 1, 0, hard_mask_weighting=False)(None, None, student, teacher, gt)
    assert plain["output"].item() == pytest.approx(1.5 + 0.4, abs=1e-6)
    weighted = DistillLoss(0, 0, 1, 0, hard_mask_weighting=True)(None, None, student, teacher, gt)
    assert weighted["output"].item() == pytest.approx(1.5 / (1 + math.exp(-1)) + 0.4, abs=1e-5)
    assert set(weighted) == {"output", "total"}


def test_embedding_and_token_terms_and_weights():
    s_emb, t_emb = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    gt = torch.zeros(1, 2, 2, dtype=torch.bool)
    student, teacher = (
        _outputs(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1)),
        _outputs(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1), 2.0),
    )
    terms = DistillLoss(2.0, 3.0, 0, 0)(s_emb, t_emb, student, teacher, gt)
    assert terms["embedding"].item() == pytest.approx(0.5)
    assert terms["tokens"].item() == pytest.approx(2.0 + 2.0)  # tokens + upscaled features
    assert terms["total"].item() == pytest.approx(2 * 0.5 + 3 * 4.0)
    mse = DistillLoss(1.0, 0, 0, 0, distance="mse")(s_emb, t_emb, student, teacher, gt)
    assert mse["embedding"].item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="at least one"):
        DistillLoss(0, 0, 0, 0)(s_emb, t_emb, student, teacher, gt)
    with pytest.raises(ValueError, match="distance"):
        DistillLoss(distance="cosine")


def test_gt_loss_takes_the_best_multimask_output():
    gt = torch.tensor([[[1, 1], [0, 0]]], dtype=torch.bool)
    perfect = torch.tensor([[10.0, 10], [-10, -10]])
    wrong = -perfect
    out = _outputs(torch.stack([wrong, perfect, wrong])[None], torch.tensor([[0.0, 1.0, 0.0]]))
    loss = DistillLoss(0, 0, 0, 1).gt_loss(out, gt)
    only_best = DistillLoss(0, 0, 0, 1).gt_loss(_outputs(perfect[None, None], torch.tensor([[1.0]])), gt)
    assert loss.item() == pytest.approx(only_best.item(), abs=1e-6) and loss.item() < 0.01


def test_regression_fixture():
    """Seeded tensors through every term: values pinned so a change to any formula is noticed."""
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 8, 8, generator=g) > 0.5

    def outs():
        return DecoderOutputs(
            torch.randn(3, 3, 8, 8, generator=g),
            torch.rand(3, 3, generator=g),
            torch.randn(3, 5, 16, generator=g),
            torch.randn(3, 2, 8, 8, generator=g),
        )

    student, teacher = outs(), outs()
    s_emb, t_emb = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    terms = DistillLoss()(s_emb, t_emb, student, teacher, gt)
    pinned = {k: round(v.item(), 4) for k, v in terms.items()}
    assert pinned == REGRESSION


REGRESSION = {"embedding": 1.122, "tokens": 2.1139, "output": 0.9844, "gt": 4.0759, "total": 8.2962}


@torch.inference_mode()
def test_batched_decode_equals_sam_decoder_per_image():
    torch.manual_seed(0)
    model = build_student("tinyvit_toy").eval()
    embeddings = torch.randn(2, 128, 16, 16)
    image_index = torch.tensor([0, 0, 1, 1, 1])
    boxes = torch.tensor([[10.0, 10, 100, 120], [50, 60, 200, 250], [0, 0, 255, 255], [30, 40, 90, 90], [5, 5, 20, 30]])
    points = torch.rand(5, 2, 2) * 256
    labels = torch.tensor([[1, 0], [1, 1], [1, 0], [0, 1], [1, 1]], dtype=torch.int)
    for multimask in (True, False):
        ours = decode(model, embeddings, Prompts(image_index, boxes, points, labels), multimask)
        for b in range(2):
            keep = image_index == b
            sparse, dense = model.prompt_encoder(points=(points[keep], labels[keep]), boxes=boxes[keep], masks=None)
            low_res, iou = model.mask_decoder(
                embeddings[b : b + 1], model.prompt_encoder.get_dense_pe(), sparse, dense, multimask
            )
            assert torch.allclose(ours.low_res[keep], low_res, atol=1e-4)
            assert torch.allclose(ours.iou[keep], iou, atol=1e-5)
    assert ours.tokens.shape == (5, 5, 128) and ours.upscaled.shape == (5, 16, 64, 64)
