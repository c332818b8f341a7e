// The Explain view's target box (detectors): dragged over the image on the overlay, in the image's pixels, with a
// label from the model's; what a request sends as `xai_parameters.target_box` (the response's box fields: fractions
// of the image). D-RISE then maps what supports a detection of that label there: a way to ask about a miss.

import { svg } from "./overlay.js";

const MIN_SIDE = 2; // pixels: a click is not a box

export class TargetBox {
  constructor(studio, overlay, labels) {
    const { $ } = studio;
    this.$ = $;
    this.overlay = overlay;
    this.box = null;
    $("xai-target").hidden = false;
    $("xai-target-label").replaceChildren(...labels.map((label) => new Option(label, label)));
    $("xai-target-label").addEventListener("change", () => this.box && (this.box.label = $("xai-target-label").value));
    $("xai-target-clear").addEventListener("click", () => this.clear());
    overlay.classList.add("drawable");
    overlay.addEventListener("pointerdown", (event) => this.start(event));
    overlay.addEventListener("pointermove", (event) => this.move(event));
    overlay.addEventListener("pointerup", (event) => this.end(event));
  }

  /** An event's position in the overlay's own units (the image's pixels), clamped to the image. */
  point(event) {
    const matrix = this.overlay.getScreenCTM();
    if (!matrix) return null;
    const p = new DOMPoint(event.clientX, event.clientY).matrixTransform(matrix.inverse());
    const { width, height } = this.overlay.viewBox.baseVal;
    return { x: Math.min(width, Math.max(0, p.x)), y: Math.min(height, Math.max(0, p.y)) };
  }

  start(event) {
    const p = this.point(event);
    if (!p) return;
    this.overlay.setPointerCapture?.(event.pointerId);
    this.from = p;
    this.draw(p, p);
  }

  move(event) {
    if (this.from) this.draw(this.from, this.point(event) || this.from);
  }

  end(event) {
    if (!this.from) return;
    const to = this.point(event) || this.from;
    const from = this.from;
    this.from = null;
    if (Math.abs(to.x - from.x) < MIN_SIDE || Math.abs(to.y - from.y) < MIN_SIDE) {
      this.clear();
      return;
    }
    const { width, height } = this.overlay.viewBox.baseVal;
    const round = (v) => Math.round(v * 10000) / 10000;
    this.box = {
      label: this.$("xai-target-label").value,
      topX: round(Math.min(from.x, to.x) / width), topY: round(Math.min(from.y, to.y) / height),
      bottomX: round(Math.max(from.x, to.x) / width), bottomY: round(Math.max(from.y, to.y) / height),
    };
    this.$("xai-target-box").textContent = `box ${this.box.topX}, ${this.box.topY} → ${this.box.bottomX}, ${this.box.bottomY} (fractions of the image)`;
    this.$("xai-target-clear").disabled = false;
  }

  draw(from, to) {
    this.overlay.querySelector("rect.target-box")?.remove();
    const { width, height } = this.overlay.viewBox.baseVal;
    const unit = Math.max(width, height) / 200;
    svg("rect", { class: "target-box", x: Math.min(from.x, to.x), y: Math.min(from.y, to.y),
      width: Math.abs(to.x - from.x), height: Math.abs(to.y - from.y), fill: "none", stroke: "#fd0",
      "stroke-width": unit, "stroke-dasharray": `${unit * 4} ${unit * 3}` }, this.overlay);
  }

  clear() {
    this.box = null;
    this.from = null;
    this.overlay.querySelector("rect.target-box")?.remove();
    this.$("xai-target-box").textContent = "no box drawn";
    this.$("xai-target-clear").disabled = true;
  }
}
