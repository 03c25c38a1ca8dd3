// What both pages share: building elements, formatting money, times and task outcomes, and the
// page chrome (the token button and its dialog).

import { ApiError, TOKEN_CHANGED, getToken, setToken, setTokenPrompter, whoami } from "./api.js";

// Rows and cells of the data tables carry their roles: on narrow screens the tables are laid out
// as stacked blocks (console.css), which would otherwise lose their table semantics.
const ROLES = { tr: "row", td: "cell" };

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  if (ROLES[tag]) node.setAttribute("role", ROLES[tag]);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

// Text changes only when it differs, so that a status line read by screen readers is not
// announced again every second; `kind` (or none) goes to data-kind.
export function setText(node, text, kind = null) {
  if (node.textContent !== text) node.textContent = text;
  if (kind) node.dataset.kind = kind;
  else delete node.dataset.kind;
}

// A link to a user's page, "user <id>" unless told otherwise.
export function userLink(id, text = `user ${id}`) {
  return el("a", { href: `/console/user/${encodeURIComponent(id)}`, text });
}

// `fn` run once in the next frame, however many times the returned function is called before.
export function perFrame(fn) {
  let queued = false;
  return () => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => {
      queued = false;
      fn();
    });
  };
}

const GROUPED = new Intl.NumberFormat("en-US");

export function formatAmount(value) {
  if (value === null || value === undefined) return "–";
  return GROUPED.format(value); // Intl formats BigInt exactly
}

export function formatTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
}

// A moment as short as it can be told: the time alone today, else the date and the time
// (to the second). The full timestamp belongs in a title.
export function formatWhen(iso, { ms = true } = {}) {
  if (!iso) return "–";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  const time = formatTime(iso);
  if (date.toDateString() === new Date().toDateString()) return ms ? time : time.slice(0, 8);
  return `${date.toLocaleDateString("en-CA")} ${time.slice(0, 8)}`;
}

export function formatDateTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  return `${date.toLocaleDateString("en-CA")} ${formatTime(iso)}`;
}

const TASK_TYPES = {
  replenishment: "replenishment",
  "write-off": "write-off",
  transfer: "transfer out",
  "transfer-in": "transfer in",
  hold: "hold",
  capture: "capture",
  void: "void",
  release: "release",
};

const REASONS = {
  insufficient_funds: "insufficient funds: more than the available balance",
  balance_overflow: "the balance would pass the largest amount (2^63−1)",
  hold_not_active: "the hold is no longer active",
  amount_exceeds_hold: "the amount is more than the hold",
};

export function typeLabel(type) {
  return TASK_TYPES[type] || type;
}

export function reasonText(reason) {
  return reason ? `${reason} (${REASONS[reason] || "see the API docs"})` : "";
}

// A task as one short phrase: "write-off of 200", "transfer of 50 to user 7", ...
export function taskPhrase(task) {
  let phrase = `${typeLabel(task.type)} of ${formatAmount(task.amount)}`;
  if (task.type === "transfer" && task.counterparty_id) phrase += ` to user ${task.counterparty_id}`;
  if (task.type === "transfer-in" && task.counterparty_id) phrase += ` from user ${task.counterparty_id}`;
  if (task.hold_id) phrase += ` (hold ${task.hold_id})`;
  return phrase;
}

// The outcome of an action whose answer is a task: {kind: "done" | "cancelled" | "pending", text}.
export function describeTask(task) {
  const what = `task ${task.id}, ${taskPhrase(task)}`;
  if (task.status === "done") {
    let after = "";
    if (task.balance_after !== null && task.balance_after !== undefined) {
      after = ` Balance now ${formatAmount(task.balance_after)}`;
      const available = task.available_after;
      if (available !== null && available !== undefined && String(available) !== String(task.balance_after)) {
        after += `, available ${formatAmount(available)}`;
      }
      after += ".";
    }
    const until = task.type === "hold" && task.expires_at ? ` Held until ${formatWhen(task.expires_at, { ms: false })}.` : "";
    return { kind: "done", text: `Done: ${what}.${until}${after}` };
  }
  if (task.status === "cancelled") {
    return { kind: "cancelled", text: `Cancelled: ${what}. Reason: ${reasonText(task.reason)}.` };
  }
  return { kind: "pending", text: `Accepted: ${what}, still pending after 5 s; it shows below once applied.` };
}

