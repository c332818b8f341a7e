// The hub's "Models" view: the models of the API (`GET /computervision/models`) with kind, status, budget and cost;
// the chosen one's progress and validation metric per epoch (GET /models/{name}/progress, from MLflow) redrawn
// while it trains, its modelPerformance and per-tag table once done; cancel and delete; the "train a model" form
// (PUT /computervision/models/{name}).

import { describe, drawChart } from "./chart.js";

export const VERSION = "api-version=2023-10-01";
const ACTIVE = ["notStarted", "training", "cancelling"];
const POLL_MS = 2000;

/** Every record of a paged API listing (`value`, `nextLink`), 30 at a time. */
export async function listAll(api, path) {
  const out = [];
  for (let skip = 0; skip < 10_000; skip += 30) {
    const { json } = await api.call(`${path}?${VERSION}&top=30&skip=${skip}`);
    out.push(...json.value);
    if (!json.nextLink) break;
  }
  return out;
}

/** A listing's row for `name`: its first cell a button that calls `choose`, pressed when `name` is `selected`. */
export function nameRow(body, name, selected, choose) {
  const row = body.insertRow();
  row.dataset.name = name;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "link";
  button.textContent = name;
  button.setAttribute("aria-pressed", String(name === selected));
  button.addEventListener("click", choose);
  row.insertCell().append(button);
  return row;
}

