// The "Explain" view: an explanation entry (`model_explainability`, `xai_parameters` from a form built from
// /metadata) sent to POST /score. Classifiers: the heat map of its attributions blended over the image where the
// network looked (the center crop), and the 2x2 visualization the API returns. Detectors and instance
// segmentation (D-RISE): one map per explained detection, chosen in a list, drawn over the whole image with its
// box, and the API's picture of it; a box drawn over the image (and a label) is sent as `target_box`, to explain a
// miss. While it runs: the elapsed time and a cancel button (the request is aborted).

import { scoreBody } from "./api.js";
import { buildForm } from "./form.js";
import { reset, save, svg, toPng } from "./overlay.js";
import { TargetBox } from "./target.js";

const ASKED = ["visualizations", "attributions"]; // always asked for: the page shows both
const DETECTION_TASKS = ["image_object_detection", "image_instance_segmentation"];
// blue-green-yellow-white, as the API's own pictures colour their heat maps
const RAMP = [[0, [20, 20, 160]], [0.35, [0, 160, 110]], [0.7, [240, 220, 20]], [1, [255, 255, 255]]];

function rampColour(t) {
  for (let i = 1; i < RAMP.length; i += 1) {
    const [t1, c1] = RAMP[i];
    const [t0, c0] = RAMP[i - 1];
    if (t <= t1) return c0.map((v, k) => Math.round(v + ((c1[k] - v) * (t - t0)) / (t1 - t0)));
  }
  return RAMP[RAMP.length - 1][1];
}

/** [3][S][S] attributions → a PNG data URL of their heat (summed |attribution|, scaled by its 99.5th
 *  percentile, as explain/visualize.py does), transparent where the heat is low. */
export function heatPng(attributions) {
  const size = attributions[0].length;
  const magnitude = new Float64Array(size * size);
  for (const channel of attributions) {
    channel.forEach((row, y) => row.forEach((v, x) => { magnitude[y * size + x] += Math.abs(v); }));
  }
  const sorted = Float64Array.from(magnitude).sort();
  let top = sorted[Math.min(sorted.length - 1, Math.floor(0.995 * (sorted.length - 1)))];
  if (!(top > 0)) top = sorted[sorted.length - 1] || 1;
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = size;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(size, size);
  magnitude.forEach((m, i) => {
    const t = Math.min(1, m / top);
    const [r, g, b] = rampColour(t);
    pixels.data.set([r, g, b, Math.round(255 * (0.25 + 0.75 * t))], i * 4);
  });
  context.putImageData(pixels, 0, 0);
  return canvas.toDataURL("image/png");
}

/** [H][W] signed D-RISE saliency → a PNG data URL of its positive part (where seeing the pixel helps the
 *  detection), scaled by its 99.5th percentile as explain/visualize.py does, transparent where it is low. */
export function saliencyPng(map) {
  const height = map.length;
  const width = map[0].length;
  const positive = Float64Array.from(map.flat(), (v) => Math.max(0, v));
  const sorted = Float64Array.from(positive).sort();
  let top = sorted[Math.min(sorted.length - 1, Math.floor(0.995 * (sorted.length - 1)))];
  if (!(top > 0)) top = sorted[sorted.length - 1] || 1;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(width, height);
  positive.forEach((m, i) => {
    const t = Math.min(1, m / top);
    const [r, g, b] = rampColour(t);
    pixels.data.set([r, g, b, Math.round(255 * (0.1 + 0.9 * t))], i * 4);
  });
  context.putImageData(pixels, 0, 0);
  return canvas.toDataURL("image/png");
}

/** Where the network looked, in the image's pixels: the center crop after the shorter side is resized. */
export function cropRect(width, height, resize, crop) {
  const side = (crop * Math.min(width, height)) / resize;
  return { x: (width - side) / 2, y: (height - side) / 2, side };
}

