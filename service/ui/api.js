// The service's HTTP API as the page uses it: same-origin fetch with the stored key as a Bearer header (never in
// a URL), and the service's error shape ({"error": {"message", "type", "param", "code"}}) turned into ApiError.

const KEY_STORAGE = "xclip-serve.api-key";
const SCOPE_HINTS = {
  401: "Type a valid API key at the top of the page and save it (a key with the read scope lets you look; "
    + "write and admin keys let you change things).",
  403: "Your key is valid but lacks the scope this needs: use a key with that scope.",
  413: "The input is over one of the service's limits.",
  429: "The service is busy: try again in a moment.",
  503: "No model is active yet: activate one in the Models tab (admin key).",
};

/** The page's own refusal of an input, before anything is sent (a missing choice, a file over the limits). */
export class Refusal extends Error {}

export class ApiError extends Error {
  constructor(status, message, { param = null, code = null, type = null } = {}) {
    super(message);
    this.status = status;
    this.param = param;
    this.code = code;
    this.type = type;
  }
}

/** What to show a person for `error`: what happened, then what to do about it. */
export function explain(error) {
  const where = error.param ? ` (field: ${error.param})` : "";
  const status = error.status ? `${error.status}: ` : "";
  const lines = [`${status}${error.message}${where}`];
  if (SCOPE_HINTS[error.status]) lines.push(SCOPE_HINTS[error.status]);
  return lines;
}

export function storedKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function storeKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

/** `/a/b/c` from path segments, each percent-encoded (item ids may hold `/`). */
export function path(...segments) {
  return "/" + segments.map((s) => encodeURIComponent(String(s))).join("/");
}

/**
 * Call the API: `json` is sent as a JSON body, `form` (FormData) as multipart. Resolves to the parsed body
 * (null for 204); rejects with an ApiError for every failure, the network's included.
 */
export async function api(url, { method = "GET", json, form, signal } = {}) {
  const headers = {};
  const key = storedKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  let response;
  try {
    response = await fetch(url, { method, headers, body, signal, credentials: "same-origin", cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `Cannot reach the service (${error.message}). Is the server still running?`);
  }
  const payload = await readPayload(response);
  if (!response.ok) throw errorOf(response, payload);
  return payload;
}

async function readPayload(response) {
  if (response.status === 204) return null;
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

function errorOf(response, payload) {
  const error = payload && payload.error;
  if (error && typeof error === "object") return new ApiError(response.status, error.message, error);
  if (typeof error === "string") return new ApiError(response.status, error); // Weaviate's routes' shape
  const detail = typeof payload === "string" && payload ? payload.slice(0, 300) : response.statusText;
  return new ApiError(response.status, `the service answered ${response.status} ${detail}`.trim());
}

/** The page's copy of the API's upload limits (GET /ui/limits.json), fetched once. */
let limitsPromise = null;
export function limits() {
  limitsPromise ??= api("/ui/limits.json").catch((error) => {
    limitsPromise = null;
    throw error;
  });
  return limitsPromise;
}

/**
 * Refuse a file the API would refuse for its size, before uploading it. `asJson`: it travels base64-encoded in a
 * JSON body (4/3 of its size), which must fit the body limit too.
 */
export async function checkUpload(file, { asJson }) {
  const { max_image_bytes: maxImage, max_body_bytes: maxBody } = await limits();
  if (file.size > maxImage) {
    throw new Refusal(`${file.name} is ${sizeOf(file.size)}; the service takes images up to ${sizeOf(maxImage)}`);
  }
  const onTheWire = asJson ? Math.ceil(file.size / 3) * 4 + 64 * 1024 : file.size;
  if (onTheWire > maxBody) {
    throw new Refusal(`${file.name} is too large for one request: the body limit is ${sizeOf(maxBody)}`);
  }
}

function sizeOf(bytes) {
  return bytes < 1024 * 1024 ? `${(bytes / 1024).toFixed(1)} KiB` : `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}
