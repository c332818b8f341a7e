// The "Try" view: the image scored with POST /score (the cloud's input_data schema) and the model's
// per-request settings from the form; the answer drawn over the image (boxes, polygons, tiles) or as bars;
// a confidence slider that filters what is drawn without a new request; latency, raw JSON, PNG download.

import { scoreBody } from "./api.js";
import { buildForm } from "./form.js";
import { drawBars, drawBoxes, drawCaption, filter, parseGrid, reset, save, toPng } from "./overlay.js";

export class TryView {
  /** studio: {api, meta, $, report(error), clearError(), status(text)} */
  constructor(studio) {
    this.studio = studio;
    const { $, meta } = studio;
    this.image = null; // {b64, url, width, height, name, element}
    this.pending = null; // the AbortController of the call in flight
    this.classifier = meta.task.startsWith("image_classification");
    this.form = buildForm($("settings-fields"), meta.parameters, "param");
    $("settings").addEventListener("submit", (event) => {
      event.preventDefault();
      this.score();
    });
    $("settings-reset").addEventListener("click", () => this.form.reset());
    $("confidence").addEventListener("input", () => this.applyFilter());
    $("download").addEventListener("click", () => this.download());
    $("score-button").disabled = true;
  }

  /** A new image: shown, then scored. */
  setImage(image) {
    const { $ } = this.studio;
    this.image = image;
    $("score-button").disabled = false;
    $("download").disabled = true;
    reset($("overlay"), image.width || 1, image.height || 1);
    $("bars").replaceChildren();
    $("raw-json").textContent = "";
    $("latency").textContent = "–";
    $("summary").textContent = "";
    this.score();
  }

  async score() {
    const { $, api } = this.studio;
    if (!this.image) return;
    let params;
    try {
      params = this.form.read();
    } catch (error) {
      this.studio.report(error);
      return;
    }
    this.pending?.abort();
    const pending = (this.pending = new AbortController());
    const image = this.image;
    this.studio.clearError();
    $("view-try").setAttribute("aria-busy", "true");
    $("summary").textContent = "scoring…";
    try {
      const { json, ms } = await api.call("score", { method: "POST", body: scoreBody([image.b64], params), signal: pending.signal });
      if (pending !== this.pending) return;
      $("latency").textContent = `${Math.round(ms)} ms`;
      $("raw-json").textContent = JSON.stringify(json, null, 2);
      const answer = Array.isArray(json) ? json[0] : undefined;
      if (!answer || answer.error) {
        this.studio.report(new Error(answer?.error?.message || "the answer holds no result for the image"));
        $("summary").textContent = "";
        return;
      }
      this.render(answer, params);
    } catch (error) {
      if (error.name === "AbortError") return;
      if (pending === this.pending) {
        $("summary").textContent = "";
        $("raw-json").textContent = error.body ? JSON.stringify(error.body, null, 2) : "";
      }
      this.studio.report(error);
    } finally {
      if (pending === this.pending) {
        this.pending = null;
        $("view-try").setAttribute("aria-busy", "false");
      }
    }
  }

  render(answer, params) {
    const { $, meta } = this.studio;
    const { width, height } = this.image;
    if (this.classifier) {
      const top = answer.probs.indexOf(Math.max(...answer.probs));
      drawCaption($("overlay"), `${answer.labels[top]} ${answer.probs[top].toFixed(2)}`, width || 1, height || 1);
      drawBars($("bars"), answer, meta.labels);
    } else {
      $("bars").replaceChildren();
      const gridText = "tile_grid_size" in params ? params.tile_grid_size : meta.settings.tile_grid_size;
      const overlap = params.tile_overlap_ratio ?? meta.settings.tile_overlap_ratio ?? 0;
      if (width) drawBoxes($("overlay"), answer, { width, height, labels: meta.labels, grid: parseGrid(gridText), overlap });
    }
    $("download").disabled = !width;
    this.applyFilter();
  }

  applyFilter() {
    const { $ } = this.studio;
    const threshold = Number($("confidence").value);
    $("confidence-value").textContent = threshold.toFixed(2);
    const { shown, total } = filter([$("overlay"), $("bars")], threshold);
    if (!$("raw-json").textContent) return;
    const noun = this.classifier ? "classes" : "boxes";
    $("summary").textContent = `${shown} of ${total} ${noun} shown (confidence ≥ ${threshold.toFixed(2)})`;
  }

  async download() {
    const { $ } = this.studio;
    try {
      save(await toPng(this.image.element, [$("overlay")]), this.image.name, "scored");
    } catch (error) {
      this.studio.report(error);
    }
  }
}