function cell(row, text, className = "") {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function number(value, digits = 3) {
  return typeof value === "number" ? String(Number(value.toFixed(digits))) : "–";
}

export class ModelsView {
  /** changed(): called when a model became ready or went away (the model picker lists them). */
  constructor(studio, { changed }) {
    this.studio = studio;
    this.changed = changed;
    this.records = [];
    this.selected = null;
    this.timer = null;
    this.loading = null;
    this.drawn = null; // [trials, metric, width] of the chart on screen
    const { $ } = studio;
    // redrawn in the next frame, not in the observer's callback (a size changed there is a loop error)
    new ResizeObserver(() => requestAnimationFrame(() => this.redraw())).observe($("model-chart-figure"));
    $("models-refresh").addEventListener("click", () => this.refresh());
    $("train-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.train();
    });
    $("train-dataset").addEventListener("change", () => this.kindFromDataset());
    $("model-cancel").addEventListener("click", () => this.cancel());
    $("model-delete").addEventListener("click", () => this.remove());
  }

  /** The list, the datasets for the form and the chosen model again; polled while anything trains. */
  refresh() {
    if (!this.loading) this.loading = this.load().finally(() => { this.loading = null; });
    return this.loading;
  }

  async load() {
    const { api } = this.studio;
    clearTimeout(this.timer);
    let records, datasets;
    try {
      [records, datasets] = await Promise.all([listAll(api, "computervision/models"), listAll(api, "computervision/datasets")]);
    } catch (error) {
      this.studio.report(error);
      return;
    }
    const before = this.records.map((r) => `${r.name}:${r.status}`).join(" ");
    this.records = records;
    this.renderList();
    this.renderDatasets(datasets);
    if (this.selected) await this.detail();
    if (before !== records.map((r) => `${r.name}:${r.status}`).join(" ")) this.changed();
    if (records.some((r) => ACTIVE.includes(r.status))) this.timer = setTimeout(() => this.refresh(), POLL_MS);
  }

  renderList() {
    const { $ } = this.studio;
    const body = $("models-table").tBodies[0];
    body.replaceChildren();
    for (const record of this.records) {
      const row = nameRow(body, record.name, this.selected, () => this.select(record.name));
      const params = record.trainingParameters || {};
      cell(row, params.modelKind || "–", "col-kind");
      cell(row, record.status, `status status-${record.status}`);
      cell(row, number(params.timeBudgetInHours, 4), "num");
      cell(row, number(record.trainingCostInMinutes, 2), "num");
    }
    $("models-empty").hidden = this.records.length > 0;
  }

  renderDatasets(datasets) {
    const { $ } = this.studio;
    const select = $("train-dataset");
    const before = select.value;
    select.replaceChildren(...datasets.map((d) => {
      const option = new Option(`${d.name} (${d.annotationKind})`, d.name);
      option.dataset.kind = d.annotationKind;
      return option;
    }));
    if (datasets.some((d) => d.name === before)) select.value = before;
    $("train-button").disabled = !datasets.length;
    if (!datasets.length) $("train-status").textContent = "Register a dataset first (the Datasets tab lists them).";
  }

  kindFromDataset() {
    const { $ } = this.studio;
    const kind = $("train-dataset").selectedOptions[0]?.dataset.kind;
    $("train-kind-hint").textContent = kind
      ? `the dataset's kind is ${kind === "imageObjectDetection" ? "Generic-Detector" : "Generic-Classifier"}; the hub picks the architecture`
      : "the hub picks the architecture and its settings";
  }

  async select(name) {
    const { $ } = this.studio;
    this.selected = name;
    this.renderList();
    $("model-detail").hidden = false;
    $("model-title").textContent = name;
    await this.detail();
    $("model-title").focus();
  }

  async detail() {
    const { $, api } = this.studio;
    const name = this.selected;
    let record, progress;
    try {
      [record, progress] = await Promise.all([
        api.call(`computervision/models/${encodeURIComponent(name)}?${VERSION}`).then((r) => r.json),
        api.call(`models/${encodeURIComponent(name)}/progress`).then((r) => r.json),
      ]);
    } catch (error) {
      if (name !== this.selected) return;
      if (error.status === 404) {
        this.selected = null;
        $("model-detail").hidden = true;
      }
      this.studio.report(error);
      return;
    }
    if (name !== this.selected) return;
    const own = Boolean(record.createdDateTime); // trained here, not only registered in MLflow
    const trials = progress.trials;
    const epochs = trials.reduce((n, t) => n + t.points.length, 0);
    const status = {
      notStarted: "waiting to start", training: `training: ${trials.length} trial${trials.length === 1 ? "" : "s"}, ${epochs} epoch${epochs === 1 ? "" : "s"} evaluated`,
      cancelling: "cancelling", cancelled: "cancelled", failed: "failed", succeeded: "succeeded",
    }[record.status] || record.status;
    const error = record.error ? ` (${record.error.code}): ${record.error.message}` : "";
    const cost = typeof record.trainingCostInMinutes === "number" ? ` · ${number(record.trainingCostInMinutes, 2)} min spent` : "";
    const params = record.trainingParameters || {};
    const budget = params.timeBudgetInHours ? ` of ${params.timeBudgetInHours} h` : "";
    const from = params.trainingDatasetName ? ` on ${params.trainingDatasetName}` : "";
    $("model-status").textContent = `${params.modelKind || "model"}${from}: ${status}${error}${cost}${cost && budget}`;
    $("model-status").dataset.status = record.status;
    $("model-message").textContent = ACTIVE.includes(record.status) && progress.message ? progress.message : "";
    $("model-cancel").disabled = !own || !["notStarted", "training"].includes(record.status);
    $("model-delete").disabled = !own || ACTIVE.includes(record.status);
    drawChart($("model-chart"), trials, progress.metric);
    this.drawn = [trials, progress.metric, $("model-chart").getBoundingClientRect().width];
    $("model-chart").dataset.points = String(epochs);
    $("model-chart-caption").textContent = own
      ? `${describe(trials, progress.metric)} Validation on the held-out images, from MLflow (experiment visionserve-hub).`
      : "Registered in MLflow outside the hub: no hub training to chart.";
    this.performance(record.modelPerformance);
  }

  /** The chart drawn again for its new width (a phone turned, a window resized): its text stays legible. */
  redraw() {
    const chart = this.studio.$("model-chart");
    const width = chart.getBoundingClientRect().width;
    if (!this.drawn || !width || Math.abs(width - this.drawn[2]) < 1) return;
    drawChart(chart, this.drawn[0], this.drawn[1]);
    this.drawn[2] = width;
  }

  performance(performance) {
    const { $ } = this.studio;
    const table = $("model-performance");
    const tags = $("model-tags");
    table.hidden = tags.hidden = !performance;
    if (!performance) return;
    table.tBodies[0].replaceChildren();
    for (const [key, value] of Object.entries(performance)) {
      if (key === "tagPerformance") continue;
      const row = table.tBodies[0].insertRow();
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = key;
      row.append(th);
      cell(row, number(value, 4), "num");
    }
    const perTag = performance.tagPerformance || {};
    const columns = [...new Set(Object.values(perTag).flatMap((v) => Object.keys(v)))];
    tags.tHead.replaceChildren();
    const head = tags.tHead.insertRow();
    for (const name of ["tag", ...columns]) {
      const th = document.createElement("th");
      th.scope = "col";
      th.textContent = name;
      if (name !== "tag") th.className = "num";
      head.append(th);
    }
    tags.tBodies[0].replaceChildren();
    for (const [tag, values] of Object.entries(perTag)) {
      const row = tags.tBodies[0].insertRow();
      cell(row, tag);
      for (const column of columns) cell(row, number(values[column], 4), "num");
    }
  }

  async train() {
    const { $, api } = this.studio;
    const name = $("train-name").value.trim();
    const parameters = { trainingDatasetName: $("train-dataset").value, timeBudgetInHours: Number($("train-budget").value) };
    if ($("train-kind").value) parameters.modelKind = $("train-kind").value;
    $("train-button").disabled = true;
    $("train-status").textContent = `asking the hub to train ${name}…`;
    this.studio.clearError();
    try {
      await api.call(`computervision/models/${encodeURIComponent(name)}?${VERSION}`, {
        method: "PUT", body: { trainingParameters: parameters },
      });
      $("train-status").textContent = `The training of ${name} started.`;
      $("train-name").value = "";
      await this.refresh();
      await this.select(name);
    } catch (error) {
      $("train-status").textContent = `The hub refused to train ${name}.`;
      this.studio.report(error);
    } finally {
      $("train-button").disabled = false;
    }
  }

  async cancel() {
    const { api } = this.studio;
    try {
      await api.call(`computervision/models/${encodeURIComponent(this.selected)}:cancel?${VERSION}`, { method: "POST" });
    } catch (error) {
      this.studio.report(error);
    }
    await this.refresh();
  }

  async remove() {
    const { $, api } = this.studio;
    const name = this.selected;
    if (!window.confirm(`Delete model ${name}? Its registered MLflow model goes too.`)) return;
    try {
      await api.call(`computervision/models/${encodeURIComponent(name)}?${VERSION}`, { method: "DELETE" });
      this.selected = null;
      $("model-detail").hidden = true;
      this.changed();
    } catch (error) {
      this.studio.report(error);
    }
    await this.refresh();
  }
}
