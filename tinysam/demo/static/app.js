// The demo page: open an image, encode it once, then decode clicks and boxes live.
// Both models run in onnxruntime-web (WebGPU when the browser has an adapter, else threaded WASM);
// with encoder=server the embedding comes from POST /api/encode. URL options: ?ep=wasm|webgpu&threads=N.
import { cocoRle, decoderFeed, normalizeAndPad, resizeLongestSide, upscaleLogits } from "./sam.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const VENDOR = new URL("./vendor/onnxruntime-web/", import.meta.url).href;
const DRAG_PIXELS = 4; // a press that moves further than this (on screen) draws a box
const COLORS = { mask: [37, 99, 235], positive: "#16a34a", negative: "#dc2626", box: "#f59e0b" };

const info = await (await fetch("/model/info.json")).json();
const state = {
  image: null, // {name, width, height, bitmap}
  embedding: null, // ort.Tensor (1, C, h, w)
  actions: [], // {type: "point", x, y, label} | {type: "box", x0, y0, x1, y1}, in original pixels
  result: null, // {iou: [3], lowRes: [3 x side*side], chosen, mask: Uint8Array H*W, area}
  preview: null, // {logits: Float32Array at display size}
  timings: { decoder: [] },
};
let queue = Promise.resolve(); // image loads and committed decodes run one after another
let busy = 0;
let hoverPending = null;

function message(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

async function loadRuntime() {
  const wanted = params.get("ep");
  let webgpu = false;
  if (wanted !== "wasm" && "gpu" in navigator) {
    webgpu = Boolean(await navigator.gpu.requestAdapter().catch(() => null));
  }
  const ort = await import(`${VENDOR}${webgpu ? "ort.webgpu.min.mjs" : "ort.wasm.min.mjs"}`);
  ort.env.wasm.wasmPaths = VENDOR;
  const threads = Number(params.get("threads") ?? 0); // 0: onnxruntime-web's default
  ort.env.wasm.numThreads = crossOriginIsolated ? threads : 1;
  const ep = webgpu ? "webgpu" : "wasm";
  const note = wanted === "webgpu" && !webgpu ? " (no WebGPU adapter in this browser)" : "";
  return { ort, ep, threads: ort.env.wasm.numThreads, note };
}

async function fetchModel(name, label) {
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
    if (total) message(`loading the ${label}: ${Math.round((100 * received) / total)}% of ${(total / 1e6).toFixed(1)} MB`);
  }
  const bytes = new Uint8Array(received);
  let at = 0;
  for (const part of parts) {
    bytes.set(part, at);
    at += part.length;
  }
  return bytes;
}

const runtime = await loadRuntime();
const { ort } = runtime;
const options = { executionProviders: [...new Set([runtime.ep, "wasm"])], graphOptimizationLevel: "all" };
const encoder = info.encoder === "browser" ? await ort.InferenceSession.create(await fetchModel("encoder.onnx", "encoder"), options) : null;
const decoder = await ort.InferenceSession.create(await fetchModel("decoder.onnx", "decoder"), options);
$("model").textContent = `${info.name}: ${info.image_size} px input, encoder in the ${info.encoder}`;
$("runtime").textContent = `onnxruntime-web ${ort.env.versions?.web ?? ""}, ${runtime.ep}, ${runtime.threads || "default"} threads${runtime.note}`;
message("Open an image to start.");

// ---- image and encoder ----------------------------------------------------------------------

