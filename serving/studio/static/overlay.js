// What the page draws over an image: detection boxes and instance polygons with label and score, the tile
// grid of a tiled request, class probability bars; the confidence filter; the drawn image as a PNG.
// Everything drawn in SVG is styled by attributes (not CSS), so that the SVG renders the same on its own.

const SVG = "http://www.w3.org/2000/svg";
const GRID = /^\s*\(?\s*(\d+)\s*(?:[xX,]|\s)\s*(\d+)\s*\)?\s*$/;

export function svg(tag, attrs = {}, parent = undefined) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (parent) parent.append(node);
  return node;
}

/** A colour per label, the same for a label wherever it is drawn. */
export function colour(label, labels) {
  const index = Math.max(0, labels.indexOf(label));
  return `hsl(${(index * 137.5 + 20) % 360} 85% 55%)`;
}

/** `"3x2"`, `"(3, 2)"` → [3, 2]; anything else → null (the server says what is wrong with it). */
export function parseGrid(text) {
  const match = GRID.exec(String(text ?? ""));
  return match ? [Number(match[1]), Number(match[2])] : null;
}

function spans(length, count, overlap) {
  const side = length / (count - (count - 1) * overlap);
  const stride = side * (1 - overlap);
  return Array.from({ length: count }, (_, i) => (i === count - 1 ? [length - side, length] : [i * stride, i * stride + side]));
}

/** The tiles of a cols x rows grid over a width x height image (models/tasks/tiling.py's geometry). */
export function tiles([cols, rows], overlap, width, height) {
  const out = [];
  for (const [y0, y1] of spans(height, rows, overlap)) {
    for (const [x0, x1] of spans(width, cols, overlap)) out.push({ x0, y0, x1, y1 });
  }
  return out;
}

/** Sets the SVG's coordinates to the image's pixels and empties it. */
export function reset(root, width, height) {
  root.replaceChildren();
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  root.setAttribute("width", width);
  root.setAttribute("height", height);
}

/** Boxes (and polygons) of a detection or segmentation answer, each a `g.det` with its score; the tiles. */
export function drawBoxes(root, answer, { width, height, labels, grid = null, overlap = 0 }) {
  reset(root, width, height);
  const unit = Math.max(width, height);
  const font = unit / 30; // sizes follow the image's, so the downloaded PNG looks as the page does
  const line = unit / 300;
  if (grid) {
    const layer = svg("g", { class: "tiles", fill: "none", stroke: "#fff", "stroke-width": line, "stroke-dasharray": `${4 * line} ${3 * line}`, opacity: 0.8 }, root);
    for (const t of tiles(grid, overlap, width, height)) {
      svg("rect", { class: "tile", x: t.x0, y: t.y0, width: t.x1 - t.x0, height: t.y1 - t.y0 }, layer);
    }
  }
  for (const [i, item] of (answer.boxes || []).entries()) {
    const { topX, topY, bottomX, bottomY } = item.box;
    const stroke = colour(item.label, labels);
    const group = svg("g", { class: "det", "data-score": item.score, "data-label": item.label, "data-index": i }, root);
    svg("title", {}, group).textContent = `${item.label} ${item.score.toFixed(3)}`;
    for (const polygon of item.polygon || []) {
      const points = [];
      for (let k = 0; k + 1 < polygon.length; k += 2) points.push(`${polygon[k] * width},${polygon[k + 1] * height}`);
      svg("polygon", { class: "mask", points: points.join(" "), fill: stroke, "fill-opacity": 0.35, stroke, "stroke-width": line }, group);
    }
    const x = topX * width, y = topY * height;
    svg("rect", { class: "box", x, y, width: (bottomX - topX) * width, height: (bottomY - topY) * height, fill: "none", stroke, "stroke-width": line * 2 }, group);
    const text = `${item.label} ${item.score.toFixed(2)}`;
    const ty = y > font * 1.3 ? y - font * 0.3 : y + font * 1.05;
    svg("rect", { x, y: ty - font, width: text.length * font * 0.6 + font * 0.4, height: font * 1.25, fill: stroke, opacity: 0.85 }, group);
    const label = svg("text", { x: x + font * 0.2, y: ty, fill: "#000", "font-size": font, "font-family": "sans-serif" }, group);
    label.textContent = text;
  }
}

/** A line of text at the image's top left (a classifier's top class), kept when the image is downloaded. */
export function drawCaption(root, text, width, height) {
  reset(root, width, height);
  const font = Math.max(width, height) / 20;
  svg("rect", { x: 0, y: 0, width: text.length * font * 0.6 + font * 0.6, height: font * 1.5, fill: "#000", opacity: 0.6 }, root);
  svg("text", { x: font * 0.3, y: font * 1.1, fill: "#fff", "font-size": font, "font-family": "sans-serif" }, root).textContent = text;
}

/** Class probability bars, highest first, each an `li.bar` with its score. */
export function drawBars(list, answer, labels) {
  list.replaceChildren();
  const ranked = answer.labels.map((label, i) => ({ label, p: answer.probs[i] })).sort((a, b) => b.p - a.p);
  for (const { label, p } of ranked) {
    const item = document.createElement("li");
    item.className = "bar";
    item.dataset.score = String(p);
    item.dataset.label = label;
    const name = document.createElement("span");
    name.className = "bar-label";
    name.textContent = label;
    const track = document.createElement("span");
    track.className = "bar-track";
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.width = `${(p * 100).toFixed(1)}%`;
    fill.style.background = colour(label, labels);
    track.append(fill);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = `${(p * 100).toFixed(1)}%`;
    item.append(name, track, value);
    list.append(item);
  }
}

/** Hides what scored under `threshold` (no new request); → {shown, total}. */
export function filter(roots, threshold) {
  let shown = 0, total = 0;
  for (const root of roots) {
    for (const node of root.querySelectorAll("[data-score]")) {
      const keep = Number(node.dataset.score) >= threshold;
      total += 1;
      shown += keep ? 1 : 0;
      if (node instanceof SVGElement) {
        if (keep) node.removeAttribute("display");
        else node.setAttribute("display", "none");
      } else {
        node.hidden = !keep;
      }
    }
  }
  return { shown, total };
}

function loaded(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the drawing could not be rendered"));
    image.src = url;
  });
}

/** The image with the SVG layers drawn on it, at the image's own size, as a PNG Blob. */
export async function toPng(image, layers) {
  const canvas = document.createElement("canvas");
  canvas.width = image.naturalWidth;
  canvas.height = image.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0);
  for (const layer of layers) {
    const copy = layer.cloneNode(true);
    copy.querySelectorAll("[display=none]").forEach((node) => node.remove());
    copy.setAttribute("xmlns", SVG);
    const text = new XMLSerializer().serializeToString(copy);
    const drawn = await loaded(`data:image/svg+xml;charset=utf-8,${encodeURIComponent(text)}`);
    context.drawImage(drawn, 0, 0, canvas.width, canvas.height);
  }
  return new Promise((resolve, reject) => canvas.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("the PNG could not be made"))), "image/png"));
}

/** Offers `blob` for download as `<name without extension>-<suffix>.png`. */
export function save(blob, name, suffix) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${String(name || "image").replace(/\.[^.]*$/, "") || "image"}-${suffix}.png`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}
