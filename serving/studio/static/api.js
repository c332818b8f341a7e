// The server's routes as the page calls them: the API key (kept for this tab in sessionStorage) sent as
// `Authorization: Bearer` (both `visionserve serve` and the hub take it), the latency of each call measured, and
// every failure turned into an ApiError that carries the server's own words.

const KEY = "visionserve.studio.key";

export class ApiError extends Error {
  /** status: the HTTP status (0: no answer); body: the JSON the server answered, when it did. */
  constructor(status, message, body = undefined) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.body = body;
  }
}

/** The message of an error body: the API's `error.message` and the messages of its details. */
export function messageOf(status, json, text) {
  const error = json && typeof json === "object" ? json.error : undefined;
  if (error && typeof error.message === "string") {
    const details = (Array.isArray(error.details) ? error.details : [])
      .map((d) => d && d.message)
      .filter((m) => typeof m === "string" && !error.message.includes(m));
    return [error.message, ...details].join("\n");
  }
  if (json && typeof json.detail === "string") return `HTTP ${status}: ${json.detail}`;
  const words = (text || "").trim().slice(0, 300);
  return words ? `HTTP ${status}: ${words}` : `HTTP ${status} with an empty answer`;
}

/** The body of POST /score (the cloud's input_data schema); params only when there are any. */
export function scoreBody(entries, params = {}) {
  const body = { input_data: { columns: ["image"], data: entries } };
  if (Object.keys(params).length) body.params = params;
  return body;
}

export class Api {
  /** base: the URL the app's routes hang from (its route prefix, ending in "/"). */
  constructor(base) {
    this.base = base;
  }

  get key() {
    return sessionStorage.getItem(KEY) || "";
  }

  set key(value) {
    if (value) sessionStorage.setItem(KEY, value);
    else sessionStorage.removeItem(KEY);
  }

  async fetch(path, { method = "GET", body = undefined, signal = undefined, accept = "application/json" } = {}) {
    const headers = { accept };
    if (this.key) headers.authorization = `Bearer ${this.key}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    try {
      return await fetch(new URL(path, this.base), {
        method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, `the server could not be reached (${error.message})`);
    }
  }

  static async failure(response) {
    const text = await response.text();
    let json;
    try {
      json = JSON.parse(text);
    } catch {
      json = undefined;
    }
    return new ApiError(response.status, messageOf(response.status, json, text), json);
  }

  /** → {json, ms, status} (json null for a 204); throws ApiError (or the AbortError of `signal`). */
  async call(path, options = {}) {
    const started = performance.now();
    const response = await this.fetch(path, options);
    if (!response.ok) throw await Api.failure(response);
    let text;
    try {
      text = await response.text();
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, `the answer was cut off (${error.message})`);
    }
    const ms = performance.now() - started;
    if (response.status === 204) return { json: null, ms, status: 204 };
    try {
      return { json: JSON.parse(text), ms, status: response.status };
    } catch {
      throw new ApiError(response.status, "the server's answer is not JSON");
    }
  }

  /** An image (or other file) the routes serve, as a Blob; throws ApiError in the server's words. */
  async blob(path, { signal = undefined } = {}) {
    const response = await this.fetch(path, { signal, accept: "image/*" });
    if (!response.ok) throw await Api.failure(response);
    return response.blob();
  }
}
