"""SAM-family models as ONNX graphs: the image encoder, SAM's ONNX decoder, and the decoder's input feed.

The encoder takes the normalised, padded image ``(B, 3, S, S)`` and returns the image
embedding. The decoder is SAM's ONNX decoder (``segment_anything.utils.onnx.SamOnnxModel``,
the interface browser and edge deployments of SAM use) with every output kept: for N
prompts of K points each (boxes as two corner points labelled 2 and 3, padding points
labelled -1) it returns masks at the original image size (N, 4, H, W), IoU predictions
(N, 4) and low-res logits (N, 4, 256, 256); output 0 is the single-mask output, 1-3 the
multimask ones. N and K are dynamic. Writing and running them lives elsewhere
(:mod:`tinysam.export`, :mod:`tinysam.backends`).

A float model's decoder is also written split in two, as the factored decoder computes it
(:mod:`tinysam.models.factored_decoder`): ``decoder_image.onnx`` runs once per image on its embedding
(the prompt-independent image-side work: :data:`IMAGE_SIDE`), ``decoder_prompt.onnx`` once per click on
those tensors and the points (:data:`POINTS`), returning the IoU predictions and low-res logits of
all four outputs, without a mask input. A page whose decoder runs at every click computes half of SAM's
decoder's FLOPs there, and never copies the image embedding per prompt. ``decoder_preview.onnx`` is the
click half at a quarter of the low-res side (every fourth logit), for a preview that follows the mouse.
Written with ``fold=False`` (:class:`~tinysam.models.factored_decoder.FactoredMaskDecoder`), the halves share
only the first layer's image-side projections (:data:`UNFOLDED_IMAGE_SIDE`) and apply every other linear layer
to its own input, as SAM's graph does: the form whose linear layers an integer rewrite can replace.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.onnx import SamOnnxModel

from tinysam.models.factored_decoder import FactoredMaskDecoder, ImageSide

OPSET = 17
ENCODER, DECODER, METADATA = "encoder.onnx", "decoder.onnx", "export.json"
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
DECODER_IMAGE, DECODER_PROMPT, DECODER_PREVIEW = "decoder_image.onnx", "decoder_prompt.onnx", "decoder_preview.onnx"
SPLIT_DECODER = (DECODER_IMAGE, DECODER_PROMPT, DECODER_PREVIEW)
IMAGE_SIDE = ("tokens", "first_keys", "first_values", "first_queries", "pos_keys", "pos_queries", "final_pos_keys")
UNFOLDED_IMAGE_SIDE = IMAGE_SIDE[:4]  # fold=False: the first layer's shared projections only
POINTS = ("point_coords", "point_labels")
PROMPT_OUTPUTS = ("iou_predictions", "low_res_masks")


def _onnx_export(module: torch.nn.Module, args: tuple, path: Path, inputs, outputs, dynamic_axes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on constant shapes
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def signed_int8_weights(graph_model, bits: int = 8) -> int:
    """Rewrite, in place, the integer layers' uint8 weights (zero point 128) as int8 (zero point 0); the count.

    The INT8 graphs store weight levels shifted by 128 as uint8: onnxruntime computes uint8 x uint8
    exactly on every x86 CPU, but its uint8 x int8 kernels (u8s8) are the fast ones. They sum pairs of
    products in int16 without VNNI and saturate there; with VNNI they are exact, and the rewritten
    graph computes the same numbers faster. The layers are found by structure: the weight (and its zero
    point) of every ``MatMulIntegerToFloat`` and ``QLinearConv`` stored as uint8 initializers with zero
    point 128.

    ``bits=7`` makes every layer's levels fit [-64, 63], so that a pair of uint8 x int7 products, at most
    2 x 255 x 64 = 32640, fits int16 and the u8s8 kernels cannot saturate on any x86 CPU. A layer quantized
    with 7-bit weights (``quantize.py weight_bits=7``, onnxruntime's ``reduce_range``) already fits and is
    computed exactly; an 8-bit layer has its levels halved (rounded to even), its scales doubled and a
    ``QLinearConv``'s int32 bias (whose scale is the input's times the weight's) halved, at the price of
    one bit of weight precision.
    """
    from onnx import numpy_helper

    if bits not in (7, 8):
        raise ValueError(f"signed_int8_weights: bits must be 7 or 8, got {bits}")
    initializers = {init.name: init for init in graph_model.graph.initializer}
    # (weight, its zero point, its scale, the int32 bias or None)
    weight_inputs = {"MatMulIntegerToFloat": (1, 5, 3, None), "QLinearConv": (3, 5, 4, 8)}
    rewritten, rescaled = 0, set()  # a scale or bias shared by layers is rewritten once
    for node in graph_model.graph.node:
        if node.op_type not in weight_inputs:
            continue
        w_at, zero_at, scale_at, bias_at = weight_inputs[node.op_type]
        weight, zero_point = initializers.get(node.input[w_at]), initializers.get(node.input[zero_at])
        if weight is None or zero_point is None:
            continue
        levels, zeros = numpy_helper.to_array(weight), numpy_helper.to_array(zero_point)
        if levels.dtype != np.uint8 or not (zeros == 128).all():
            continue
        signed = levels.astype(np.int16) - 128
        if bits == 7 and (signed.min() < -64 or signed.max() > 63):  # 7-bit levels (quantize.py weight_bits=7) stay
            signed = np.clip(np.round(signed / 2), -64, 63).astype(np.int16)
            scale = initializers[node.input[scale_at]]
            if scale.name not in rescaled:
                scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(2), scale.name))
                rescaled.add(scale.name)
            bias = initializers.get(node.input[bias_at]) if bias_at is not None and len(node.input) > bias_at else None
            if bias is not None and bias.name not in rescaled:
                halved = np.round(numpy_helper.to_array(bias).astype(np.float64) / 2).astype(np.int32)
                bias.CopyFrom(numpy_helper.from_array(halved, bias.name))
                rescaled.add(bias.name)
        weight.CopyFrom(numpy_helper.from_array(signed.astype(np.int8), weight.name))
        zero_point.CopyFrom(numpy_helper.from_array(np.zeros(zeros.shape, np.int8), zero_point.name))
        rewritten += 1
    return rewritten


def onnx_metadata(model: Sam) -> dict:
    """What a runtime needs besides the graphs: input size, normalisation, embedding and low-res mask shapes."""
    emb_h, emb_w = model.prompt_encoder.image_embedding_size
    return {
        "format": "tinysam-onnx",
        "opset": OPSET,
        "image_size": model.image_encoder.img_size,
        "pixel_mean": model.pixel_mean.flatten().tolist(),
        "pixel_std": model.pixel_std.flatten().tolist(),
        "mask_threshold": float(model.mask_threshold),
        "embedding_shape": [model.prompt_encoder.embed_dim, emb_h, emb_w],
        "mask_side": 4 * emb_h,
    }


def export_encoder(model: Sam, path: str | Path) -> Path:
    """The image encoder as ONNX with a dynamic batch axis."""
    size = model.image_encoder.img_size
    path = Path(path)
    dummy = torch.randn(1, 3, size, size)
    axes = {"image": {0: "batch"}, "image_embeddings": {0: "batch"}}
    _onnx_export(model.image_encoder.float().cpu().eval(), (dummy,), path, ["image"], ["image_embeddings"], axes)
    return path


def export_decoder(model: Sam, path: str | Path) -> Path:
    """SAM's ONNX prompt encoder + mask decoder + upscaling, every output kept, prompts and points dynamic."""
    path = Path(path)
    # a fresh module trains by default, and torch.onnx.export restores that mode on the whole model afterwards
    wrapper = SamOnnxModel(model.float().cpu().eval(), return_single_mask=False).eval()
    emb_size = model.prompt_encoder.image_embedding_size
    mask_side = 4 * emb_size[0]
    dummy = (
        torch.randn(1, model.prompt_encoder.embed_dim, *emb_size),
        torch.randint(0, model.image_encoder.img_size, (2, 3, 2)).float(),
        torch.tensor([[1, 0, -1], [2, 3, -1]], dtype=torch.float),
        torch.zeros(2, 1, mask_side, mask_side),
        torch.zeros(1),
        torch.tensor([480.0, 640.0]),
    )
    axes = {
        "point_coords": {0: "prompts", 1: "points"},
        "point_labels": {0: "prompts", 1: "points"},
        "mask_input": {0: "mask_prompts"},
        "masks": {0: "prompts", 2: "height", 3: "width"},
        "iou_predictions": {0: "prompts"},
        "low_res_masks": {0: "prompts"},
    }
    _onnx_export(wrapper, dummy, path, DECODER_INPUTS, DECODER_OUTPUTS, axes)
    return path


class DecoderImagePart(torch.nn.Module):
    """The image half of the split decoder: an embedding (1, C, h, w) in, the :data:`IMAGE_SIDE` tensors out
    (:data:`UNFOLDED_IMAGE_SIDE` without ``fold``; no mask input: SAM's "no mask" embedding is added to the image
    tokens)."""

    def __init__(self, model: Sam, fold: bool = True) -> None:
        super().__init__()
        self.model, self.factored = model, FactoredMaskDecoder(model.mask_decoder, fold=fold)

    def forward(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, ...]:
        prompt_encoder = self.model.prompt_encoder
        side = self.factored.image_side(
            image_embeddings + prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1), prompt_encoder.get_dense_pe()
        )
        if not self.factored.fold:
            return (side.tokens, *side.first)
        keys, queries = (torch.stack(list(t)) for t in zip(*side.pos))
        return (side.tokens, *side.first, keys, queries, side.final_pos)


