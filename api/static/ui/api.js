// The public /v1 API as the dashboard uses it: the user's key (kept in this browser only), and
// errors as the service's problem details.

const KEY_NAME = "shears.apiKey";

export function storedKey() {
  return localStorage.getItem(KEY_NAME) ?? sessionStorage.getItem(KEY_NAME);
}

/** Keep `key` for this tab (sessionStorage) or, with `remember`, for this browser (localStorage). */
export function storeKey(key, remember) {
  forgetKey();
  (remember ? localStorage : sessionStorage).setItem(KEY_NAME, key);
}

export function keyRemembered() {
  return localStorage.getItem(KEY_NAME) !== null;
}

export function forgetKey() {
  localStorage.removeItem(KEY_NAME);
  sessionStorage.removeItem(KEY_NAME);
}

/** An error response: the fields of its problem document (`title`, `detail`, `status`, ...). */
export class ApiError extends Error {
  constructor(problem) {
    super(problem.detail || problem.title || `HTTP ${problem.status}`);
    Object.assign(this, problem);
  }
}

/** Listeners called when the API answers 401, with the problem; the app asks for a key. */
export const onUnauthorized = new Set();

/** fetch() against the API with the key; resolves to the Response, rejects with ApiError. */
export async function request(
  path,
  { method = "GET", body, accept = "application/json", signal } = {},
) {
  const headers = { Accept: accept };
  const key = storedKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body, signal });
  if (response.ok) return response;
  let problem = { status: response.status, title: response.statusText };
  try {
    problem = { ...problem, ...(await response.json()) };
  } catch {
    // not a problem document (a proxy's page, say): keep the status line
  }
  const error = new ApiError(problem);
  if (response.status === 401) onUnauthorized.forEach((listener) => listener(error));
  throw error;
}

export async function json(path, options) {
  return (await request(path, options)).json();
}

/** `path` with the query parameters that are set. */
export function withQuery(path, params) {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") query.set(name, value);
  }
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

/** A resource fetched with the key, as a blob: URL an <img> or <a download> can use; null on 404. */
export async function blobUrl(path, accept = "*/*") {
  try {
    const response = await request(path, { accept });
    return URL.createObjectURL(await response.blob());
  } catch (error) {
    if (error.status === 404) return null;
    throw error;
  }
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
