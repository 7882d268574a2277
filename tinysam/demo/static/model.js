// The model in the page: onnxruntime-web sessions for the encoder and the decoder, and what the pages
// do with them (embed an image, decode prompts, turn low-res logits into a full-size mask). Both pages
// (the demo's app.js and the annotator's annotate.js) use it. WebGPU when the browser has an adapter,
// else threaded WASM; with encoder=server the embedding comes from POST /api/encode. A float model's
// decoder runs split (decoder_image.onnx once per image, decoder_prompt.onnx per click, and
// decoder_preview.onnx, every fourth low-res logit, for a preview while the mouse moves) unless the URL
// says ?decoder=full.
import { decoderFeed, normalizeAndPad, resizeLongestSide, upscaleLogits } from "./sam.js";

const VENDOR = new URL("./vendor/onnxruntime-web/", import.meta.url).href;

async function loadRuntime(wanted, threads) {
  let webgpu = false;
  if (wanted !== "wasm" && "gpu" in navigator) {
    webgpu = Boolean(await navigator.gpu.requestAdapter().catch(() => null));
  }
  const ort = await import(`${VENDOR}${webgpu ? "ort.webgpu.min.mjs" : "ort.wasm.min.mjs"}`);
  ort.env.wasm.wasmPaths = VENDOR;
  ort.env.wasm.numThreads = crossOriginIsolated ? threads : 1; // 0: onnxruntime-web's default
  const ep = webgpu ? "webgpu" : "wasm";
  const note = wanted === "webgpu" && !webgpu ? " (no WebGPU adapter in this browser)" : "";
  return { ort, ep, threads: ort.env.wasm.numThreads, note };
}

async function fetchModel(name, progress) {
  const response = await fetch(`/model/${name}`);
  if (!response.ok) throw new Error(`the server did not send ${name} (${response.status})`);
  const total = Number(response.headers.get("Content-Length")) || 0;
  const reader = response.body.getReader();
  const parts = [];
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    received += value.length;
    if (total) progress(`loading ${name}: ${Math.round((100 * received) / total)}% of ${(total / 1e6).toFixed(1)} MB`);
  }
  const bytes = new Uint8Array(received);
  let at = 0;
  for (const part of parts) {
    bytes.set(part, at);
    at += part.length;
  }
  return bytes;
}

/** An image file or blob as a bitmap and its RGB bytes (h x w x 3), EXIF orientation applied. */
export async function readImage(blob) {
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none", imageOrientation: "from-image" });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  const rgba = context.getImageData(0, 0, bitmap.width, bitmap.height).data;
  const rgb = new Uint8Array(bitmap.width * bitmap.height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    rgb[j] = rgba[i];
    rgb[j + 1] = rgba[i + 1];
    rgb[j + 2] = rgba[i + 2];
  }
  return { bitmap, rgb };
}

/** A canvas layer with colour `rgba` wherever `test(values[i])` holds (values: width x height, row-major). */
export function tint(values, width, height, test, rgba) {
  const pixels = new ImageData(width, height);
  const words = new Uint32Array(pixels.data.buffer);
  const color = new Uint32Array(Uint8ClampedArray.from(rgba).buffer)[0];
  for (let i = 0; i < width * height; i++) if (test(values[i])) words[i] = color;
  const layer = new OffscreenCanvas(width, height);
  layer.getContext("2d").putImageData(pixels, 0, 0);
  return layer;
}

/** Resolves once `current()`, a page's chain of queued tasks, has settled with nothing queued after it. */
export async function settled(current) {
  let seen;
  do {
    seen = current();
    await seen;
  } while (seen !== current());
}

async function timed(run, runs) {
  await run();
  const times = [];
  for (let i = 0; i < runs; i++) {
    const start = performance.now();
    await run();
    times.push(performance.now() - start);
  }
  return times;
}

export class BrowserSam {
  /**
   * Load the model the server serves; `progress(text)` hears about downloads. URL options: ?ep=wasm|webgpu&threads=N,
   * decoder=full, profile=prompt|preview|full (onnxruntime-web times that decoder's operators, see endProfiling).
   */
  static async load(params, progress) {
    const info = await (await fetch("/model/info.json")).json();
    const runtime = await loadRuntime(params.get("ep"), Number(params.get("threads") ?? 0));
    const { ort } = runtime;
    const options = { executionProviders: [...new Set([runtime.ep, "wasm"])], graphOptimizationLevel: "all" };
    const profiled = params.get("profile");
    const session = async (name, role) =>
      ort.InferenceSession.create(await fetchModel(name, progress), { ...options, enableProfiling: role === profiled });
    const encoder = info.encoder === "browser" ? await session("encoder.onnx") : null;
    const split = info.split_decoder && params.get("decoder") !== "full";
    const decoders = split
      ? {
          image: await session("decoder_image.onnx", "image"),
          prompt: await session("decoder_prompt.onnx", "prompt"),
          preview: await session("decoder_preview.onnx", "preview"),
        }
      : { full: await session("decoder.onnx", "full") };
    return new BrowserSam(info, runtime, encoder, decoders, profiled);
  }

