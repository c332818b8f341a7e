// The server's routes as the page calls them: the API key (kept for this tab in sessionStorage) sent as
// `Authorization: Bearer`, the latency of each call measured, and every failure turned into an ApiError that
// carries the server's own words.

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

  /** → {json, ms, status}; throws ApiError (or the AbortError of `signal`). */
  async call(path, { method = "GET", body = undefined, signal = undefined } = {}) {
    const headers = { accept: "application/json" };
    if (this.key) headers.authorization = `Bearer ${this.key}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    const started = performance.now();
    let response, text;
    try {
      response = await fetch(new URL(path, this.base), {
        method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
      });
      text = await response.text();
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, `the server could not be reached (${error.message})`);
    }
    const ms = performance.now() - started;
    let json;
    try {
      json = JSON.parse(text);
    } catch {
      json = undefined;
    }
    if (!response.ok) throw new ApiError(response.status, messageOf(response.status, json, text), json);
    if (json === undefined) throw new ApiError(response.status, "the server's answer is not JSON");
    return { json, ms, status: response.status };
  }
}
