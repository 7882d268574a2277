// The annotator: a folder's images, each with a list of objects made from clicks and boxes with the model in
// the page, or proposed by the server's generator; saved as SA-1B JSON through the server's versioned saves.
import { drawPrompts } from "./draw.js";
import { BrowserSam, readImage, settled, tint } from "./model.js";
import { cocoRle, decodeRle } from "./sam.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const DRAG_PIXELS = 4;
const PALETTE = [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [0, 128, 128], [170, 110, 40], [128, 0, 0], [0, 0, 128]];

const state = {
  images: [], // the server's listing: {stem, name, state, objects, error}
  current: null, // {stem, name, width, height, bitmap, embedding, version, state}
  objects: [], // {key, category, source, points: [{x, y, label}], box, mask, area, iou, chosen, hidden, original}
  selected: null, // key of the selected object
  dirty: false,
  replaceConsent: false,
  timings: { decoder: [] },
};
let queue = Promise.resolve(); // image loads, decodes and saves run one after another
let nextKey = 1;

function message(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json();
  if (!response.ok) throw Object.assign(new Error(body.error ?? `${path}: ${response.status}`), { status: response.status });
  return body;
}

function run(task) {
  queue = queue.then(task).catch((err) => message(err.message, true));
  return queue;
}

const sam = await BrowserSam.load(params, message);
const { info } = sam;
$("model").textContent = `${info.name}: ${info.image_size} px input, encoder in the ${info.encoder}`;
$("runtime").textContent = sam.describe();

// ---- folder ---------------------------------------------------------------------------------

async function refreshList() {
  const folder = await api("/api/images");
  state.images = folder.images;
  state.thresholds = folder.thresholds;
  $("out").textContent = folder.out;
  if (folder.thresholds && !$("pred-iou").value) {
    $("pred-iou").value = folder.thresholds.pred_iou_thresh;
    $("stability").value = folder.thresholds.stability_score_thresh;
  }
  $("propose-all").disabled = !folder.thresholds;
  renderList();
}

function renderList() {
  const list = $("images");
  list.replaceChildren();
  for (const row of state.images) {
    const button = document.createElement("button");
    button.dataset.stem = row.stem;
    button.className = row.stem === state.current?.stem ? "current" : "";
    button.disabled = row.state === "unreadable image";
    button.title = row.error ?? `${row.objects} objects`;
    const name = document.createElement("span");
    name.textContent = row.name;
    const badge = document.createElement("span");
    badge.className = `badge ${row.state.replaceAll(" ", "-")}`;
    badge.textContent = row.state;
    button.append(name, badge);
    button.addEventListener("click", () => openImage(row.stem));
    const item = document.createElement("li");
    item.append(button);
    list.append(item);
  }
  const done = state.images.filter((r) => r.state === "done").length;
  $("progress").textContent = `(${done} of ${state.images.length} done)`;
}

// ---- one image ------------------------------------------------------------------------------

function toObject(saved) {
  const points = (saved.point_coords ?? []).map(([x, y], i) => ({ x, y, label: saved.point_labels?.[i] ?? 1 }));
  const box = saved.box ? { x0: saved.box[0], y0: saved.box[1], x1: saved.box[2], y1: saved.box[3] } : null;
  const mask = decodeRle(saved.segmentation);
  const object = { key: nextKey++, category: saved.category ?? "", source: saved.source, points, box, mask, area: saved.area, iou: saved.predicted_iou, hidden: false, actions: [] };
  object.original = { mask, area: saved.area, iou: saved.predicted_iou, points: [...points], box, source: saved.source };
  return object;
}

function toSaved(object) {
  const { width, height } = state.current;
  return {
    segmentation: cocoRle(object.mask, height, width),
    area: object.area,
    predicted_iou: object.iou,
    point_coords: object.points.map((p) => [p.x, p.y]),
    point_labels: object.points.map((p) => p.label),
    box: object.box ? [object.box.x0, object.box.y0, object.box.x1, object.box.y1] : null,
    category: object.category || null,
    source: object.source,
  };
}

function save() {
  return run(async () => saveNow());
}