export class ExplainView {
  constructor(studio) {
    this.studio = studio;
    const { $, meta } = studio;
    this.image = null;
    this.pending = null;
    this.answer = null;
    this.multilabel = meta.task === "image_classification_multilabel";
    this.detector = DETECTION_TASKS.includes(meta.task); // D-RISE: one map per explained detection
    this.target = this.detector ? new TargetBox(studio, $("xai-overlay"), meta.labels) : null;
    const fields = meta.xai_parameters.filter((f) => !ASKED.includes(f.name)
      && (this.multilabel || f.name !== "confidence_score_threshold_multilabel"));
    this.form = buildForm($("xai-fields"), fields, "xai");
    this.algorithm = meta.xai_parameters.find((f) => f.name === "xai_algorithm")?.default;
    $("xai-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.explain();
    });
    $("xai-cancel").addEventListener("click", () => this.pending?.abort());
    $("heat-opacity").addEventListener("input", () => this.opacity());
    $("xai-class").addEventListener("change", () => this.show());
    $("xai-download").addEventListener("click", () => this.download());
    $("explain-button").disabled = true;
  }

  setImage(image) {
    const { $ } = this.studio;
    this.pending?.abort();
    this.image = image;
    this.answer = null;
    $("explain-button").disabled = false;
    $("xai-download").disabled = true;
    reset($("xai-overlay"), image.width || 1, image.height || 1);
    this.target?.clear();
    $("xai-grid").removeAttribute("src");
    $("xai-figure").hidden = true;
    $("xai-status").textContent = this.detector ? "Press Explain: D-RISE maps the top detections."
      : "Choose an algorithm and press Explain.";
  }

  running(on) {
    const { $ } = this.studio;
    $("xai-progress").hidden = !on;
    $("xai-cancel").disabled = !on;
    $("explain-button").disabled = on;
    $("view-explain").setAttribute("aria-busy", String(on));
  }

  async explain() {
    const { $, api } = this.studio;
    if (!this.image) return;
    let xai;
    try {
      xai = { ...this.form.read(), visualizations: true, attributions: true };
      if (this.target?.box) xai.target_box = this.target.box;
    } catch (error) {
      this.studio.report(error);
      return;
    }
    const pending = (this.pending = new AbortController());
    const started = performance.now();
    const tick = setInterval(() => { $("xai-elapsed").textContent = `${((performance.now() - started) / 1000).toFixed(1)} s`; }, 100);
    this.studio.clearError();
    this.running(true);
    $("xai-status").textContent = `explaining with ${xai.xai_algorithm || this.algorithm}…`;
    const entry = JSON.stringify({ image_base64: this.image.b64, model_explainability: true, xai_parameters: xai });
    try {
      const { json, ms } = await api.call("score", { method: "POST", body: scoreBody([entry]), signal: pending.signal });
      const answer = Array.isArray(json) ? json[0] : undefined;
      if (!answer || answer.error) throw new Error(answer?.error?.message || "the answer holds no explanation");
      this.answer = { ...answer, threshold: xai.confidence_score_threshold_multilabel ?? 0.5 };
      $("xai-status").textContent = `explained in ${(ms / 1000).toFixed(1)} s`;
      this.listClasses();
      this.show();
    } catch (error) {
      if (error.name === "AbortError") {
        if (pending === this.pending) $("xai-status").textContent = `Cancelled after ${((performance.now() - started) / 1000).toFixed(1)} s.`;
      } else {
        $("xai-status").textContent = "The explanation failed.";
        this.studio.report(error);
      }
    } finally {
      clearInterval(tick);
      if (pending === this.pending) {
        this.pending = null;
        this.running(false);
      }
    }
  }

  /** What was explained, in the order of the answer's pictures: the top class, or (multilabel) every class at
   *  or over the threshold; for a detector, each explained box ("label 0.93", or "label (target box)"). */
  explained() {
    if (this.detector) {
      return this.answer.explained_boxes.map((b) => `${b.label} ${b.score === null ? "(target box)" : b.score.toFixed(2)}`);
    }
    const { probs, labels, threshold } = this.answer;
    if (!this.multilabel) return [labels[probs.indexOf(Math.max(...probs))]];
    return labels.filter((_, i) => probs[i] >= threshold);
  }

  listClasses() {
    const { $ } = this.studio;
    const select = $("xai-class");
    select.replaceChildren(...this.explained().map((label, i) => new Option(label, String(i))));
    $("xai-class-label").textContent = this.detector ? "Detection explained" : "Class explained";
    $("xai-class-row").hidden = !(this.multilabel || this.detector);
  }

  show() {
    const { $, meta } = this.studio;
    const answer = this.answer;
    const pick = (value) => (this.multilabel || this.detector ? value?.[Number($("xai-class").value || 0)] : value);
    const picture = pick(answer.visualizations);
    const attributions = pick(answer.attributions);
    const { width, height } = this.image;
    reset($("xai-overlay"), width || 1, height || 1);
    if (!picture) {
      $("xai-figure").hidden = true;
      $("xai-status").textContent = this.detector ? "The model detected nothing to explain: lower "
        + "detection_score_threshold, or draw a target box over the image where you expected one."
        : `No class has a probability of at least ${answer.threshold}: nothing to explain.`;
      return;
    }
    const what = this.explained()[Number($("xai-class").value || 0)];
    $("xai-grid").src = `data:image/png;base64,${picture}`;
    $("xai-grid").alt = this.detector ? `the API's D-RISE picture of ${what}` : `the API's 2x2 explanation of ${what}`;
    $("xai-caption").textContent = this.detector
      ? `The API's picture: the image with the box, and the D-RISE heat map over it (${answer.masks_used} masks).`
      : "The API's picture: the crop, the attribution, the two blended, the top 30 % pixels.";
    $("xai-figure").hidden = false;
    if (attributions && width && this.detector) {
      this.drawDetection(attributions, this.answer.explained_boxes[Number($("xai-class").value || 0)].box);
    } else if (attributions && width) {
      const { x, y, side } = cropRect(width, height, meta.settings.valid_resize_size, meta.settings.valid_crop_size);
      svg("image", { class: "heat", href: heatPng(attributions), x, y, width: side, height: side, preserveAspectRatio: "none" }, $("xai-overlay"));
      svg("rect", { x, y, width: side, height: side, fill: "none", stroke: "#fff", "stroke-width": side / 200, "stroke-dasharray": `${side / 50} ${side / 70}` }, $("xai-overlay"));
      $("xai-download").disabled = false;
      this.opacity();
    }
  }

  /** One detection's map stretched over the whole image (the map is the image as the model scored it), and its box. */
  drawDetection(map, box) {
    const { $ } = this.studio;
    const { width, height } = this.image;
    svg("image", { class: "heat", href: saliencyPng(map), x: 0, y: 0, width, height, preserveAspectRatio: "none" }, $("xai-overlay"));
    svg("rect", { class: "explained-box", x: box.topX * width, y: box.topY * height, width: (box.bottomX - box.topX) * width,
      height: (box.bottomY - box.topY) * height, fill: "none", stroke: "#f33", "stroke-width": Math.max(width, height) / 200 }, $("xai-overlay"));
    $("xai-download").disabled = false;
    this.opacity();
  }

  opacity() {
    const { $ } = this.studio;
    const value = Number($("heat-opacity").value);
    $("heat-opacity-value").textContent = value.toFixed(2);
    $("xai-overlay").querySelectorAll(".heat").forEach((node) => node.setAttribute("opacity", value));
  }

  async download() {
    const { $ } = this.studio;
    try {
      save(await toPng(this.image.element, [$("xai-overlay")]), this.image.name, "explained");
    } catch (error) {
      this.studio.report(error);
    }
  }
}
