// The API client of the console: JSON in and out (whole numbers stay exact, as BigInt past
// 2^53), the operator's token as an Authorization header (kept in sessionStorage only, never in
// a URL), a fresh Idempotency-Key for every action, and the API's error shape as ApiError.

const TOKEN_KEY = "message_broker.api_token";
export const TOKEN_CHANGED = "mb-token-changed";

export class ApiError extends Error {
  constructor(status, code, message, details = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

// -- the token -----------------------------------------------------------------------------

export function getToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || null;
  } catch {
    return null; // storage disabled: the console works without a token
  }
}

export function setToken(token) {
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // storage disabled: nothing to keep
  }
  declined = false;
  window.dispatchEvent(new CustomEvent(TOKEN_CHANGED));
}

// The page decides how to ask (a dialog); requests that meet a 401 share one question.
let prompter = null;
let asking = null;
let declined = false; // the operator cancelled: background requests stop asking until the token changes

export function setTokenPrompter(fn) {
  prompter = fn;
}

// Ask for a token; resolves with it, or null when the operator cancels. Background requests
// (polls, streams) do not ask again once the operator has cancelled.
export function askForToken(reason, { interactive = false } = {}) {
  if (!prompter || (declined && !interactive)) return Promise.resolve(null);
  if (!asking) {
    asking = Promise.resolve(prompter(reason)).then((token) => {
      asking = null;
      if (token) setToken(token);
      else declined = true;
      return token || null;
    });
  }
  return asking;
}

export function authHeaders() {
  const token = getToken();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// Which token this tab sends and what it may do: {status, data} of GET /api/v1/whoami (data:
// required, reads_open, token, token_scopes, allowed). Never asks for a token: a 401 here only
// says the token set does not work.
export async function whoami() {
  try {
    const response = await fetch("/api/v1/whoami", {
      headers: { Accept: "application/json", ...authHeaders() },
      cache: "no-store",
      credentials: "omit",
    });
    const data = response.ok ? await response.json() : null;
    return { status: response.status, data };
  } catch {
    return { status: 0, data: null };
  }
}

// The message for a 401: whether a token was sent decides which.
export function unauthorizedMessage(sentToken) {
  return sentToken
    ? "Refused: the server did not accept the API token. Enter the right token to continue."
    : "Refused: this server needs an API token for this. Enter it to continue.";
}

// -- JSON with exact whole numbers ------------------------------------------------------------

export function parseJson(text) {
  return JSON.parse(text, (key, value, context) => {
    if (typeof value === "number" && !Number.isSafeInteger(value) && context && /^-?\d+$/.test(context.source)) {
      return BigInt(context.source);
    }
    return value;
  });
}

function toJson(value) {
  return JSON.stringify(value, (key, v) => {
    if (typeof v !== "bigint") return v;
    if (typeof JSON.rawJSON === "function") return JSON.rawJSON(v.toString());
    if (v <= BigInt(Number.MAX_SAFE_INTEGER)) return Number(v);
    throw new ApiError(0, "client_error", "This browser cannot send a number this large.");
  });
}

// -- requests ---------------------------------------------------------------------------------

export function newIdempotencyKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  // Pages served over plain HTTP to another host are no secure context: build a v4 UUID.
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function withQuery(path, query) {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") params.set(name, String(value));
  }
  const text = params.toString();
  return text ? `${path}?${text}` : path;
}

// One request (Accept: `accept`, JSON unless said). Resolves with {status, data, text, headers}; rejects with ApiError (status 0: no answer).
// On a 401 it tells `onUnauthorized` (so the page can say so at once), asks for a token
// (interactive: always; background: unless the operator cancelled before) and tries again.
export async function request(method, path, options = {}) {
  const { body, query, idempotencyKey, signal, interactive = false, onUnauthorized } = options;
  const accept = options.accept || "application/json";
  const url = withQuery(path, query);
  for (let attempt = 0; ; attempt += 1) {
    const headers = { Accept: accept, ...authHeaders() };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (idempotencyKey) headers["Idempotency-Key"] = idempotencyKey;
    let response;
    try {
      response = await fetch(url, {
        method,
        headers,
        body: body === undefined ? undefined : toJson(body),
        signal,
        cache: "no-store",
        credentials: "omit",
      });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, "network_error", "The server could not be reached. Check that it runs, then try again.");
    }
    const text = await response.text();
    let data = null;
    if (text && (response.headers.get("Content-Type") || "").includes("json")) {
      try {
        data = parseJson(text);
      } catch {
        data = null;
      }
    }
    if (response.status === 401) {
      const error = new ApiError(401, "unauthorized", unauthorizedMessage(Boolean(headers.Authorization)));
      if (onUnauthorized) onUnauthorized(error);
      if (attempt < 3 && (await askForToken(error.message, { interactive }))) continue;
      throw error;
    }
    if (!response.ok) throw apiError(response, data);
    // `text` for answers that are not JSON (a statement as CSV), `headers` for their name.
    return { status: response.status, data, text, headers: response.headers };
  }
}

// The ApiError a failed response stands for: the API's error shape in its body (`data`,
// parsed), else `fallback` as the message.
export function apiError(response, data, fallback = null) {
  const e = data && data.error;
  if (e) return new ApiError(response.status, e.code, e.message, e.details);
  const message = fallback || `The server answered ${response.status} ${response.statusText}`.trim();
  return new ApiError(response.status, "http_error", message);
}

export const get = (path, options) => request("GET", path, options);

// An action: POST with a fresh Idempotency-Key (kept for the retry after a token is entered:
// a refused request stored nothing, and the retry is the same intended operation) and ?wait=5,
// so that the answer is the task's outcome when it is applied within 5 s.
export function act(path, body, options = {}) {
  return request("POST", path, {
    ...options,
    body,
    query: { wait: 5 },
    idempotencyKey: newIdempotencyKey(),
    interactive: true,
  });
}