async function saveNow() {
  if (!state.current) return true;
  const { stem } = state.current;
  const body = { version: state.current.version, state: $("done").checked ? "done" : "in progress", objects: state.objects.map(toSaved) };
  if (state.current.state === "unreadable annotations") {
    if (!state.replaceConsent && !confirm(`${state.current.error}\n\nReplace it with this page's objects?`)) {
      message(`${state.current.name} was not saved: its JSON is kept until you agree to replace it`, true);
      return false;
    }
    body.replace = true;
  }
  try {
    const saved = await api(`/api/annotations/${encodeURIComponent(stem)}`, { method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    Object.assign(state.current, { version: saved.version, state: saved.state, error: null });
    state.dirty = false;
    message(`saved ${saved.objects} objects of ${state.current.name}`);
  } catch (err) {
    message(`not saved: ${err.message}` + (err.status === 409 ? " (Reload shows it; your objects stay here until then)" : ""), true);
    return false;
  }
  await refreshList();
  return true;
}

function openImage(stem, reload = false) {
  return run(async () => {
    if (state.current?.stem === stem && !reload) return;
    // leaving an image saves it, and a refused save keeps the page here; Reload drops this page's changes
    if (!reload && state.dirty && !(await saveNow())) return;
    const view = await api(`/api/annotations/${encodeURIComponent(stem)}`);
    state.current = null;
    state.objects = [];
    state.selected = null;
    state.dirty = false;
    state.replaceConsent = false;
    render();
    message(`opening ${view.name}…`);
    const blob = await (await fetch(`/api/images/${encodeURIComponent(stem)}/file`)).blob();
    let image;
    try {
      image = await readImage(blob);
    } catch {
      message(`${view.name} is not an image this browser can read; it is skipped`, true);
      return;
    }
    const { embedding, preprocess, encoder } = await sam.embed(image.rgb, image.bitmap.height, image.bitmap.width);
    $("encoder-time").textContent = `${encoder.toFixed(0)} ms (+ ${preprocess.toFixed(0)} ms preprocessing)`;
    state.current = { ...view, bitmap: image.bitmap, embedding, width: image.bitmap.width, height: image.bitmap.height };
    state.objects = view.objects.map(toObject);
    $("done").checked = view.state === "done";
    renderList();
    render();
    if (view.error) message(view.error, true);
    else message(`${view.name}: ${state.objects.length} objects (${view.state}). Click an object to add it.`);
  });
}

function step(delta) {
  const at = state.images.findIndex((r) => r.stem === state.current?.stem);
  for (let i = at + delta; i >= 0 && i < state.images.length; i += delta) {
    if (state.images[i].state !== "unreadable image") return openImage(state.images[i].stem);
  }
  return queue;
}

// ---- objects --------------------------------------------------------------------------------

function selected() {
  return state.objects.find((o) => o.key === state.selected) ?? null;
}

function select(key) {
  state.selected = key;
  render();
}

// An object's prompts are its saved ones plus the clicks of this visit (object.actions, undone last first);
// with no click of this visit it shows its saved mask as it was.
async function redecode(object) {
  if (!object.actions.length) {
    const { mask, area, iou, points, box, source } = object.original;
    Object.assign(object, { mask, area, iou, points: [...points], box, source });
    return;
  }
  const { width, height, embedding } = state.current;
  const result = await sam.decode(embedding, height, width, object.points, object.box);
  state.timings.decoder.push(result.ms);
  $("decoder-time").textContent = `${result.ms.toFixed(1)} ms`;
  Object.assign(object, sam.mask(result.lowRes[result.chosen], height, width), { iou: result.iou[result.chosen], chosen: result.chosen });
}

function addPrompt(prompt) {
  return run(async () => {
    if (!state.current) return;
    let object = selected();
    if (!object) {
      object = { key: nextKey++, category: $("category").value, source: "manual", points: [], box: null, hidden: false, actions: [] };
      object.original = { mask: null, area: 0, iou: null, points: [], box: null, source: "manual" };
      state.objects.push(object);
      state.selected = object.key;
    } else if (object.source !== "manual") {
      object.source = "edited";
    }
    if (prompt.type === "box") {
      object.actions.push({ type: "box", previous: object.box });
      object.box = prompt.box;
    } else {
      object.actions.push({ type: "point" });
      object.points.push(prompt.point);
    }
    await redecode(object);
    state.dirty = true;
    render();
  });
}

function undo() {
  return run(async () => {
    const object = selected();
    if (!object?.actions.length) return;
    const action = object.actions.pop();
    if (action.type === "box") object.box = action.previous;
    else object.points.pop();
    state.dirty = true;
    if (!object.actions.length && !object.original.mask) return removeObject(object.key);
    await redecode(object);
    render();
  });
}

function removeObject(key) {
  state.objects = state.objects.filter((o) => o.key !== key);
  if (state.selected === key) state.selected = null;
  state.dirty = true;
  render();
}

function thresholds() {
  return { pred_iou_thresh: Number($("pred-iou").value), stability_score_thresh: Number($("stability").value) };
}

function propose() {
  return run(async () => {
    if (!state.current) return;
    message("proposing objects…");
    const stem = state.current.stem;
    const result = await api(`/api/propose/${encodeURIComponent(stem)}`, { method: "POST", body: JSON.stringify(thresholds()) });
    if (state.current?.stem !== stem) return;
    state.objects = state.objects.filter((o) => o.source !== "auto"); // proposing again replaces untouched proposals
    const proposed = result.objects.map(toObject);
    state.objects.push(...proposed);
    state.dirty = true;
    $("shade").checked = true;
    render();
    message(`${proposed.length} objects proposed at predicted IoU ≥ ${result.thresholds.pred_iou_thresh}, stability ≥ ${result.thresholds.stability_score_thresh}; the shaded parts have no object yet`);
  });
}

async function proposeAll() {
  let status = await api("/api/propose-all", { method: "POST", body: JSON.stringify(thresholds()) });
  while (status.running) {
    $("folder-status").textContent = `proposing: ${status.done} of ${status.total} images`;
    await new Promise((resolve) => setTimeout(resolve, 500));
    status = await api("/api/propose-all");
  }
  const skipped = Object.keys(status.skipped).length;
  $("folder-status").textContent = `proposed objects for ${status.written} images` + (skipped ? `, skipped ${skipped}` : "");
  await refreshList();
  return status;
}

// ---- drawing --------------------------------------------------------------------------------

function colorOf(object) {
  return PALETTE[(object.key - 1) % PALETTE.length];
}

function layout() {
  const canvas = $("view");
  const image = state.current;
  const maxWidth = Math.max(160, Math.min(1100, $("stage").clientWidth - 20));
  const scale = image ? Math.min(maxWidth / image.width, 700 / image.height) : 1;
  const width = image ? Math.max(1, Math.round(image.width * scale)) : 640;
  const height = image ? Math.max(1, Math.round(image.height * scale)) : 360;
  if (canvas.width !== width || canvas.height !== height) Object.assign(canvas, { width, height });
  return canvas;
}

const layers = new WeakMap(); // mask -> its tinted layer, per selection state
function layerOf(object, isSelected) {
  const cached = layers.get(object.mask);
  if (cached?.selected === isSelected && cached.key === object.key) return cached.layer;
  const { width, height } = state.current;
  const layer = tint(object.mask, width, height, (v) => v, [...colorOf(object), isSelected ? 170 : 105]);
  layers.set(object.mask, { layer, selected: isSelected, key: object.key });
  return layer;
}

function uncovered() {
  const { width, height } = state.current;
  const covered = new Uint8Array(width * height);
  for (const o of state.objects) if (o.mask && !o.hidden) for (let i = 0; i < covered.length; i++) covered[i] |= o.mask[i];
  return tint(covered, width, height, (v) => !v, [30, 30, 30, 110]);
}

function render() {
  const canvas = layout();
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  const image = state.current;
  const object = selected();
  for (const id of ["save", "reload", "propose", "category"]) $(id).disabled = !image || (id === "propose" && !state.thresholds);
  $("undo").disabled = !object?.actions.length;
  $("delete-object").disabled = !object;
  $("category").value = object ? object.category : $("category").value;
  renderObjects();
  if (!image) return;
  context.drawImage(image.bitmap, 0, 0, canvas.width, canvas.height);
  if ($("shade").checked) context.drawImage(uncovered(), 0, 0, canvas.width, canvas.height);
  for (const o of state.objects) {
    if (o.mask && !o.hidden) context.drawImage(layerOf(o, o.key === state.selected), 0, 0, canvas.width, canvas.height);
  }
  const sx = canvas.width / image.width;
  const sy = canvas.height / image.height;
  drawPrompts(context, object?.points ?? [], object?.box ?? null, dragging, sx, sy);
}

function renderObjects() {
  const list = $("objects");
  list.replaceChildren();
  $("object-count").textContent = state.current ? `(${state.objects.length})` : "";
  state.objects.forEach((object, i) => {
    const item = document.createElement("li");
    item.dataset.key = object.key;
    item.className = object.key === state.selected ? "selected" : "";
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${colorOf(object).join(",")})`;
    const name = document.createElement("span");
    name.className = "name";
    const iou = object.iou == null ? "" : ` · IoU ${object.iou.toFixed(2)}`;
    name.textContent = `${i + 1}. ${object.category || "unnamed"} · ${object.source}${iou}`;
    const hide = document.createElement("button");
    hide.className = "hide";
    hide.textContent = object.hidden ? "show" : "hide";
    hide.addEventListener("click", (event) => {
      event.stopPropagation();
      object.hidden = !object.hidden;
      render();
    });
    const remove = document.createElement("button");
    remove.className = "delete";
    remove.textContent = "delete";
    remove.addEventListener("click", (event) => {
      event.stopPropagation();
      removeObject(object.key);
    });
    item.append(swatch, name, hide, remove);
    item.addEventListener("click", () => select(object.key === state.selected ? null : object.key));
    list.append(item);
  });
  const names = [...new Set(state.objects.map((o) => o.category).filter(Boolean))];
  $("categories").replaceChildren(...names.map((n) => Object.assign(document.createElement("option"), { value: n })));
}

// ---- input ----------------------------------------------------------------------------------

let dragging = null;
function imagePoint(event) {
  const rect = $("view").getBoundingClientRect();
  const { width, height } = state.current;
  const x = ((event.clientX - rect.left) / rect.width) * width;
  const y = ((event.clientY - rect.top) / rect.height) * height;
  return { x: Math.min(Math.max(x, 0), width), y: Math.min(Math.max(y, 0), height), sx: event.clientX, sy: event.clientY };
}

function objectAt(x, y) {
  const { width } = state.current;
  const at = Math.floor(y) * width + Math.floor(x);
  return [...state.objects].reverse().find((o) => o.mask && !o.hidden && o.mask[at]) ?? null;
}

$("view").addEventListener("contextmenu", (event) => event.preventDefault());
$("view").addEventListener("mousedown", (event) => {
  if (!state.current) return;
  const p = imagePoint(event);
  dragging = { ...p, cx: p.x, cy: p.y, moved: false };
});
$("view").addEventListener("mousemove", (event) => {
  if (!dragging || !state.current) return;
  const p = imagePoint(event);
  Object.assign(dragging, { cx: p.x, cy: p.y });
  dragging.moved ||= Math.hypot(p.sx - dragging.sx, p.sy - dragging.sy) > DRAG_PIXELS;
  render();
});
window.addEventListener("mouseup", (event) => {
  if (!dragging) return;
  const start = dragging;
  dragging = null;
  if (start.moved) {
    const [x0, x1] = [start.x, start.cx].sort((a, b) => a - b);
    const [y0, y1] = [start.y, start.cy].sort((a, b) => a - b);
    if (x1 > x0 && y1 > y0) addPrompt({ type: "box", box: { x0, y0, x1, y1 } });
  } else if (event.altKey) {
    select(objectAt(start.x, start.y)?.key ?? null);
  } else {
    const negative = event.button === 2 || event.shiftKey;
    addPrompt({ type: "point", point: { x: start.x, y: start.y, label: negative ? 0 : 1 } });
  }
});
$("new-object").addEventListener("click", () => select(null));
$("undo").addEventListener("click", undo);
$("delete-object").addEventListener("click", () => state.selected && removeObject(state.selected));
$("category").addEventListener("input", () => {
  const object = selected();
  if (!object) return;
  object.category = $("category").value;
  if (object.source === "auto") object.source = "edited";
  state.dirty = true;
  renderObjects();
});
$("done").addEventListener("change", () => {
  state.dirty = true;
});
$("shade").addEventListener("change", render);
$("save").addEventListener("click", save);
$("propose").addEventListener("click", propose);
$("propose-all").addEventListener("click", () => run(proposeAll));
$("reload").addEventListener("click", () => {
  if (!state.current || (state.dirty && !confirm("Drop this page's unsaved changes and show the saved version?"))) return;
  openImage(state.current.stem, true);
});
$("prev").addEventListener("click", () => step(-1));
$("next").addEventListener("click", () => step(1));
window.addEventListener("keydown", (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key === "s") {
    event.preventDefault();
    save();
  }
  if (event.target instanceof HTMLInputElement) return;
  if (event.key === "Escape" || event.key === "n") select(null);
  else if (event.key === "Delete" && state.selected) removeObject(state.selected);
  else if (event.key === "PageDown") step(1);
  else if (event.key === "PageUp") step(-1);
});
window.addEventListener("beforeunload", (event) => {
  if (state.dirty) event.preventDefault(); // the browser asks before unsaved objects are lost
});

// ---- what tests and benchmarks read ---------------------------------------------------------

await refreshList();
message(state.images.length ? "Pick an image to start." : "The images folder holds no image.", !state.images.length);
window.annotator = {
  info,
  state,
  /** Resolves once every queued load, decode and save has finished. */
  idle: () => settled(() => queue),
  /** The current image's objects as a save sends them. */
  objects: () => state.objects.map(toSaved),
  open: openImage,
  proposeAll: () => run(proposeAll),
  /** Agree in advance to replace an unreadable JSON (what the confirmation dialog asks). */
  consentToReplace: () => {
    state.replaceConsent = true;
  },
};
document.body.dataset.ready = "true";