  constructor(info, runtime, encoder, decoders, profiled = null) {
    Object.assign(this, { info, runtime, ort: runtime.ort, encoder, decoders, profiled });
  }

  /** With ?profile=ROLE: onnxruntime-web prints that decoder's timings so far to the console (Chrome trace JSON). */
  async endProfiling() {
    await this.decoders[this.profiled]?.endProfiling();
  }

  /** A line naming the runtime, for the page's footer. */
  describe() {
    const { ort, ep, threads, note } = this.runtime;
    const decoder = this.decoders.full ? "decoder in one graph" : "decoder split per image and per click";
    return `onnxruntime-web ${ort.env.versions?.web ?? ""}, ${ep}, ${threads || "default"} threads, ${decoder}${note}`;
  }

  /**
   * What the decoder needs of an image, from RGB bytes: the embedding (an ort.Tensor), or with the split decoder
   * the image half's tensors; with the preprocessing and encoder milliseconds (the image half's included).
   */
  async embed(rgb, height, width) {
    const { info, ort } = this;
    const size = info.image_size;
    const start = performance.now();
    const input = normalizeAndPad(resizeLongestSide(rgb, height, width, size), size, info.pixel_mean, info.pixel_std);
    const preprocessed = performance.now();
    let embedding;
    if (this.encoder) {
      embedding = (await this.encoder.run({ image: new ort.Tensor("float32", input, [1, 3, size, size]) })).image_embeddings;
    } else {
      const response = await fetch("/api/encode", { method: "POST", body: input });
      if (!response.ok) throw new Error(`the server could not encode the image: ${(await response.json()).error}`);
      embedding = new ort.Tensor("float32", new Float32Array(await response.arrayBuffer()), [1, ...info.embedding_shape]);
    }
    if (this.decoders.image) embedding = await this.decoders.image.run({ image_embeddings: embedding });
    return { embedding, preprocess: preprocessed - start, encoder: performance.now() - preprocessed };
  }

  /**
   * The three multimask outputs for `points` [{x, y, label}] and `box`, their IoUs, the best one and the ms taken.
   * With `preview` (and the split decoder) the low-res outputs hold every fourth logit: a quarter of the side, for
   * a sixth of the upscaling's work.
   */
  async decode(embedding, height, width, points, box, preview = false) {
    const { info, ort } = this;
    const feed = decoderFeed(points, box, height, width, info.image_size, info.mask_side);
    const split = Boolean(this.decoders.prompt);
    const tensors = split ? { ...embedding } : { image_embeddings: embedding };
    for (const [name, { data, dims }] of Object.entries(feed)) {
      if (!split || name.startsWith("point_")) tensors[name] = new ort.Tensor("float32", data, dims);
    }
    const start = performance.now();
    const session = split ? this.decoders[preview ? "preview" : "prompt"] : this.decoders.full;
    const out = await session.run(tensors, ["iou_predictions", "low_res_masks"]);
    const ms = performance.now() - start;
    const plane = out.low_res_masks.dims[2] * out.low_res_masks.dims[3];
    const iou = Array.from(out.iou_predictions.data.slice(1, 4)); // outputs 1-3: the multimask outputs
    const lowRes = [1, 2, 3].map((k) => out.low_res_masks.data.slice(k * plane, (k + 1) * plane));
    let chosen = 0;
    for (let k = 1; k < 3; k++) if (iou[k] > iou[chosen]) chosen = k;
    return { iou, lowRes, chosen, ms };
  }

  /**
   * Logits of low-res output `lowRes` (square: the decoder's or its preview's) at (outH x outW) (the original size
   * unless a display size is given). A preview's logit i sits at low-res pixel 4i + 2, upscaled as if at 4i + 1.5.
   */
  logits(lowRes, height, width, outH = height, outW = width) {
    return upscaleLogits(lowRes, Math.round(Math.sqrt(lowRes.length)), this.info.image_size, height, width, outH, outW);
  }

  /** The full-size 0/1 mask of a low-res output and its area. */
  mask(lowRes, height, width) {
    const logits = this.logits(lowRes, height, width);
    const mask = new Uint8Array(width * height);
    let area = 0;
    for (let i = 0; i < mask.length; i++) {
      if (logits[i] > this.info.mask_threshold) {
        mask[i] = 1;
        area++;
      }
    }
    return { mask, area };
  }

  /** Milliseconds of `runs` encoder runs on a blank input, after one warm-up run. */
  async timeEncoder(runs) {
    const size = this.info.image_size;
    const input = new this.ort.Tensor("float32", new Float32Array(3 * size * size), [1, 3, size, size]);
    return timed(() => this.encoder.run({ image: input }), runs);
  }

  /** Milliseconds of `runs` runs of the split decoder's image half on a blank embedding, after one warm-up run. */
  async timeImagePart(runs) {
    const shape = [1, ...this.info.embedding_shape];
    const input = new this.ort.Tensor("float32", new Float32Array(shape.reduce((a, b) => a * b)), shape);
    return timed(() => this.decoders.image.run({ image_embeddings: input }), runs);
  }
}