async function readImage(file) {
  const bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none", imageOrientation: "from-image" });
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

async function encode(rgb, height, width) {
  const size = info.image_size;
  const start = performance.now();
  message("preprocessing…");
  const input = normalizeAndPad(resizeLongestSide(rgb, height, width, size), size, info.pixel_mean, info.pixel_std);
  const preprocessed = performance.now();
  message(`encoding in the ${info.encoder}…`);
  let embedding;
  if (encoder) {
    const out = await encoder.run({ image: new ort.Tensor("float32", input, [1, 3, size, size]) });
    embedding = out.image_embeddings;
  } else {
    const response = await fetch("/api/encode", { method: "POST", body: input });
    if (!response.ok) throw new Error(`the server could not encode the image: ${(await response.json()).error}`);
    embedding = new ort.Tensor("float32", new Float32Array(await response.arrayBuffer()), [1, ...info.embedding_shape]);
  }
  const done = performance.now();
  state.timings.preprocess = preprocessed - start;
  state.timings.encoder = done - preprocessed;
  $("encoder-time").textContent = `${state.timings.encoder.toFixed(0)} ms (+ ${state.timings.preprocess.toFixed(0)} ms preprocessing)`;
  return embedding;
}

function resetImage() {
  state.image = null;
  state.embedding = null;
  state.actions = [];
  state.result = null;
  state.preview = null;
  for (const id of ["image-size", "encoder-time", "decoder-time"]) $(id).textContent = "–";
  render();
}

function openFile(file) {
  queue = queue.then(async () => {
    busy++;
    resetImage(); // whatever happens next, nothing of the previous image stays on screen
    try {
      const { bitmap, rgb } = await readImage(file);
      state.embedding = await encode(rgb, bitmap.height, bitmap.width);
      state.image = { name: file.name, width: bitmap.width, height: bitmap.height, bitmap };
      $("image-size").textContent = `${file.name}: ${bitmap.width} x ${bitmap.height}`;
      message("Click the object (shift- or right-click to exclude), or drag a box.");
    } catch (err) {
      resetImage();
      const unreadable = err instanceof DOMException && err.name === "InvalidStateError";
      message(unreadable ? `${file.name} is not an image this browser can read; open a PNG, JPEG or WebP file` : `${file.name}: ${err.message}`, true);
    } finally {
      busy--;
      render();
    }
  });
  return queue;
}

// ---- prompts and decoder --------------------------------------------------------------------

function prompts(actions = state.actions) {
  const points = actions.filter((a) => a.type === "point");
  const box = actions.filter((a) => a.type === "box").at(-1) ?? null;
  return { points, box };
}

async function decode(points, box) {
  const { width, height } = state.image;
  const feed = decoderFeed(points, box, height, width, info.image_size, info.mask_side);
  const tensors = { image_embeddings: state.embedding };
  for (const [name, { data, dims }] of Object.entries(feed)) tensors[name] = new ort.Tensor("float32", data, dims);
  const start = performance.now();
  const out = await decoder.run(tensors, ["iou_predictions", "low_res_masks"]);
  const ms = performance.now() - start;
  const plane = info.mask_side * info.mask_side;
  const iou = Array.from(out.iou_predictions.data.slice(1, 4)); // outputs 1-3: the multimask outputs
  const lowRes = [1, 2, 3].map((k) => out.low_res_masks.data.slice(k * plane, (k + 1) * plane));
  let chosen = 0;
  for (let k = 1; k < 3; k++) if (iou[k] > iou[chosen]) chosen = k;
  return { iou, lowRes, chosen, ms };
}

function fullMask(result) {
  const { width, height } = state.image;
  const logits = upscaleLogits(result.lowRes[result.chosen], info.mask_side, info.image_size, height, width);
  const mask = new Uint8Array(width * height);
  let area = 0;
  for (let i = 0; i < mask.length; i++) {
    if (logits[i] > info.mask_threshold) {
      mask[i] = 1;
      area++;
    }
  }
  result.mask = mask;
  result.area = area;
}

function commit() {
  queue = queue.then(async () => {
    state.preview = null;
    if (!state.image) return;
    const { points, box } = prompts();
    if (!points.length && !box) {
      state.result = null;
      return render();
    }
    busy++;
    try {
      const result = await decode(points, box);
      fullMask(result);
      state.result = result;
      state.timings.decoder.push(result.ms);
      $("decoder-time").textContent = `${result.ms.toFixed(1)} ms`;
    } catch (err) {
      state.result = null;
      message(`decoding failed: ${err.message}`, true);
    } finally {
      busy--;
      render();
    }
  });
  return queue;
}

async function hover(x, y) {
  hoverPending = { x, y };
  if (busy || !state.embedding) return;
  busy++;
  try {
    while (hoverPending) {
      const point = { ...hoverPending, label: 1 };
      hoverPending = null;
      const { points, box } = prompts();
      const result = await decode([...points, point], box);
      const canvas = $("view");
      state.preview = {
        logits: upscaleLogits(result.lowRes[result.chosen], info.mask_side, info.image_size, state.image.height, state.image.width, canvas.height, canvas.width),
      };
      render();
    }
  } finally {
    busy--;
  }
}

// ---- drawing --------------------------------------------------------------------------------

function layout() {
  const canvas = $("view");
  const maxWidth = Math.max(160, Math.min(900, $("stage").clientWidth - 20));
  const scale = state.image ? Math.min(maxWidth / state.image.width, 640 / state.image.height) : 1;
  const width = state.image ? Math.max(1, Math.round(state.image.width * scale)) : 640;
  const height = state.image ? Math.max(1, Math.round(state.image.height * scale)) : 360;
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  return canvas;
}

function tint(values, width, height, test, alpha) {
  const pixels = new ImageData(width, height);
  const words = new Uint32Array(pixels.data.buffer);
  const [r, g, b] = COLORS.mask;
  const color = new Uint32Array(Uint8ClampedArray.of(r, g, b, alpha).buffer)[0];
  for (let i = 0; i < width * height; i++) if (test(values[i])) words[i] = color;
  const layer = new OffscreenCanvas(width, height);
  layer.getContext("2d").putImageData(pixels, 0, 0);
  return layer;
}

let maskLayer = null; // the committed mask drawn once at full size, reused while it is current
function render() {
  const canvas = layout();
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  const ready = Boolean(state.image);
  for (const id of ["undo", "clear"]) $(id).disabled = !ready || !state.actions.length;
  for (const id of ["download-png", "download-rle"]) $(id).disabled = !state.result;
  renderChoices();
  if (!ready) return;
  context.drawImage(state.image.bitmap, 0, 0, canvas.width, canvas.height);
  const { width, height } = state.image;
  if (state.preview) {
    context.drawImage(tint(state.preview.logits, canvas.width, canvas.height, (v) => v > info.mask_threshold, 90), 0, 0);
  } else if (state.result) {
    if (maskLayer?.result !== state.result || maskLayer.chosen !== state.result.chosen) {
      maskLayer = { result: state.result, chosen: state.result.chosen, layer: tint(state.result.mask, width, height, (v) => v, 130) };
    }
    context.drawImage(maskLayer.layer, 0, 0, canvas.width, canvas.height);
  }
  const sx = canvas.width / width;
  const sy = canvas.height / height;
  const { points, box } = prompts();
  if (box) {
    context.strokeStyle = COLORS.box;
    context.lineWidth = 2;
    context.strokeRect(box.x0 * sx, box.y0 * sy, (box.x1 - box.x0) * sx, (box.y1 - box.y0) * sy);
  }
  if (dragging?.moved) {
    context.setLineDash([5, 4]);
    context.strokeStyle = COLORS.box;
    context.strokeRect(dragging.x * sx, dragging.y * sy, (dragging.cx - dragging.x) * sx, (dragging.cy - dragging.y) * sy);
    context.setLineDash([]);
  }
  for (const p of points) {
    context.fillStyle = p.label ? COLORS.positive : COLORS.negative;
    context.beginPath();
    context.arc(p.x * sx, p.y * sy, 5, 0, 2 * Math.PI);
    context.fill();
    context.strokeStyle = "white";
    context.stroke();
  }
}

function renderChoices() {
  const choices = $("choices");
  choices.replaceChildren();
  if (!state.result) return;
  state.result.iou.forEach((iou, k) => {
    const button = document.createElement("button");
    button.textContent = `mask ${k + 1} · IoU ${iou.toFixed(2)}`;
    button.className = k === state.result.chosen ? "chosen" : "";
    button.dataset.index = k;
    button.addEventListener("click", () => {
      queue = queue.then(() => {
        state.result.chosen = k;
        fullMask(state.result);
        render();
      });
    });
    choices.append(button);
  });
}

// ---- input events ---------------------------------------------------------------------------

let dragging = null;
function imagePoint(event) {
  const rect = $("view").getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * state.image.width;
  const y = ((event.clientY - rect.top) / rect.height) * state.image.height;
  return { x: Math.min(Math.max(x, 0), state.image.width), y: Math.min(Math.max(y, 0), state.image.height), sx: event.clientX, sy: event.clientY };
}

$("view").addEventListener("contextmenu", (event) => event.preventDefault());
$("view").addEventListener("mousedown", (event) => {
  if (!state.embedding) return;
  const p = imagePoint(event);
  dragging = { ...p, cx: p.x, cy: p.y, moved: false };
});
$("view").addEventListener("mousemove", (event) => {
  if (!state.embedding) return;
  const p = imagePoint(event);
  if (dragging) {
    dragging.cx = p.x;
    dragging.cy = p.y;
    dragging.moved ||= Math.hypot(p.sx - dragging.sx, p.sy - dragging.sy) > DRAG_PIXELS;
    return render();
  }
  hover(p.x, p.y);
});
$("view").addEventListener("mouseleave", () => {
  hoverPending = null;
  state.preview = null;
  render();
});
window.addEventListener("mouseup", (event) => {
  if (!dragging) return;
  const start = dragging;
  dragging = null;
  hoverPending = null;
  if (start.moved) {
    const [x0, x1] = [start.x, start.cx].sort((a, b) => a - b);
    const [y0, y1] = [start.y, start.cy].sort((a, b) => a - b);
    if (x1 > x0 && y1 > y0) state.actions.push({ type: "box", x0, y0, x1, y1 });
  } else {
    const negative = event.button === 2 || event.shiftKey;
    state.actions.push({ type: "point", x: start.x, y: start.y, label: negative ? 0 : 1 });
  }
  commit();
});
$("undo").addEventListener("click", () => {
  state.actions.pop();
  commit();
});
$("clear").addEventListener("click", () => {
  state.actions = [];
  commit();
});
$("file").addEventListener("change", (event) => {
  if (event.target.files.length) openFile(event.target.files[0]);
  event.target.value = "";
});
$("stage").addEventListener("dragover", (event) => {
  event.preventDefault();
  $("stage").classList.add("dragging");
});
$("stage").addEventListener("dragleave", () => $("stage").classList.remove("dragging"));
$("stage").addEventListener("drop", (event) => {
  event.preventDefault();
  $("stage").classList.remove("dragging");
  if (event.dataTransfer.files.length) openFile(event.dataTransfer.files[0]);
});

// ---- downloads ------------------------------------------------------------------------------

function save(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function stem() {
  return state.image.name.replace(/\.[^.]+$/, "");
}

function record() {
  const { points, box } = prompts();
  const { width, height } = state.image;
  return {
    image: state.image.name,
    segmentation: cocoRle(state.result.mask, height, width),
    area: state.result.area,
    predicted_iou: state.result.iou[state.result.chosen],
    multimask_index: state.result.chosen,
    point_coords: points.map((p) => [p.x, p.y]),
    point_labels: points.map((p) => p.label),
    box: box ? [box.x0, box.y0, box.x1, box.y1] : null,
  };
}

$("download-rle").addEventListener("click", () => {
  save(new Blob([JSON.stringify(record())], { type: "application/json" }), `${stem()}_mask.json`);
});
$("download-png").addEventListener("click", async () => {
  const { width, height } = state.image;
  const pixels = new ImageData(width, height);
  const words = new Uint32Array(pixels.data.buffer);
  const [black, white] = new Uint32Array(Uint8ClampedArray.of(0, 0, 0, 255, 255, 255, 255, 255).buffer);
  for (let i = 0; i < width * height; i++) words[i] = state.result.mask[i] ? white : black;
  const canvas = new OffscreenCanvas(width, height);
  canvas.getContext("2d").putImageData(pixels, 0, 0);
  save(await canvas.convertToBlob({ type: "image/png" }), `${stem()}_mask.png`);
});

// ---- what tests and benchmarks read ---------------------------------------------------------

window.demo = {
  info,
  runtime: { ep: runtime.ep, threads: runtime.threads },
  state,
  /** Resolves once every queued image load and decode has finished. */
  idle: async () => {
    let seen;
    do {
      seen = queue;
      await seen;
    } while (seen !== queue);
  },
  /** The current mask as the downloadable record (COCO RLE), or null. */
  record: () => (state.result ? record() : null),
  /** Milliseconds of `runs` encoder runs on the current image's input, after one warm-up run. */
  timeEncoder: async (runs) => {
    const size = info.image_size;
    const input = new ort.Tensor("float32", new Float32Array(3 * size * size), [1, 3, size, size]);
    await encoder.run({ image: input });
    const times = [];
    for (let i = 0; i < runs; i++) {
      const start = performance.now();
      await encoder.run({ image: input });
      times.push(performance.now() - start);
    }
    return times;
  },
  /** Milliseconds of `runs` decoder runs on the current prompts. */
  timeDecoder: async (runs) => {
    const { points, box } = prompts();
    const times = [];
    for (let i = 0; i < runs; i++) times.push((await decode(points, box)).ms);
    return times;
  },
};
document.body.dataset.ready = "true";