class DecoderPromptPart(SamOnnxModel):
    """The click half of the split decoder: the :data:`IMAGE_SIDE` tensors and the points of N prompts in, the
    IoU predictions (N, 4) and low-res logits (N, 4, 4h, 4w) out; SAM's ONNX point embedding (boxes as corners
    labelled 2 and 3, padding points -1). With ``preview``, logits (N, 4, h, w) at every fourth low-res pixel
    (:meth:`FactoredMaskDecoder.prompt_side`), for a hover preview; ``fold``: as :class:`DecoderImagePart`'s."""

    def __init__(self, model: Sam, preview: bool = False, fold: bool = True) -> None:
        super().__init__(model, return_single_mask=False)
        self.factored, self.preview = FactoredMaskDecoder(model.mask_decoder, fold=fold), preview

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        *image_side, point_coords, point_labels = inputs
        tokens, first_k, first_v, first_q, *pos = image_side
        if self.factored.fold:
            pos_keys, pos_queries, final_pos = pos
            side = ImageSide(tokens, (first_k, first_v, first_q), list(zip(pos_keys, pos_queries)), final_pos)
        else:  # the positional encoding is a constant of the graph
            pe = self.model.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)[0]
            side = ImageSide(tokens, (first_k, first_v, first_q), [], pe)
        h, w = self.model.prompt_encoder.image_embedding_size
        sparse = self._embed_points(point_coords, point_labels)
        masks, iou = self.factored.prompt_side(sparse, side, h, w, preview=self.preview)
        return iou, masks


