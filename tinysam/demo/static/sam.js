// SAM's pre- and post-processing in the browser, bit for bit what tinysam does in Python.
//
// resizeLongestSide: segment_anything's ResizeLongestSide.apply_image, i.e. PIL's bilinear
//   resampling with its antialiasing support and 22-bit fixed-point arithmetic;
// normalizeAndPad: (x - mean) / std in float32, zero padding bottom-right (tinysam.data.transforms);
// transformPoint: ResizeLongestSide.apply_coords;
// decoderFeed: tinysam.models.onnx.decoder_feed for one prompt;
// upscaleLogits: Sam.postprocess_masks (two torch bilinear interpolations, align_corners=False);
// cocoRle: pycocotools' mask.encode (column-major counts, compressed string).
// No DOM here: the page (app.js) and the tests use the same functions.

const PRECISION_BITS = 22; // PIL: 32 - 8 - 2
const ONE = 2 ** PRECISION_BITS;

/** The (height, width) an image of h x w gets when its longest side becomes `longest`. */
export function preprocessShape(h, w, longest) {
  const scale = longest / Math.max(h, w);
  return [Math.floor(h * scale + 0.5), Math.floor(w * scale + 0.5)];
}

// PIL's precompute_coeffs for the bilinear (triangle) filter, normalised to fixed point.
function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = filterScale; // the triangle filter's support is 1
  const ss = 1 / filterScale;
  const taps = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    const weights = [];
    let total = 0;
    for (let x = 0; x < xmax; x++) {
      const w = Math.max(1 - Math.abs((x + xmin - center + 0.5) * ss), 0);
      weights.push(w);
      total += w;
    }
    const fixed = weights.map((w) => {
      const k = total !== 0 ? w / total : w;
      return k < 0 ? Math.trunc(-0.5 + k * ONE) : Math.trunc(0.5 + k * ONE);
    });
    taps.push({ start: xmin, weights: fixed });
  }
  return taps;
}

function clip8(sum) {
  return Math.min(Math.max(Math.floor(sum / ONE), 0), 255);
}

// One PIL pass along x (`horizontal`) or y over an RGB image stored as 3 bytes per pixel.
function resamplePass(src, w, h, outW, outH, horizontal) {
  const taps = coefficients(horizontal ? w : h, horizontal ? outW : outH);
  const out = new Uint8Array(outW * outH * 3);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const { start, weights } = taps[horizontal ? x : y];
      for (let c = 0; c < 3; c++) {
        let sum = ONE / 2;
        for (let i = 0; i < weights.length; i++) {
          const at = horizontal ? (y * w + start + i) * 3 + c : ((start + i) * w + x) * 3 + c;
          sum += src[at] * weights[i];
        }
        out[(y * outW + x) * 3 + c] = clip8(sum);
      }
    }
  }
  return out;
}

/** RGB bytes (h x w x 3) resized so that the longest side is `longest`, as PIL's bilinear resize. */
export function resizeLongestSide(rgb, h, w, longest) {
  const [newH, newW] = preprocessShape(h, w, longest);
  let pixels = rgb;
  if (newW !== w) pixels = resamplePass(pixels, w, h, newW, h, true);
  if (newH !== h) pixels = resamplePass(pixels, newW, h, newW, newH, false);
  return { pixels, height: newH, width: newW };
}

/** The (1, 3, S, S) float32 encoder input: normalised in float32 like torch, zero-padded. */
export function normalizeAndPad(resized, size, mean, std) {
  const out = new Float32Array(3 * size * size);
  const m = mean.map(Math.fround);
  const s = std.map(Math.fround);
  for (let y = 0; y < resized.height; y++) {
    for (let x = 0; x < resized.width; x++) {
      const at = (y * resized.width + x) * 3;
      for (let c = 0; c < 3; c++) {
        out[c * size * size + y * size + x] = Math.fround(Math.fround(resized.pixels[at + c] - m[c]) / s[c]);
      }
    }
  }
  return out;
}

/** A pixel coordinate of the original image in the model's input frame. */
export function transformPoint(x, y, h, w, longest) {
  const [newH, newW] = preprocessShape(h, w, longest);
  return [x * (newW / w), y * (newH / h)];
}

/**
 * The decoder.onnx inputs (besides the embedding) for one prompt: `points` [{x, y, label}] and an
 * optional `box` {x0, y0, x1, y1}, all in original pixels. Without a box a padding point (label -1)
 * closes the list, as SAM's prompt encoder does. `orig` is the size the graph's own full-size masks
 * get: only low_res_masks is used, so it is kept small.
 */
