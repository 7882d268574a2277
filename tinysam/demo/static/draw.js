// Drawing the prompts on a page's canvas: positive and negative points, the box, the box being dragged.
// Both pages (app.js, annotate.js) use it; coordinates are original pixels, scaled by (sx, sy).

export const PROMPT_COLORS = { positive: "#16a34a", negative: "#dc2626", box: "#f59e0b" };

/** Draw `points` [{x, y, label}], `box` {x0, y0, x1, y1} or null, and a drag {x, y, cx, cy, moved} or null. */
export function drawPrompts(context, points, box, dragging, sx, sy) {
  if (box) {
    context.strokeStyle = PROMPT_COLORS.box;
    context.lineWidth = 2;
    context.strokeRect(box.x0 * sx, box.y0 * sy, (box.x1 - box.x0) * sx, (box.y1 - box.y0) * sy);
  }
  if (dragging?.moved) {
    context.setLineDash([5, 4]);
    context.strokeStyle = PROMPT_COLORS.box;
    context.strokeRect(dragging.x * sx, dragging.y * sy, (dragging.cx - dragging.x) * sx, (dragging.cy - dragging.y) * sy);
    context.setLineDash([]);
  }
  for (const p of points) {
    context.fillStyle = p.label ? PROMPT_COLORS.positive : PROMPT_COLORS.negative;
    context.beginPath();
    context.arc(p.x * sx, p.y * sy, 5, 0, 2 * Math.PI);
    context.fill();
    context.strokeStyle = "white";
    context.stroke();
  }
}
