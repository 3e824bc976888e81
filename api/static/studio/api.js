// The API client: the key lives in this tab's sessionStorage and goes out only as a header.

const KEY_NAME = "stemgen.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY_NAME) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_NAME, key);
  else sessionStorage.removeItem(KEY_NAME);
}

export function authHeaders(extra = {}) {
  const headers = { ...extra };
  const key = apiKey();
  if (key) headers["Authorization"] = `Bearer ${key}`;
  return headers;
}

/** An API answer that was not 2xx: `status`, and the body's `error` (code, message, fields). */
export class ApiError extends Error {
  constructor(status, error) {
    super((error && error.message) || `HTTP ${status}`);
    this.status = status;
    this.code = (error && error.code) || "http_error";
    this.fields = (error && error.fields) || [];
  }
}

/** fetch() with the key; JSON in and out. Throws ApiError for a non-2xx answer. */
export async function api(path, { method = "GET", body, signal } = {}) {
  const headers = authHeaders({ Accept: "application/json" });
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit", cache: "no-store",
  });
  let data = null;
  try { data = await response.json(); } catch (_) { data = null; }
  if (!response.ok) throw new ApiError(response.status, data && data.error);
  return { status: response.status, data };
}

/** A finished stem's file (through the gateway), as an ArrayBuffer. */
export async function stemAudio(jobId, stem, signal) {
  const response = await fetch(`/studio/audio/${encodeURIComponent(jobId)}/${encodeURIComponent(stem)}`,
    { headers: authHeaders(), signal, credentials: "omit" });
  if (!response.ok) {
    let data = null;
    try { data = await response.json(); } catch (_) { data = null; }
    throw new ApiError(response.status, data && data.error);
  }
  return { bytes: await response.arrayBuffer(), type: response.headers.get("Content-Type") || "" };
}