export function decoderFeed(points, box, h, w, longest, maskSide) {
  const coords = [];
  const labels = [];
  for (const p of points) {
    coords.push(...transformPoint(p.x, p.y, h, w, longest));
    labels.push(p.label);
  }
  if (box) {
    coords.push(...transformPoint(box.x0, box.y0, h, w, longest), ...transformPoint(box.x1, box.y1, h, w, longest));
    labels.push(2, 3);
  } else {
    coords.push(0, 0);
    labels.push(-1);
  }
  const n = labels.length;
  return {
    point_coords: { data: Float32Array.from(coords), dims: [1, n, 2] },
    point_labels: { data: Float32Array.from(labels), dims: [1, n] },
    mask_input: { data: new Float32Array(maskSide * maskSide), dims: [1, 1, maskSide, maskSide] },
    has_mask_input: { data: Float32Array.of(0), dims: [1] },
    orig_im_size: { data: Float32Array.of(maskSide, maskSide), dims: [2] },
  };
}

// torch's bilinear source indices and weights (align_corners=False, float32 arithmetic).
function linearIndices(inSize, outSize) {
  const scale = Math.fround(inSize / outSize);
  const lo = new Int32Array(outSize);
  const hi = new Int32Array(outSize);
  const w1 = new Float32Array(outSize);
  for (let i = 0; i < outSize; i++) {
    const src = Math.max(Math.fround(Math.fround(scale * Math.fround(i + 0.5)) - 0.5), 0);
    lo[i] = Math.trunc(src);
    hi[i] = lo[i] + (lo[i] < inSize - 1 ? 1 : 0);
    w1[i] = Math.fround(src - lo[i]);
  }
  return { lo, hi, w1 };
}

// Bilinear resize of a float32 plane (h x w) to (outH x outW), keeping only rows < keepH and columns < keepW
// of the result (the crop of postprocess_masks), computed as torch does: along x, then the rows blended.
function bilinear(plane, h, w, outH, outW, keepH = outH, keepW = outW) {
  const xs = linearIndices(w, outW);
  const ys = linearIndices(h, outH);
  const rows = new Float32Array(h * keepW);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < keepW; x++) {
      const b = xs.w1[x];
      const a = Math.fround(1 - b);
      rows[y * keepW + x] = Math.fround(
        Math.fround(a * plane[y * w + xs.lo[x]]) + Math.fround(b * plane[y * w + xs.hi[x]]),
      );
    }
  }
  const out = new Float32Array(keepH * keepW);
  for (let y = 0; y < keepH; y++) {
    const b = ys.w1[y];
    const a = Math.fround(1 - b);
    const r0 = ys.lo[y] * keepW;
    const r1 = ys.hi[y] * keepW;
    for (let x = 0; x < keepW; x++) {
      out[y * keepW + x] = Math.fround(Math.fround(a * rows[r0 + x]) + Math.fround(b * rows[r1 + x]));
    }
  }
  return out;
}

/**
 * Low-res logits (side x side) to logits at (outH x outW): up to the model's input size, cropped to
 * the resized image, then to the original size (Sam.postprocess_masks). outH/outW smaller than the
 * original size give a preview at that size.
 */
export function upscaleLogits(lowRes, side, longest, h, w, outH = h, outW = w) {
  const [inH, inW] = preprocessShape(h, w, longest);
  const cropped = bilinear(lowRes, side, side, longest, longest, inH, inW);
  return bilinear(cropped, inH, inW, outH, outW);
}

/** A 0/1 mask (row-major, h x w) as pycocotools' compressed RLE: {size: [h, w], counts: string}. */
export function cocoRle(mask, h, w) {
  const counts = [];
  let current = 0;
  let run = 0;
  for (let x = 0; x < w; x++) {
    for (let y = 0; y < h; y++) {
      const v = mask[y * w + x] ? 1 : 0;
      if (v !== current) {
        counts.push(run);
        run = 0;
        current = v;
      }
      run++;
    }
  }
  counts.push(run);
  let s = "";
  for (let i = 0; i < counts.length; i++) {
    let x = i > 2 ? counts[i] - counts[i - 2] : counts[i];
    let more = true;
    while (more) {
      let c = x & 0x1f;
      x >>= 5;
      more = c & 0x10 ? x !== -1 : x !== 0;
      if (more) c |= 0x20;
      s += String.fromCharCode(c + 48);
    }
  }
  return { size: [h, w], counts: s };
}

/** pycocotools' compressed RLE {size: [h, w], counts: string} as a 0/1 mask (row-major, h x w): cocoRle's inverse. */
export function decodeRle(rle) {
  const [h, w] = rle.size;
  const s = rle.counts;
  const counts = [];
  for (let p = 0; p < s.length; ) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      const c = s.charCodeAt(p++) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = Boolean(c & 0x20);
      k++;
      if (!more && c & 0x10) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  const mask = new Uint8Array(h * w);
  let at = 0; // position in column-major order
  counts.forEach((run, i) => {
    if (i % 2) {
      for (let j = at; j < at + run; j++) mask[(j % h) * w + Math.floor(j / h)] = 1;
    }
    at += run;
  });
  return mask;
}
