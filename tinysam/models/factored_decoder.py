"""SAM's mask decoder, factored so that the image side is computed once for all prompts of an image.

SAM's ``MaskDecoder`` copies the image embedding once per prompt and runs every projection of the
two-way transformer over each copy. Most of that work does not depend on the prompt, or can be
moved to the prompt's few tokens:

- in the first layer the image tokens are the same for every prompt, so their key, value and
  query projections are computed once;
- later, a projection of the (per-prompt) image tokens that only feeds an attention product is
  folded into the prompt side: ``q (X Wk)ᵀ = (q Wk) Xᵀ``, ``A (X Wv) = (A X) Wv`` and
  ``Σₕ Aₕ (Vₕ Woₕ)`` for the output projection, which costs ``heads x tokens`` (56) columns
  per pixel instead of 128-256;
- the positional encoding's projections are computed once per image;
- the two stride-2 transposed convolutions of the upscaling become matrix products on
  channels-last pixels, with one layer norm, and the final pixel order is restored only for
  the masks that are returned.

The maths is SAM's (same weights, same operations up to the order of floating-point sums), so the
outputs agree with :class:`segment_anything.modeling.MaskDecoder` to float rounding, not bit for
bit. It serves point and box prompts of one image (``dense_prompt_embeddings`` shared by all
prompts, i.e. no mask input); :class:`tinysam.backends.FactoredBackend` falls back to the plain
decoder otherwise.

With ``fold=False`` only the first of these is done: every other projection is SAM's own layer applied
to its own input, the form an integer rewrite of the decoder's linear layers needs (a quantized layer's
input is quantized, so its projection cannot move to the other side of a product).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.transformer import Attention, TwoWayTransformer
from torch import Tensor, nn

UPSCALE_ROWS = 1024  # image tokens upscaled at a time (16 x 32 activations each): keeps them in cache
CHUNK_BYTES = 16 * 2**20  # image tokens of the prompts that go through the transformer together


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(..., L, H*d) -> (..., H, L, d)."""
    *lead, length, dim = x.shape
    return x.reshape(*lead, length, num_heads, dim // num_heads).transpose(-3, -2)


def _weight_heads(weight: Tensor, num_heads: int) -> Tensor:
    """A projection's weight (H*d, C) as (H, d, C)."""
    return weight.reshape(num_heads, weight.shape[0] // num_heads, weight.shape[1])


def _per_head(a: Tensor, b: Tensor) -> Tensor:
    """``einsum("nhtd,hxd->nhtx")`` as one batched product over heads; returns a (N, H, T, X) view."""
    n, h, t, d = a.shape
    out = torch.bmm(a.transpose(0, 1).reshape(h, n * t, d), b.transpose(1, 2))  # (H, N*T, X)
    return out.view(h, n, t, -1).transpose(0, 1)


def _scaled_heads(x: Tensor, num_heads: int) -> Tensor:
    """Prompt-token projections (N, T, H*d) as heads (N, H, T, d), times SAM's 1/sqrt(d)."""
    heads = _heads(x, num_heads)
    return heads * (1.0 / math.sqrt(heads.shape[-1]))


def _image_logits(heads: Tensor, weight: Tensor, image: Tensor, pos: Tensor) -> Tensor:
    """``heads · (image Wᵀ + pos)`` per head, (N, H, T, P), for prompt-token heads (N, H, T, d) and image tokens (N, P, C).

    ``weight`` (H*d, C) is the image tokens' projection, folded into the heads instead of applied
    to every image token; ``pos`` (P, H*d) is the positional encoding's projection (bias included).
    """
    n, h, t, _ = heads.shape
    folded = torch.einsum("nhtd,hdc->nhtc", heads, _weight_heads(weight, h))  # (N, H, T, C)
    logits = (folded.reshape(n, h * t, -1) @ image.transpose(1, 2)).view(n, h, t, -1)
    return logits.add_(_per_head(heads, _heads(pos, h)))


def shared_token_to_image(attn: Attention, queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """``attn`` for prompt tokens (N, T, C) attending to image tokens every prompt shares.

    ``keys`` and ``values`` are the image tokens' projections as heads (H, P, d), computed once.
    """
    q = _scaled_heads(attn.q_proj(queries), attn.num_heads)
    n, h, t, d = q.shape
    weights = torch.softmax(torch.bmm(q.transpose(0, 1).reshape(h, n * t, d), keys.transpose(1, 2)), dim=-1)
    out = torch.bmm(weights, values).view(h, n, t, d)  # (H, N*T, P) @ (H, P, d)
    return attn.out_proj(out.permute(1, 2, 0, 3).reshape(n, t, h * d))


def token_to_image(attn: Attention, queries: Tensor, image: Tensor, pos_keys: Tensor) -> Tensor:
    """``attn(q=queries, k=image + pe, v=image)`` for prompt tokens (N, T, C) and their image tokens (N, P, C).

    The key and value projections of the image tokens are folded into the prompt side;
    ``pos_keys`` is ``attn.k_proj(pe)`` (P, H*d), the positional encoding's keys (bias included).
    """
    q = _scaled_heads(attn.q_proj(queries), attn.num_heads)
    n, h, t, d = q.shape
    weights = torch.softmax(_image_logits(q, attn.k_proj.weight, image, pos_keys), dim=-1)  # (N, H, T, P)
    pooled = (weights.view(n, h * t, -1) @ image).view(n, h, t, -1)  # (N, H, T, C)
    values = torch.einsum("nhtc,hdc->nhtd", pooled, _weight_heads(attn.v_proj.weight, h))
    values = values + attn.v_proj.bias.view(h, 1, d)  # softmax rows sum to one
    return attn.out_proj(values.transpose(1, 2).reshape(n, t, h * d))


def _attend_tokens(attn: Attention, image: Tensor, logits: Tensor, values: Tensor) -> Tensor:
    """``image`` (1 or N, P, C) plus the out-projected attention of ``logits`` (N, H, T, P) over ``values`` (N, T, C)."""
    n, h, t, _ = logits.shape
    weights = torch.softmax(logits, dim=2).reshape(n, h * t, -1)  # over each head's T tokens
    out_heads = attn.out_proj.weight.reshape(-1, h, attn.internal_dim // h).permute(1, 2, 0)  # (H, d, C)
    # each token's value, out-projected, with the bias split over heads (each head's weights sum to one)
    projected = (_heads(attn.v_proj(values), h) @ out_heads + attn.out_proj.bias / h).reshape(n, h * t, -1)
    return torch.baddbmm(image, weights.transpose(1, 2), projected)


def shared_image_to_token(attn: Attention, image: Tensor, queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """``image + attn(q=image + pe, k=keys, v=values)`` for shared image tokens (1, P, C), prompt tokens (N, T, C).

    ``queries`` is the image tokens' query projection as heads (H, P, d), computed once. Returns (N, P, C).
    """
    k = _scaled_heads(attn.k_proj(keys), attn.num_heads)
    return _attend_tokens(attn, image, _per_head(k, queries), values)


def shared_attention(attn: Attention, queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """``attn`` for image tokens every prompt shares, whose query projection is ``queries`` as heads (H, P, d), over
    prompt tokens (N, T, C), as SAM computes it: key, value and output projections each on its own input. (N, P, C)."""
    k = _scaled_heads(attn.k_proj(keys), attn.num_heads)  # (N, H, T, d)
    weights = torch.softmax(_per_head(k, queries).transpose(-1, -2), dim=-1)  # (N, H, P, T)
    out = weights @ _heads(attn.v_proj(values), attn.num_heads)  # (N, H, P, d)
    return attn.out_proj(out.transpose(1, 2).flatten(2))


def image_to_token(attn: Attention, image: Tensor, pos_queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """``image + attn(q=image + pe, k=keys, v=values)`` for image tokens (N, P, C) and prompt tokens (N, T, C).

    The query projection of the image tokens is folded into the prompt side; ``pos_queries`` is
    ``attn.q_proj(pe)`` (P, H*d). Returns (N, P, C).
    """
    k = _scaled_heads(attn.k_proj(keys), attn.num_heads)
    return _attend_tokens(attn, image, _image_logits(k, attn.q_proj.weight, image, pos_queries), values)


def _bypassed(decoder: MaskDecoder, fold: bool = True) -> Iterator[tuple[str, nn.Module, type]]:
    """The modules whose weights the factoring uses without calling them, each with the exact type it assumes
    (without ``fold``, the upscaling's alone)."""
    transformer = decoder.transformer
    attentions = {
        f"transformer.layers.{i}.{kind}": getattr(layer, kind)
        for i, layer in enumerate(transformer.layers)
        for kind in ("cross_attn_token_to_image", "cross_attn_image_to_token")
    }
    attentions["transformer.final_attn_token_to_image"] = transformer.final_attn_token_to_image
    for name, attn in attentions.items() if fold else ():
        yield name, attn, Attention
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield f"{name}.{proj}", getattr(attn, proj), nn.Linear
    for index, kind in ((0, nn.ConvTranspose2d), (1, LayerNorm2d), (3, nn.ConvTranspose2d)):
        yield f"output_upscaling.{index}", decoder.output_upscaling[index], kind


@dataclass
class ImageSide:
    """What the decoder computes once per image, for all prompts.

    ``tokens``: image tokens with the dense prompt added (1, P, C); ``first``: the first layer's
    token-to-image keys and values and image-to-token queries, as heads (H, P, d); ``pos``: for
    each later layer, ``k_proj(pe)`` of its token-to-image and ``q_proj(pe)`` of its image-to-token
    attention; ``final_pos``: ``k_proj(pe)`` of the final token-to-image attention. Without folding,
    ``pos`` is empty and ``final_pos`` is the positional encoding itself (P, C).
    """

    tokens: Tensor
    first: tuple[Tensor, Tensor, Tensor]
    pos: list[tuple[Tensor, Tensor]]
    final_pos: Tensor


class FactoredMaskDecoder(nn.Module):
    """:class:`~segment_anything.modeling.MaskDecoder` on one image, image-side work shared across prompts.

    Same call as the wrapped decoder (``image_embeddings`` (1, C, h, w), ``image_pe`` (1, C, h, w),
    ``sparse_prompt_embeddings`` (N, T, C), ``dense_prompt_embeddings`` (1, C, h, w) shared by all
    prompts, ``multimask_output``) and the same outputs (low-res logits (N, M, 4h, 4w), IoU (N, M)).
    Holds no weights of its own: it runs the wrapped decoder's modules. Prompts run
    ``prompt_chunk`` at a time (default: as many as have 16 MiB of image tokens, 4 at 1024 px),
    which keeps their image tokens in cache. ``fold=False`` shares the first layer's image-side
    projections only and calls every other layer on its own input (see the module's docstring).
    """

    def __init__(self, decoder: MaskDecoder, prompt_chunk: int | None = None, fold: bool = True) -> None:
        super().__init__()
        transformer = decoder.transformer
        if not isinstance(transformer, TwoWayTransformer) or not transformer.layers[0].skip_first_layer_pe:
            raise TypeError(f"FactoredMaskDecoder needs SAM's TwoWayTransformer, got {type(transformer).__name__}")
        for name, module, kind in _bypassed(decoder, fold):
            if type(module) is not kind:
                raise TypeError(
                    f"FactoredMaskDecoder runs SAM's float decoder, but mask_decoder.{name} is a "
                    f"{type(module).__name__} (a quantized model?); decode it with backend='eager' or 'onnx'"
                )
        self.decoder = decoder
        self.prompt_chunk, self.fold = prompt_chunk, fold

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
    ) -> tuple[Tensor, Tensor]:
        if image_embeddings.shape[0] != 1 or dense_prompt_embeddings.shape[0] != 1:
            raise ValueError(
                "FactoredMaskDecoder decodes prompts of one image: image_embeddings and dense_prompt_embeddings "
                f"need batch 1, got {image_embeddings.shape[0]} and {dense_prompt_embeddings.shape[0]}"
            )
        side = self.image_side(image_embeddings + dense_prompt_embeddings, image_pe)
        outputs = slice(1, None) if multimask_output else slice(0, 1)
        if len(sparse_prompt_embeddings) == 0:
            h, w = image_embeddings.shape[2:]
            m = len(self.decoder.output_hypernetworks_mlps[outputs])
            return image_embeddings.new_zeros(0, m, 4 * h, 4 * w), image_embeddings.new_zeros(0, m)
        masks, iou_pred = [], []
        chunk = self.prompt_chunk or max(1, CHUNK_BYTES // side.tokens[0].nelement() // side.tokens.element_size())
        for sparse in sparse_prompt_embeddings.split(chunk):
            chunk_masks, chunk_iou = self.prompt_side(sparse, side, *image_embeddings.shape[2:], blocked=True)
            masks.append(chunk_masks[:, outputs])
            iou_pred.append(chunk_iou[:, outputs])
        return torch.cat(masks), torch.cat(iou_pred)

    def image_side(self, image: Tensor, image_pe: Tensor) -> ImageSide:
        """The prompt-independent work on image tokens (1, C, h, w) (dense prompt added) and their encoding."""
        transformer = self.decoder.transformer
        tokens = image.flatten(2).transpose(1, 2)  # (1, P, C)
        pe = image_pe.flatten(2).transpose(1, 2)[0]
        first = transformer.layers[0]
        t2i, i2t, h = first.cross_attn_token_to_image, first.cross_attn_image_to_token, transformer.num_heads
        keyed = tokens + pe  # (1, P, C): each projection is applied as SAM applies it, to a batch of token rows
        shared = tuple(_heads(proj, h)[0] for proj in (t2i.k_proj(keyed), t2i.v_proj(tokens), i2t.q_proj(keyed)))
        if not self.fold:
            return ImageSide(tokens, shared, [], pe)
        pos = [
            (layer.cross_attn_token_to_image.k_proj(pe), layer.cross_attn_image_to_token.q_proj(pe))
            for layer in transformer.layers[1:]
        ]
        return ImageSide(tokens, shared, pos, transformer.final_attn_token_to_image.k_proj(pe))

    def _transformer(self, tokens: Tensor, side: ImageSide) -> tuple[Tensor, Tensor]:
        """SAM's ``TwoWayTransformer`` on prompt tokens (n, T, C); returns them and their image tokens (n, P, C)."""
        transformer = self.decoder.transformer
        first = transformer.layers[0]
        queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))
        queries = first.norm2(
            queries + shared_token_to_image(first.cross_attn_token_to_image, queries + tokens, *side.first[:2])
        )
        queries = first.norm3(queries + first.mlp(queries))
        i2t = first.cross_attn_image_to_token
        if not self.fold:
            image = first.norm4(side.tokens + shared_attention(i2t, side.first[2], queries + tokens, queries))
            for layer in transformer.layers[1:]:
                queries, image = layer(queries=queries, keys=image, query_pe=tokens, key_pe=side.final_pos)
            final = transformer.final_attn_token_to_image(q=queries + tokens, k=image + side.final_pos, v=image)
            return transformer.norm_final_attn(queries + final), image
        image = first.norm4(shared_image_to_token(i2t, side.tokens, side.first[2], queries + tokens, queries))
        for layer, (pos_keys, pos_queries) in zip(transformer.layers[1:], side.pos):
            q = queries + tokens
            queries = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
            queries = layer.norm2(
                queries + token_to_image(layer.cross_attn_token_to_image, queries + tokens, image, pos_keys)
            )
            queries = layer.norm3(queries + layer.mlp(queries))
            i2t = layer.cross_attn_image_to_token
            image = layer.norm4(image_to_token(i2t, image, pos_queries, queries + tokens, queries))
        final = transformer.final_attn_token_to_image
        queries = queries + token_to_image(final, queries + tokens, image, side.final_pos)
        return transformer.norm_final_attn(queries), image

    def _upscaled_masks(self, image: Tensor, hyper_in: Tensor, height: int, width: int) -> Tensor:
        """``output_upscaling`` on image tokens (N, P, C) as channels-last matrix products, then the masks.

        Runs over blocks of ``UPSCALE_ROWS`` pixels of one prompt at a time, so that the upscaled
        activations (16 pixels x C/8 channels per token) stay in cache.
        """
        per_prompt = [
            torch.cat([self.upscale_rows(rows) @ hyper_in[i].T for rows in image[i].split(UPSCALE_ROWS)])
            for i in range(len(image))
        ]
        return self.pixel_order(torch.stack(per_prompt), height, width)

    def upscale_rows(self, rows: Tensor, preview: bool = False) -> Tensor:
        """``output_upscaling`` of image-token rows (R, C): (R x 16, C/8) rows in (token, a, b, c, d) order, where
        a 2x2 stride-2 transposed convolution maps each token to its 2x2 block: (C_in, [a, b, C_out]).

        A ``preview`` computes one of each token's 16 pixels, (a, b, c, d) = (1, 1, 0, 0), i.e. pixel
        (4i + 2, 4j + 2) of the upscaled grid: (R, C/8) rows, a quarter of the first convolution's work and a
        sixteenth of the rest (the transposed convolutions act on each token's pixels independently)."""
        conv1, norm, act1, conv2, act2 = self.decoder.output_upscaling
        c1, c2 = conv1.out_channels, conv2.out_channels
        if preview:
            w1, b1 = conv1.weight[:, :, 1, 1], conv1.bias
            w2, b2 = conv2.weight[:, :, 0, 0], conv2.bias
        else:
            w1, b1 = conv1.weight.permute(0, 2, 3, 1).reshape(rows.shape[-1], 4 * c1), conv1.bias.repeat(4)
            w2, b2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2), conv2.bias.repeat(4)
        up = torch.addmm(b1, rows, w1).view(-1, c1)
        up = act1(F.layer_norm(up, (c1,), norm.weight, norm.bias, norm.eps))
        return act2(torch.addmm(b2, up, w2)).view(-1, c2)

    @staticmethod
    def pixel_order(masks: Tensor, height: int, width: int) -> Tensor:
        """(N, P x 16, M) upscaled rows as masks (N, M, 4h, 4w): row (i, j, a, b, c, d) is pixel
        (4i + 2a + c, 4j + 2b + d)."""
        n, m = masks.shape[0], masks.shape[-1]
        masks = masks.reshape(n, height, width, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return masks.reshape(n, m, 4 * height, 4 * width)

    def prompt_side(
        self,
        sparse_prompt_embeddings: Tensor,
        side: ImageSide,
        height: int,
        width: int,
        blocked: bool = False,
        preview: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Low-res logits (N, 4, 4h, 4w) and IoUs (N, 4) of every output (single-mask first) for prompts (N, T, C)
        on an image's :class:`ImageSide`: the per-click half of the decoder. ``blocked`` upscales a prompt's
        pixels a block at a time (fast in PyTorch); otherwise all at once, with no loop (an exportable graph).
        ``preview`` returns logits (N, 4, h, w) at every fourth pixel instead: ``[..., 2::4, 2::4]`` of the
        low-res logits, computed for a sixth of the upscaling's work (see :meth:`upscale_rows`)."""
        dec = self.decoder
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        n = sparse_prompt_embeddings.shape[0]
        tokens = torch.cat((output_tokens.expand(n, -1, -1), sparse_prompt_embeddings), dim=1)
        queries, image = self._transformer(tokens, side)
        mask_tokens = queries[:, 1 : 1 + dec.num_mask_tokens]
        hyper_in = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
        if preview:
            rows = self.upscale_rows(image.flatten(0, 1), preview=True).view(n, -1, hyper_in.shape[-1])
            masks = (rows @ hyper_in.transpose(1, 2)).transpose(1, 2).reshape(n, -1, height, width)
        elif blocked:
            masks = self._upscaled_masks(image, hyper_in, height, width)
        else:
            rows = self.upscale_rows(image.flatten(0, 1)).view(n, -1, hyper_in.shape[-1])
            masks = self.pixel_order(rows @ hyper_in.transpose(1, 2), height, width)
        return masks, dec.iou_prediction_head(queries[:, 0])
