// The demo page: open an image, encode it once, then decode clicks and boxes live.
// The model runs in the page (model.js); URL options: ?ep=wasm|webgpu&threads=N.
import { drawPrompts } from "./draw.js";
import { BrowserSam, readImage, settled, tint } from "./model.js";
import { cocoRle } from "./sam.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const DRAG_PIXELS = 4; // a press that moves further than this (on screen) draws a box
const COLORS = { mask: [37, 99, 235] };

const state = {
  image: null, // {name, width, height, bitmap}
  embedding: null, // ort.Tensor (1, C, h, w)
  actions: [], // {type: "point", x, y, label} | {type: "box", x0, y0, x1, y1}, in original pixels
  result: null, // {iou: [3], lowRes: [3 x side*side], chosen, mask: Uint8Array H*W, area}
  preview: null, // {logits: Float32Array at display size}
  timings: { decoder: [], preview: [] },
};
let queue = Promise.resolve(); // image loads and committed decodes run one after another
let busy = 0;
let hoverPending = null;

function message(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

const sam = await BrowserSam.load(params, message);
const { info } = sam;
$("model").textContent = `${info.name}: ${info.image_size} px input, encoder in the ${info.encoder}`;
$("runtime").textContent = sam.describe();
message("Open an image to start.");

// ---- image and encoder ----------------------------------------------------------------------

async function encode(rgb, height, width) {
  message(`encoding in the ${info.encoder}…`);
  const { embedding, preprocess, encoder } = await sam.embed(rgb, height, width);
  state.timings.preprocess = preprocess;
  state.timings.encoder = encoder;
  $("encoder-time").textContent = `${encoder.toFixed(0)} ms (+ ${preprocess.toFixed(0)} ms preprocessing)`;
  return embedding;
}

function resetImage() {
  state.image = null;
  state.embedding = null;
  state.actions = [];
  state.result = null;
  state.preview = null;
  for (const id of ["image-size", "encoder-time", "decoder-time", "preview-time"]) $(id).textContent = "–";
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

function decode(points, box, preview = false) {
  return sam.decode(state.embedding, state.image.height, state.image.width, points, box, preview);
}

function fullMask(result) {
  Object.assign(result, sam.mask(result.lowRes[result.chosen], state.image.height, state.image.width));
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
      const result = await decode([...points, point], box, true);
      state.timings.preview.push(result.ms);
      $("preview-time").textContent = `${result.ms.toFixed(1)} ms${sam.decoders.preview ? " (every fourth logit)" : ""}`;
      const canvas = $("view");
      state.preview = {
        logits: sam.logits(result.lowRes[result.chosen], state.image.height, state.image.width, canvas.height, canvas.width),
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
    context.drawImage(tint(state.preview.logits, canvas.width, canvas.height, (v) => v > info.mask_threshold, [...COLORS.mask, 90]), 0, 0);
  } else if (state.result) {
    if (maskLayer?.result !== state.result || maskLayer.chosen !== state.result.chosen) {
      maskLayer = { result: state.result, chosen: state.result.chosen, layer: tint(state.result.mask, width, height, (v) => v, [...COLORS.mask, 130]) };
    }
    context.drawImage(maskLayer.layer, 0, 0, canvas.width, canvas.height);
  }
  const sx = canvas.width / width;
  const sy = canvas.height / height;
  const { points, box } = prompts();
  drawPrompts(context, points, box, dragging, sx, sy);
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
  runtime: { ep: sam.runtime.ep, threads: sam.runtime.threads },
  state,
  /** Resolves once every queued image load and decode has finished. */
  idle: () => settled(() => queue),
  /** The current mask as the downloadable record (COCO RLE), or null. */
  record: () => (state.result ? record() : null),
  /** Milliseconds of `runs` encoder runs on the current image's input, after one warm-up run. */
  timeEncoder: (runs) => sam.timeEncoder(runs),
  /** Milliseconds of `runs` runs of the split decoder's image half on the current image, after one warm-up run. */
  timeImagePart: (runs) => sam.timeImagePart(runs),
  /** The decoder's outputs for `points` and `box` on the current image (`preview`: the hover preview's). */
  decode: async (points, box, preview = false) => {
    const { iou, lowRes, chosen } = await decode(points, box, preview);
    return { iou, chosen, lowRes: lowRes.map((plane) => Array.from(plane)) };
  },
  /** With ?profile=ROLE, print that decoder's operator timings to the console. */
  endProfiling: () => sam.endProfiling(),
  /** Milliseconds of `runs` decoder runs on the current prompts (`preview`: the hover preview's decoder). */
  timeDecoder: async (runs, preview = false) => {
    const { points, box } = prompts();
    const times = [];
    for (let i = 0; i < runs; i++) times.push((await decode(points, box, preview)).ms);
    return times;
  },
};
document.body.dataset.ready = "true";