// What went wrong, in words, for an ApiError (the API's error shape) or anything else.
export function describeError(error) {
  if (!(error instanceof ApiError)) {
    return `Something went wrong in the page: ${error && error.message ? error.message : error}`;
  }
  const { status, code, message } = error;
  if (status === 0 || status === 401) return error.message;
  const tag = ` [${status} ${code}]`;
  if (status === 403) return `Forbidden: ${message}.${tag}`;
  if (status === 404 && code === "not_found") return `This server has no such endpoint.${tag}`;
  if (status === 404) return `Not found: ${message}.${tag}`;
  if (status === 409) return `Conflict: ${message}.${tag}`;
  if (status === 503) return `Unavailable right now: ${message}.${tag}`;
  if (status >= 500) return `The server failed: ${message}.${tag}`;
  const fields = error.details && error.details.fields;
  let detail = "";
  if (fields && typeof fields === "object") {
    detail = ` (${Object.entries(fields)
      .map(([name, messages]) => `${name}: ${[].concat(messages).join(" ")}`)
      .join("; ")})`;
  }
  return `Refused: ${message}${detail}.${tag}`;
}

// What GET /ready says is wrong, in words: {problems: [...], down: [background loops down]}.
// Its body is {"status": "ready" | "unavailable", "checks": {"listener", "database",
// "background"}, "down": [names of background loops that are down, being restarted]}.
const READY_CHECKS = {
  database: "the database does not answer",
  listener: "the LISTEN connection is down: tasks are applied only by the sweeps",
};

export function describeReady(status, body) {
  const problems = [];
  const checks = (body && body.checks) || {};
  const down = Array.isArray(body && body.down) ? body.down.map(String) : [];
  for (const [name, text] of Object.entries(READY_CHECKS)) if (checks[name] === false) problems.push(text);
  if (down.length) {
    problems.push(`background loop${down.length === 1 ? "" : "s"} down (being restarted): ${down.join(", ")}`);
  } else if (checks.background === false) {
    problems.push("a background loop is down");
  }
  if (status !== 200 && problems.length === 0) problems.push(`the service is not ready (/ready answered ${status})`);
  return { problems, down };
}

// Show an outcome in an aria-live region: kind is "done", "cancelled", "pending", "error" or "busy".
export function showOutcome(node, kind, text) {
  node.dataset.kind = kind;
  node.textContent = text;
}

// A whole number of money from an input: a BigInt from 1 (or `min`) to 2^63-1, else an Error
// whose message says what is wrong.
const MAX_AMOUNT = 2n ** 63n - 1n;
export function parseAmount(text, { min = 1n, max = MAX_AMOUNT, label = "Amount" } = {}) {
  const value = String(text).trim().replaceAll(/[\s,_]/g, "");
  if (!/^\d+$/.test(value)) throw new Error(`${label} must be a whole number written with digits.`);
  const amount = BigInt(value);
  if (amount < min || amount > max) throw new Error(`${label} must be from ${min} to ${formatAmount(max)}.`);
  return amount;
}

export function isUserId(text) {
  return /^\d{1,19}$/.test(text) && BigInt(text) >= 1n && BigInt(text) <= MAX_AMOUNT;
}

// -- page chrome --------------------------------------------------------------------------------

// The dialog that asks for the token: the same on every page, so it is made here.
const TOKEN_DIALOG = `
  <form id="token-form" method="dialog">
    <h2 id="token-title">API token</h2>
    <p id="token-reason"></p>
    <div class="field">
      <label for="token-input">Token (kept in this browser tab only, sent as Authorization: Bearer)</label>
      <input id="token-input" type="password" autocomplete="off" spellcheck="false">
    </div>
    <div class="buttons">
      <button type="submit" class="primary">Use token</button>
      <button type="button" id="token-cancel">Cancel</button>
      <button type="button" id="token-forget">Forget token</button>
    </div>
  </form>`;

