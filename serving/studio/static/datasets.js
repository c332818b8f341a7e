// The hub's "Datasets" view: the registered datasets (`GET /computervision/datasets`); the chosen one's images in a
// grid with their annotations drawn (boxes, or the category of a classified image), counts per category, and the
// problems its files have now, each with its annotation or image id (GET /datasets/{name}/contents). Images come
// from GET /datasets/{name}/images/{index}, fetched with the key and shown as blob: URLs.

import { listAll, nameRow } from "./models.js";
import { colour, svg } from "./overlay.js";

const PAGE = 24;

function cell(row, text, className = "") {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

/** The annotations of one image over it: a `g.ann` each (a box with its category, or the category as a caption). */
export function drawAnnotations(root, image, labels) {
  const width = image.width || 100, height = image.height || 75;
  root.replaceChildren();
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const unit = Math.max(width, height);
  const font = unit / 12, line = unit / 120;
  for (const ann of image.annotations) {
    const stroke = colour(ann.category, labels);
    const group = svg("g", { class: "ann", "data-category": ann.category }, root);
    svg("title", {}, group).textContent = ann.category + (ann.crowd ? " (crowd)" : "");
    let x = 0, y = 0;
    if (ann.box) {
      const [x0, y0, x1, y1] = ann.box;
      x = x0 * width;
      y = y0 * height;
      svg("rect", { class: "box", x, y, width: (x1 - x0) * width, height: (y1 - y0) * height, fill: "none", stroke,
                    "stroke-width": line * 2, "stroke-dasharray": ann.crowd ? `${line * 4} ${line * 3}` : "none" }, group);
    }
    const ty = ann.box ? (y > font * 1.3 ? y - font * 0.3 : y + font * 1.05) : font * 1.1;
    svg("rect", { x, y: ty - font, width: ann.category.length * font * 0.6 + font * 0.4, height: font * 1.25, fill: stroke, opacity: 0.85 }, group);
    svg("text", { x: x + font * 0.2, y: ty, fill: "#000", "font-size": font, "font-family": "sans-serif" }, group).textContent = ann.category;
  }
}

export class DatasetsView {
  constructor(studio) {
    this.studio = studio;
    this.selected = null;
    this.skip = 0;
    this.urls = [];
    this.turn = 0;
    const { $ } = studio;
    $("datasets-refresh").addEventListener("click", () => this.refresh());
    $("grid-prev").addEventListener("click", () => this.show(this.selected, Math.max(0, this.skip - PAGE)));
    $("grid-next").addEventListener("click", () => this.show(this.selected, this.skip + PAGE));
  }

  async refresh() {
    const { $ } = this.studio;
    let datasets;
    try {
      datasets = await listAll(this.studio.api, "computervision/datasets");
    } catch (error) {
      this.studio.report(error);
      return;
    }
    const body = $("datasets-table").tBodies[0];
    body.replaceChildren();
    for (const dataset of datasets) {
      const row = nameRow(body, dataset.name, this.selected, () => this.show(dataset.name, 0, true));
      cell(row, dataset.annotationKind === "imageObjectDetection" ? "detection" : "classification");
      cell(row, String(dataset.annotationFileUris.length), "num");
    }
    $("datasets-empty").hidden = datasets.length > 0;
  }

  async show(name, skip, focus = false) {
    const { $, api } = this.studio;
    const turn = ++this.turn;
    this.selected = name;
    this.skip = skip;
    for (const button of $("datasets-table").querySelectorAll("button.link")) {
      button.setAttribute("aria-pressed", String(button.textContent === name));
    }
    $("dataset-detail").hidden = false;
    $("dataset-title").textContent = name;
    $("dataset-summary").textContent = "reading the dataset's files…";
    $("dataset-grid").dataset.ready = "false";
    if (focus) $("dataset-title").focus();
    let contents;
    try {
      contents = (await api.call(`datasets/${encodeURIComponent(name)}/contents?skip=${skip}&top=${PAGE}`)).json;
    } catch (error) {
      if (turn !== this.turn) return;
      $("dataset-summary").textContent = "The dataset could not be read.";
      this.studio.report(error);
      return;
    }
    if (turn !== this.turn) return;
    this.summary(contents);
    this.problems(contents.problems);
    this.counts(contents);
    this.grid(contents, turn);
  }

  summary(contents) {
    const { $ } = this.studio;
    const { total } = contents.images;
    const kind = contents.annotationKind === "imageObjectDetection" ? "boxes" : "classified images";
    const count = `${contents.problems.length} problem${contents.problems.length === 1 ? "" : "s"}`;
    if (!contents.valid && !total) {
      $("dataset-summary").textContent = `${count} in its annotation files: its images can be shown once they are fixed; `
        + "a training from it would fail (datasetCorrupt).";
    } else {
      const state = contents.valid ? "its files pass every check" : `${count}: a training from it would fail (datasetCorrupt)`;
      $("dataset-summary").textContent = `${total} images · ${contents.annotations} ${kind} · ${contents.labels.length} categories · ${state}`;
    }
    $("dataset-summary").dataset.valid = String(contents.valid);
    const last = Math.min(total, contents.images.skip + contents.images.value.length);
    $("grid-page").textContent = total ? `images ${contents.images.skip + 1}–${last} of ${total}` : "";
    $("grid-prev").disabled = contents.images.skip === 0;
    $("grid-next").disabled = last >= total;
    $("grid-page").parentElement.hidden = !total;
    $("dataset-counts").hidden = !Object.keys(contents.counts).length;
  }

  problems(problems) {
    const { $ } = this.studio;
    $("dataset-problems").hidden = !problems.length;
    const body = $("problems-table").tBodies[0];
    body.replaceChildren();
    for (const problem of problems) {
      const row = body.insertRow();
      cell(row, problem.annotationId ?? "–", "num");
      cell(row, problem.imageId ?? "–", "num");
      cell(row, problem.message, "message");
    }
  }

  counts(contents) {
    const { $ } = this.studio;
    $("counts-unit").textContent = contents.annotationKind === "imageObjectDetection" ? "Boxes" : "Images";
    const body = $("dataset-counts").tBodies[0];
    body.replaceChildren();
    for (const [label, count] of Object.entries(contents.counts)) {
      const row = body.insertRow();
      const name = cell(row, label);
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = colour(label, contents.labels);
      name.prepend(swatch);
      cell(row, String(count), "num");
    }
  }

  grid(contents, turn) {
    const { $ } = this.studio;
    for (const url of this.urls) URL.revokeObjectURL(url);
    this.urls = [];
    const grid = $("dataset-grid");
    grid.replaceChildren();
    const loads = contents.images.value.map((image) => {
      const item = document.createElement("li");
      item.className = "thumb-card";
      item.dataset.index = String(image.index);
      const stage = document.createElement("div");
      stage.className = "thumb";
      stage.style.setProperty("--ratio", image.width && image.height ? String(image.width / image.height) : "1.333");
      const picture = document.createElement("img");
      picture.alt = `image ${image.id} of ${image.file}: ${image.annotations.map((a) => a.category).join(", ") || "no annotation"}`;
      const overlay = svg("svg", { class: "overlay", preserveAspectRatio: "none", "aria-hidden": "true" });
      drawAnnotations(overlay, image, contents.labels);
      stage.append(picture, overlay);
      const caption = document.createElement("p");
      caption.className = "thumb-caption";
      caption.textContent = `#${image.id} ${image.name} · ${image.annotations.length} annotation${image.annotations.length === 1 ? "" : "s"}`;
      item.append(stage, caption);
      grid.append(item);
      return this.load(contents.name, image, picture, caption, turn);
    });
    Promise.allSettled(loads).then(() => {
      if (turn === this.turn) grid.dataset.ready = "true";
    });
  }

  async load(name, image, picture, caption, turn) {
    try {
      const blob = await this.studio.api.blob(`datasets/${encodeURIComponent(name)}/images/${image.index}`);
      if (turn !== this.turn) return;
      const url = URL.createObjectURL(blob);
      this.urls.push(url);
      picture.src = url;
      await picture.decode();
    } catch (error) {
      if (turn !== this.turn) return;
      picture.closest(".thumb").classList.add("broken");
      caption.textContent += ` · cannot be shown: ${error.message}`;
      if (error.status === 401) this.studio.report(error);
    }
  }
}
