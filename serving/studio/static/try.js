// The "Try" view: the image scored with POST /score (the cloud's input_data schema) and the model's
// per-request settings from the form; the answer drawn over the image (boxes, polygons, tiles) or as bars;
// a confidence slider that filters what is drawn without a new request; latency, raw JSON, PNG download.
// On the hub the model is chosen on the page: `useModel` swaps the model's description and the route it scores on.

import { scoreBody } from "./api.js";
import { buildForm } from "./form.js";
import { drawBars, drawBoxes, drawCaption, filter, parseGrid, reset, save, toPng } from "./overlay.js";

export class TryView {
  /** studio: {api, $, report(error), clearError()}; meta: what `/metadata` answers (none yet: `useModel` later);
   *  path: the route that scores. */
  constructor(studio, meta = null, path = "score") {
    this.studio = studio;
    const { $ } = studio;
    this.image = null; // {b64, url, width, height, name, element}
    this.pending = null; // the AbortController of the call in flight
    this.meta = null;
    this.form = null;
    $("settings").addEventListener("submit", (event) => {
      event.preventDefault();
      this.score();
    });
    $("settings-reset").addEventListener("click", () => this.form?.reset());
    $("confidence").addEventListener("input", () => this.applyFilter());
    $("download").addEventListener("click", () => this.download());
    $("score-button").disabled = true;
    if (meta) this.useModel(meta, path);
  }

  /** The model to score with: its settings form built from `meta.parameters`; the image (if any) scored again. */
  useModel(meta, path = "score") {
    const { $ } = this.studio;
    this.pending?.abort();
    this.meta = meta;
    this.path = path;
    this.classifier = meta.task.startsWith("image_classification");
    $("settings-fields").replaceChildren();
    this.form = buildForm($("settings-fields"), meta.parameters, "param");
    if (this.image) this.setImage(this.image);
  }

  /** No model to score with (the hub has none ready). */
  noModel() {
    this.pending?.abort();
    this.meta = null;
    this.form = null;
    this.studio.$("settings-fields").replaceChildren();
    this.studio.$("score-button").disabled = true;
  }

  /** A new image: shown, then scored. */
  setImage(image) {
    const { $ } = this.studio;
    this.image = image;
    $("score-button").disabled = !this.meta;
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
    if (!this.image || !this.meta) return;
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
      const { json, ms } = await api.call(this.path, { method: "POST", body: scoreBody([image.b64], params), signal: pending.signal });
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
    const { $ } = this.studio;
    const meta = this.meta;
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
