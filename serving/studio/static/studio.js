// The studio page: asks the server what it serves (/metadata; on the hub, GET /models), asks for the API key when
// the server wants one, takes an image (dropped, chosen or pasted) and hands it to the views. Every failure is
// shown in words. The page says which server sent it (<body data-server>): the hub adds its own views (hub.js).

import { Api, ApiError } from "./api.js";
import { ExplainView } from "./explain.js";
import { startHub } from "./hub.js";
import { TryView } from "./try.js";

const $ = (id) => document.getElementById(id);

/** The file's bytes as base64 (what the API takes), without the data: URL prefix. */
function base64Of(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).replace(/^data:[^,]*,/, ""));
    reader.onerror = () => reject(new Error(`${file.name}: the file could not be read`));
    reader.readAsDataURL(file);
  });
}

class Studio {
  constructor() {
    // the app's routes hang where this module's folder does, two levels up: <prefix>/studio/static/
    this.api = new Api(new URL("../../", import.meta.url));
    this.$ = $;
    this.meta = null;
    this.hub = document.body.dataset.server === "hub";
    this.started = false;
    this.views = [];
    this.url = null;
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.api.key = $("key-input").value.trim();
      $("key-dialog").close();
      this.connect();
    });
    $("key-dialog").addEventListener("cancel", () => this.report(new Error("This server needs an API key; use the API key button to give it.")));
    $("key-button").addEventListener("click", () => this.askKey("Give the server's API key (kept for this tab only)."));
  }

  report(error) {
    const box = $("error");
    const status = error instanceof ApiError && error.status ? ` (HTTP ${error.status})` : "";
    const refused = error instanceof ApiError && error.status === 401 ? "The API key was refused: " : "";
    box.textContent = `${refused}${error.message || String(error)}${status}`;
    box.hidden = false;
    if (error instanceof ApiError && error.status === 401) this.askKey(`The API key was refused: ${error.message}`);
  }

  clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  askKey(message) {
    $("key-button").hidden = false;
    $("key-message").textContent = message;
    $("key-input").value = "";
    if (!$("key-dialog").open) $("key-dialog").showModal();
    $("key-input").focus();
  }

  async connect() {
    $("model").textContent = "connecting…";
    let meta;
    try {
      meta = (await this.api.call(this.hub ? "models" : "metadata")).json;
    } catch (error) {
      $("model").textContent = "not connected";
      if (error instanceof ApiError && error.status === 401 && !this.api.key) this.askKey("This server needs an API key.");
      else this.report(error); // a refused key: said on the page and in the key dialog
      return;
    }
    this.clearError();
    if (this.api.key) $("key-button").hidden = false;
    if (!this.started) this.start(meta);
  }

  /** `answer`: /metadata's (one model), or GET /models's on the hub. */
  start(answer) {
    this.started = true;
    if (this.hub) {
      this.views.push(...startHub(this, answer));
    } else {
      const meta = (this.meta = answer);
      $("model").textContent = `${meta.model_name} · ${meta.task} · ${meta.labels.length} labels · ${meta.backend}`;
      this.views.push(new TryView(this, meta));
      if (meta.xai_parameters && meta.xai_parameters.length) {
        this.views.push(new ExplainView(this));
        $("tab-explain").hidden = false;
      }
    }
    for (const id of ["picker", "tabs", "views"]) $(id).hidden = false;
    this.tabs();
    this.picker();
    document.body.dataset.ready = "true";
  }

  tabs() {
    const tabs = [...document.querySelectorAll("[role=tab]")].filter((tab) => !tab.hidden);
    const select = (chosen) => {
      for (const tab of tabs) {
        const on = tab === chosen;
        tab.setAttribute("aria-selected", String(on));
        tab.tabIndex = on ? 0 : -1;
        $(tab.getAttribute("aria-controls")).hidden = !on;
      }
      $("picker").hidden = !chosen.dataset.image; // the image goes to the views that take one
      chosen.dispatchEvent(new CustomEvent("shown"));
    };
    tabs.forEach((tab, i) => {
      tab.addEventListener("click", () => select(tab));
      tab.addEventListener("keydown", (event) => {
        const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
        if (!step) return;
        const next = tabs[(i + step + tabs.length) % tabs.length];
        select(next);
        next.focus();
      });
    });
    select(tabs[0]);
  }

  picker() {
    const drop = $("drop");
    $("file").addEventListener("change", () => this.load($("file").files[0]));
    for (const name of ["dragenter", "dragover"]) {
      document.addEventListener(name, (event) => {
        event.preventDefault(); // a dropped file anywhere is taken, never opened in place of the page
        drop.classList.add("over");
      });
    }
    document.addEventListener("dragleave", () => drop.classList.remove("over"));
    document.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("over");
      this.load(event.dataTransfer?.files?.[0]);
    });
    document.addEventListener("paste", (event) => {
      const file = [...(event.clipboardData?.files || [])][0];
      if (file) {
        event.preventDefault();
        this.load(file);
      }
    });
  }

  async load(file) {
    if (!file) return;
    this.clearError();
    let b64;
    try {
      b64 = await base64Of(file);
    } catch (error) {
      this.report(error);
      return;
    }
    if (this.url) URL.revokeObjectURL(this.url);
    this.url = URL.createObjectURL(file);
    const element = $("image");
    element.src = this.url;
    let width = 0, height = 0;
    try {
      await element.decode();
      width = element.naturalWidth;
      height = element.naturalHeight;
      $("picked").textContent = `${file.name}: ${width} × ${height} pixels`;
    } catch {
      $("picked").textContent = `${file.name}: the browser cannot show this file; it is sent to the server as it is`;
    }
    for (const stage of document.querySelectorAll(".stage")) {
      stage.style.setProperty("--ratio", width && height ? String(width / height) : "1.333");
      stage.hidden = !width;
    }
    $("xai-image").src = this.url;
    const image = { b64, url: this.url, width, height, name: file.name, element };
    for (const view of this.views) view.setImage?.(image);
  }
}

new Studio().connect();