// The token button (in each page's header) and its dialog. Any request that meets a 401 opens the
// dialog through the API client; the token stays in this tab's sessionStorage.
export function setupChrome() {
  const dialog = document.createElement("dialog");
  dialog.id = "token-dialog";
  dialog.setAttribute("aria-labelledby", "token-title");
  dialog.innerHTML = TOKEN_DIALOG;
  document.body.append(dialog);
  const form = document.getElementById("token-form");
  const input = document.getElementById("token-input");
  const reason = document.getElementById("token-reason");
  const state = document.getElementById("token-state");
  const button = document.getElementById("token-button");
  let resolve = null;

  async function refreshState() {
    const token = getToken();
    state.textContent = token ? "checking token…" : "no token";
    const { status, data } = token ? await whoami() : { status: 0, data: null };
    if (getToken() !== token) return; // changed meanwhile: a newer refresh runs
    if (data && data.token) {
      state.textContent = `${data.token} (${data.token_scopes.join(", ")})`;
      access = { name: data.token, scopes: data.token_scopes, allowed: data.allowed };
    } else {
      if (token) state.textContent = status === 401 ? "token not accepted" : "token set";
      access = null; // no token (or one not accepted): actions stay enabled and ask for one on a 401
    }
    applyScopes();
  }

  function open(message) {
    reason.textContent = message;
    input.value = "";
    if (!dialog.open) dialog.showModal();
    input.focus();
    return new Promise((r) => {
      resolve = r;
    });
  }

  function finish(token) {
    if (dialog.open) dialog.close();
    const r = resolve;
    resolve = null;
    if (r) r(token);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = input.value.trim();
    if (!token) {
      reason.textContent = "Enter the token, or Cancel.";
      input.focus();
      return;
    }
    finish(token);
  });
  document.getElementById("token-cancel").addEventListener("click", () => finish(null));
  document.getElementById("token-forget").addEventListener("click", () => {
    setToken(null);
    finish(null);
  });
  dialog.addEventListener("cancel", (event) => {
    event.preventDefault();
    finish(null);
  });
  button.addEventListener("click", () => {
    const message = getToken()
      ? "Replace or forget the API token this tab sends."
      : "The API token this tab sends with every request (needed when the server has API_TOKEN set).";
    open(message).then((token) => {
      if (token) setToken(token);
    });
  });
  window.addEventListener(TOKEN_CHANGED, refreshState);
  setTokenPrompter((message) => open(message));
  refreshState();
}

// What the token this tab sends may do (null: no token, or not known). Elements with a
// data-scope attribute (the action forms) are disabled, with the reason shown, when the token's
// scopes do not grant theirs.
let access = null;

export function scopeReason(scope) {
  if (!access || access.allowed.includes(scope)) return null;
  return `Not allowed: this needs a token with the ${scope} scope; token “${access.name}” has ${access.scopes.join(", ")}.`;
}

export function applyScopes(root = document) {
  const nodes = root.matches && root.matches("[data-scope]") ? [root] : [...root.querySelectorAll("[data-scope]")];
  for (const node of nodes) {
    const reason = scopeReason(node.dataset.scope);
    for (const control of node.querySelectorAll("button, input, select, textarea")) control.disabled = Boolean(reason);
    let note = node.querySelector(":scope > .scope-note");
    if (reason) {
      if (!note) {
        note = el("p", { class: "scope-note muted" });
        node.append(note);
      }
      note.textContent = reason;
      node.title = reason;
    } else {
      if (note) note.remove();
      node.removeAttribute("title");
    }
  }
}

// Run `fn` now and then every `ms` while the page is visible (a hidden tab costs nothing);
// the next run starts `ms` after the previous one finished.
export function whileVisible(fn, ms) {
  let timer = null;
  let running = false;
  async function tick() {
    timer = null;
    if (document.hidden || running) return;
    running = true;
    try {
      await fn();
    } finally {
      running = false;
      if (!document.hidden && timer === null) timer = setTimeout(tick, ms);
    }
  }
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && timer === null && !running) tick();
    else if (document.hidden && timer !== null) {
      clearTimeout(timer);
      timer = null;
    }
  });
  tick();
}
