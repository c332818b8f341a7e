// A line chart of a training's validation metric per epoch, one line per trial, drawn as inline SVG: the axes,
// a point per evaluated epoch (`circle.point`, with its epoch and value), a legend. No library.

import { svg } from "./overlay.js";

const DEFAULT_WIDTH = 640; // the drawing's width when the chart is not on screen; else its width there (text stays legible)
const PLOT_HEIGHT = 220;
const MARGIN = { left: 48, right: 16, top: 14, bottom: 40 };
const LEGEND_ROW = 20;

/** A colour per trial. */
export function trialColour(index) {
  return `hsl(${(index * 137.5 + 210) % 360} 70% 45%)`;
}

function niceStep(span, most) {
  const raw = span / most;
  const power = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((k) => k * power).find((s) => s >= raw) || raw;
}

function trialName(trial, i) {
  const frozen = trial.frozenLayers && trial.frozenLayers !== "0" ? ", frozen" : "";
  return `trial ${i}: ${trial.architecture || trial.name}${frozen}`;
}

/** What the chart shows, in words (the chart's accessible description). */
export function describe(trials, metric) {
  if (!trials.some((t) => t.points.length)) return `${metric} per epoch: no epoch evaluated yet.`;
  return `${metric} per epoch. ` + trials.map((t, i) => `${trialName(t, i)}: ${t.points.length} epoch${t.points.length === 1 ? "" : "s"}`
    + (t.points.length ? `, last ${t.points[t.points.length - 1].value.toFixed(3)}` : "")).join("; ") + ".";
}

/** Draws `trials` ([{name, architecture, status, epochs, points: [{epoch, value}]}]) into the SVG `root`. */
export function drawChart(root, trials, metric) {
  const rows = Math.max(1, trials.length);
  const height = MARGIN.top + PLOT_HEIGHT + MARGIN.bottom + rows * LEGEND_ROW;
  const onScreen = Math.round(root.getBoundingClientRect().width);
  const width = onScreen ? Math.max(300, Math.min(900, onScreen)) : DEFAULT_WIDTH;
  root.replaceChildren();
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const points = trials.flatMap((t) => t.points);
  const running = trials.filter((t) => t.status === "RUNNING" && t.epochs).map((t) => t.epochs);
  const xMax = Math.max(2, ...points.map((p) => p.epoch), ...running);
  const values = points.map((p) => p.value);
  const yMin = Math.min(0, ...values);
  const yMax = Math.max(1, ...values);
  const plotW = width - MARGIN.left - MARGIN.right;
  const x = (epoch) => MARGIN.left + ((epoch - 1) / (xMax - 1)) * plotW;
  const y = (value) => MARGIN.top + (1 - (value - yMin) / (yMax - yMin)) * PLOT_HEIGHT;
  const axis = svg("g", { class: "axes", "font-size": 12, "font-family": "sans-serif", fill: "currentColor" }, root);
  const yStep = niceStep(yMax - yMin, 5);
  for (let v = Math.ceil(yMin / yStep) * yStep; v <= yMax + 1e-9; v += yStep) {
    svg("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y(v), y2: y(v), stroke: "currentColor", "stroke-opacity": 0.15 }, axis);
    svg("text", { x: MARGIN.left - 6, y: y(v) + 4, "text-anchor": "end" }, axis).textContent = v.toFixed(2);
  }
  const xStep = Math.max(1, niceStep(xMax - 1, 10));
  for (let e = 1; e <= xMax; e += xStep) {
    svg("line", { x1: x(e), x2: x(e), y1: MARGIN.top + PLOT_HEIGHT, y2: MARGIN.top + PLOT_HEIGHT + 5, stroke: "currentColor" }, axis);
    svg("text", { x: x(e), y: MARGIN.top + PLOT_HEIGHT + 18, "text-anchor": "middle" }, axis).textContent = String(e);
  }
  svg("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: MARGIN.top + PLOT_HEIGHT, y2: MARGIN.top + PLOT_HEIGHT, stroke: "currentColor" }, axis);
  svg("text", { x: MARGIN.left + plotW / 2, y: MARGIN.top + PLOT_HEIGHT + 34, "text-anchor": "middle" }, axis).textContent = "epoch";
  svg("text", { x: 12, y: MARGIN.top + PLOT_HEIGHT / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${MARGIN.top + PLOT_HEIGHT / 2})` }, axis).textContent = metric;
  if (!points.length) {
    svg("text", { x: MARGIN.left + plotW / 2, y: MARGIN.top + PLOT_HEIGHT / 2, "text-anchor": "middle", "font-size": 14, fill: "currentColor" }, root)
      .textContent = "waiting for the first evaluated epoch…";
  }
  trials.forEach((trial, i) => {
    const colour = trialColour(i);
    const group = svg("g", { class: "trial", "data-trial": trial.name, fill: colour, stroke: colour }, root);
    if (trial.points.length > 1) {
      svg("polyline", { class: "line", fill: "none", "stroke-width": 2.5,
                        points: trial.points.map((p) => `${x(p.epoch)},${y(p.value)}`).join(" ") }, group);
    }
    for (const p of trial.points) {
      const dot = svg("circle", { class: "point", cx: x(p.epoch), cy: y(p.value), r: 4, "data-epoch": p.epoch, "data-value": p.value }, group);
      svg("title", {}, dot).textContent = `${trialName(trial, i)}, epoch ${p.epoch}: ${metric} ${p.value.toFixed(4)}`;
    }
    const ly = MARGIN.top + PLOT_HEIGHT + MARGIN.bottom + i * LEGEND_ROW + 12;
    svg("line", { x1: MARGIN.left, x2: MARGIN.left + 24, y1: ly - 4, y2: ly - 4, "stroke-width": 3 }, group);
    const state = trial.status === "RUNNING" ? " (running)" : "";
    svg("text", { x: MARGIN.left + 32, y: ly, stroke: "none", fill: "currentColor", "font-size": 12, "font-family": "sans-serif" }, group)
      .textContent = `${trialName(trial, i)} · ${trial.points.length} epoch${trial.points.length === 1 ? "" : "s"}${state}`;
  });
}