def export_split_decoder(model: Sam, folder: str | Path, fold: bool = True) -> list[Path]:
    """``decoder_image.onnx``, ``decoder_prompt.onnx`` and ``decoder_preview.onnx`` of a float model in
    ``folder``; a ``TypeError`` for a decoder the factored decoder cannot run (a quantized one)."""
    folder = Path(folder)
    model = model.float().cpu().eval()
    image_part = DecoderImagePart(model, fold).eval()
    embedding = torch.randn(1, model.prompt_encoder.embed_dim, *model.prompt_encoder.image_embedding_size)
    names = IMAGE_SIDE if fold else UNFOLDED_IMAGE_SIDE
    _onnx_export(image_part, (embedding,), folder / DECODER_IMAGE, ["image_embeddings"], names, None)
    with torch.no_grad():
        side = image_part(embedding)
    points = torch.randint(0, model.image_encoder.img_size, (2, 3, 2)).float()
    labels = torch.tensor([[1, 0, -1], [2, 3, -1]], dtype=torch.float)
    axes = {
        "point_coords": {0: "prompts", 1: "points"},
        "point_labels": {0: "prompts", 1: "points"},
        "iou_predictions": {0: "prompts"},
        "low_res_masks": {0: "prompts"},
    }
    for name, preview in ((DECODER_PROMPT, False), (DECODER_PREVIEW, True)):
        prompt_part = DecoderPromptPart(model, preview, fold).eval()
        _onnx_export(prompt_part, (*side, points, labels), folder / name, (*names, *POINTS), PROMPT_OUTPUTS, axes)
    return [folder / name for name in SPLIT_DECODER]


def image_side(session, embedding: np.ndarray) -> dict[str, np.ndarray]:
    """The split decoder's image half (an onnxruntime session of ``decoder_image.onnx``) on an embedding, by name."""
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {"image_embeddings": embedding.astype(np.float32)})))


def decoder_feed(
    embeddings: np.ndarray,
    points: np.ndarray | None,
    labels: np.ndarray | None,
    boxes: np.ndarray | None,
    mask_input: np.ndarray | None,
    original_size: tuple[int, int],
    mask_side: int,
) -> dict[str, np.ndarray]:
    """Inputs of ``decoder.onnx`` for N prompts already in the model's input frame (as ``Predictor.decode``).

    Like SAM's prompt encoder: boxes become two corner points labelled 2 and 3, and prompts
    without a box get one padding point labelled -1.
    """
    n = next(len(a) for a in (points, boxes, mask_input) if a is not None)
    coords = [np.zeros((n, 0, 2), np.float32)] if points is None else [points.astype(np.float32)]
    kinds = [np.zeros((n, 0), np.float32)] if labels is None else [labels.astype(np.float32)]
    if boxes is None:
        coords.append(np.zeros((n, 1, 2), np.float32))
        kinds.append(-np.ones((n, 1), np.float32))
    else:
        coords.append(boxes.reshape(n, 2, 2).astype(np.float32))
        kinds.append(np.tile(np.array([[2, 3]], np.float32), (n, 1)))
    has_mask = mask_input is not None
    return {
        "image_embeddings": embeddings.astype(np.float32),
        "point_coords": np.concatenate(coords, axis=1),
        "point_labels": np.concatenate(kinds, axis=1),
        "mask_input": mask_input.astype(np.float32) if has_mask else np.zeros((1, 1, mask_side, mask_side), np.float32),
        "has_mask_input": np.array([float(has_mask)], np.float32),
        "orig_im_size": np.array(original_size, np.float32),
    }
