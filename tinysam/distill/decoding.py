"""Decoding prompts of many images in one call of SAM's mask decoder, keeping its intermediates.

``segment_anything``'s ``MaskDecoder.forward`` takes one image per call (it repeats a
single image embedding for every prompt). Training decodes prompts of a whole batch
of images, round after round, so :func:`decode` gathers each prompt's own image
embedding and runs the decoder's own submodules (two-way transformer, upscaling,
hypernetwork MLPs, IoU head) once for all prompts. Its outputs equal
``MaskDecoder.forward`` prompt for prompt (tested), and it also returns the output
tokens and upscaled features that the token loss needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from segment_anything.modeling import Sam
from torch import Tensor


@dataclass
class Prompts:
    """N prompts over a batch of images, in input-frame pixels.

    ``image_index`` (N,) says which image of the batch each prompt is on; ``boxes`` (N, 4)
    and/or ``points`` (N, R, 2) with ``labels`` (N, R) (1 foreground, 0 background).
    """

    image_index: Tensor
    boxes: Tensor | None = None
    points: Tensor | None = None
    labels: Tensor | None = None

    def __len__(self) -> int:
        return len(self.image_index)


@dataclass
class DecoderOutputs:
    """Mask logits (N, M, h, w), IoU predictions (N, M), and the decoder's intermediates."""

    low_res: Tensor
    iou: Tensor
    tokens: Tensor  # (N, 1 + mask tokens, C): the IoU token and mask tokens after the transformer
    upscaled: Tensor  # (N, C/8, h, w): the upscaled image features

    def best(self) -> Tensor:
        """Logits (N, h, w) of the output with the highest predicted IoU per prompt."""
        index = self.iou.argmax(dim=1)
        return self.low_res[torch.arange(len(index), device=index.device), index]


def decode(model: Sam, embeddings: Tensor, prompts: Prompts, multimask_output: bool = True) -> DecoderOutputs:
    """Decode every prompt on its image's embedding; ``embeddings`` is (B, C, h, w) for the batch."""
    decoder = model.mask_decoder
    point_prompt = None if prompts.points is None else (prompts.points, prompts.labels)
    sparse, dense = model.prompt_encoder(points=point_prompt, boxes=prompts.boxes, masks=None)
    n = len(prompts)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
    src = embeddings[prompts.image_index] + dense
    pos = model.prompt_encoder.get_dense_pe().expand(n, -1, -1, -1)
    c, h, w = src.shape[1:]

    hs, src = decoder.transformer(src, pos, tokens)
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens]
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
    masks = (hyper_in @ upscaled.flatten(2)).view(n, -1, *upscaled.shape[-2:])
    iou = decoder.iou_prediction_head(hs[:, 0])
    keep = slice(1, None) if multimask_output else slice(0, 1)  # SAM's output selection
    return DecoderOutputs(masks[:, keep], iou[:, keep], hs[:, : 1 + decoder.num_mask_tokens], upscaled)
