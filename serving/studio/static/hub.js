// The hub's page: the "Try" view with a model picker (GET /models; each model's settings form from
// GET /models/{name}/metadata; scored on /score?model=NAME) and an image URL field (GET /image?url=), and the Models
// and Datasets views.

import { DatasetsView } from "./datasets.js";
import { ModelsView } from "./models.js";
import { TryView } from "./try.js";

const CLASSIFIER = /^image_classification/;

/** The model picker above the image: the hub's models, those not ready shown but not choosable. */
class ModelPicker {
  constructor(studio, tryView) {
    this.studio = studio;
    this.tryView = tryView;
    this.choosing = 0; // the latest choice wins when answers come out of order
    studio.$("hub-model").addEventListener("change", () => this.choose(studio.$("hub-model").value));
  }

  /** `listing`: GET /models's answer. The chosen model stays chosen while it is still ready. */
  show(listing) {
    const { $ } = this.studio;
    const select = $("hub-model");
    const before = select.value;
    const ready = listing.models.filter((m) => m.status === "succeeded");
    select.replaceChildren(...listing.models.map((m) => {
      const option = new Option(`${m.name} · ${m.task || m.modelKind || "?"}${m.status === "succeeded" ? "" : ` (${m.status})`}`, m.name);
      option.disabled = m.status !== "succeeded";
      return option;
    }));
    $("hub-model-row").hidden = false;
    const count = listing.models.length;
    const models = `hub · ${count} model${count === 1 ? "" : "s"}`;
    if (!ready.length) {
      select.value = "";
      $("model").textContent = `${models}, none ready`;
      $("hub-model-hint").textContent = count
        ? "No model is ready yet: the Models tab shows their trainings."
        : "No models yet: train one in the Models tab.";
      this.tryView.noModel();
      this.note(null);
      return;
    }
    if (ready.some((m) => m.name === before)) {
      select.value = before;
      return;
    }
    $("model").textContent = `${models}, ${ready.length} ready`;
    select.value = ready[0].name;
    this.choose(select.value);
  }

  async choose(name) {
    const { $, api } = this.studio;
    const turn = ++this.choosing;
    $("hub-model-hint").textContent = `loading ${name}…`;
    try {
      const meta = (await api.call(`models/${encodeURIComponent(name)}/metadata`)).json;
      if (turn !== this.choosing) return;
      $("model").textContent = `${name} (version ${meta.version}) · ${meta.task} · ${meta.labels.length} labels · ${meta.backend}`;
      $("hub-model-hint").textContent = `scored by POST /score?model=${name}`;
      this.tryView.useModel(meta, `score?model=${encodeURIComponent(name)}`);
      this.note(meta);
    } catch (error) {
      if (turn !== this.choosing) return;
      $("hub-model-hint").textContent = `${name} cannot be used: ${error.message}`;
      this.tryView.noModel();
      this.studio.report(error);
    }
  }

  /** A classifier on the hub: where its explanations are (the hub's /score does not explain). */
  note(meta) {
    const box = this.studio.$("hub-explain-note");
    box.hidden = !(meta && CLASSIFIER.test(meta.task));
    if (!box.hidden) {
      box.textContent = "Explanations are not offered on the hub: its /score scores only. To explain this classifier, "
        + `serve it alone: visionserve serve models:/${meta.model}/${meta.version}`;
    }
  }
}

/** The URL field: the image a URL names (as analyze's {"url": ...} takes it: a file under --image-root), read by
 *  GET /image?url= and then taken as a dropped file is; a refusal shown in the hub's words. */
function urlField(studio) {
  const { $ } = studio;
  let turn = 0; // the latest URL wins
  $("url-form").hidden = false;
  $("url-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const url = $("image-url").value.trim();
    if (!url) return;
    const mine = ++turn;
    const before = $("picked").textContent;
    studio.clearError();
    $("picked").textContent = `reading ${url}…`;
    try {
      const blob = await studio.api.blob(`image?url=${encodeURIComponent(url)}`);
      if (mine !== turn) return;
      const name = url.split(/[?#]/)[0].split(/[\\/]/).pop() || "image";
      await studio.load(new File([blob], name, { type: blob.type }));
    } catch (error) {
      if (mine !== turn) return;
      $("picked").textContent = before;
      studio.report(error);
    }
  });
}

/** The hub's views; → those that take the chosen image. `listing`: GET /models's first answer. */
export function startHub(studio, listing) {
  const { $ } = studio;
  const tryView = new TryView(studio);
  const picker = new ModelPicker(studio, tryView);
  const refreshPicker = async () => {
    try {
      picker.show((await studio.api.call("models")).json);
    } catch (error) {
      studio.report(error);
    }
  };
  const models = new ModelsView(studio, { changed: refreshPicker });
  const datasets = new DatasetsView(studio);
  for (const id of ["tab-models", "tab-datasets"]) $(id).hidden = false;
  $("tab-models").addEventListener("shown", () => models.refresh());
  $("tab-datasets").addEventListener("shown", () => datasets.refresh());
  urlField(studio);
  picker.show(listing);
  return [tryView];
}
