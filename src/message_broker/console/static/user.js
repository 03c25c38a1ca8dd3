// One user's page, /console/user/<id>: balance (held and available when the server reports
// them), history, active holds and actions, kept current by the user's event stream without a
// reload. Actions the server does not offer (yet) are disabled with a note.

import { act, get, loadCapabilities } from "./api.js";
import {
  describeError,
  describeTask,
  el,
  formatAmount,
  formatDateTime,
  formatTime,
  isUserId,
  parseAmount,
  reasonText,
  setupChrome,
  showOutcome,
  taskPhrase,
} from "./ui.js";
import { TaskStream } from "./sse.js";

const $ = (id) => document.getElementById(id);
const PAGE = 50;
const HOLD_TYPES = new Set(["hold", "capture", "void", "release"]);

setupChrome();

const match = /^\/console\/user\/([^/]+)\/?$/.exec(location.pathname);
const rawId = match ? decodeURIComponent(match[1]) : "";
// The id as the API writes it ("007" is user 7), or the raw text when it is not an id at all.
const userId = isUserId(rawId) ? BigInt(rawId).toString() : rawId;

function problem(text) {
  const node = $("user-problem");
  node.textContent = text;
  node.hidden = !text;
}

// Ids are decimal strings up to 2^63-1: compared as numbers without losing precision.
function compareIds(a, b) {
  const x = BigInt(a);
  const y = BigInt(b);
  return x < y ? -1 : x > y ? 1 : 0;
}

// -- balance --------------------------------------------------------------------------------------

let user = null;
let newestFinished = null; // the id of the newest finished task shown: its balance_after is the balance
let eventsSeen = 0;
let refreshTimer = null;

function renderUser() {
  if (!user) return;
  $("user-heading").textContent = `User ${user.id}`;
  document.title = `User ${user.id} (${user.username}) · message_broker console`;
  $("user-name").textContent = user.username;
  $("user-balance").textContent = formatAmount(user.balance);
  const holds = user.held !== undefined && user.held !== null;
  $("held-tile").hidden = !holds;
  $("available-tile").hidden = user.available === undefined || user.available === null;
  if (holds) $("user-held").textContent = formatAmount(user.held);
  if (!$("available-tile").hidden) $("user-available").textContent = formatAmount(user.available);
}

async function loadUser() {
  const seen = eventsSeen;
  try {
    const { data } = await get(`/api/v1/user/${userId}`);
    if (seen !== eventsSeen) {
      // An event came meanwhile: this answer may be older than what the event showed.
      scheduleRefresh();
      if (user) return;
    }
    user = data;
    problem("");
    renderUser();
  } catch (error) {
    problem(error.code === "user_not_found" ? `There is no user ${userId}.` : describeError(error));
  }
}

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(loadUser, 400);
}

// A finished task of this user, from the event stream or an action's answer: the newest one's
// balance_after (and available_after) is the balance. (The history is another snapshot: the
// balance comes from GET /user and the events after it.)
function noteFinished(task) {
  if (!user || task.status === "pending" || task.balance_after === null || task.balance_after === undefined) return;
  if (newestFinished !== null && compareIds(task.id, newestFinished) <= 0) return;
  newestFinished = task.id;
  user.balance = task.balance_after;
  if (task.available_after !== undefined && task.available_after !== null) {
    user.available = task.available_after;
    if (typeof user.balance === typeof user.available) user.held = user.balance - user.available;
    else user.held = BigInt(user.balance) - BigInt(user.available);
  } else if (user.held !== undefined) {
    scheduleRefresh(); // the server reports holds but this task did not say: ask
  }
  renderUser();
}

// -- history --------------------------------------------------------------------------------------

const tasks = new Map(); // id -> task
let newestFirst = true; // false: this server lists only oldest first
let cursor = null; // the id to continue from (before= when newest first, after= otherwise)
let more = false;
let reachedEnd = false; // oldest first: the last page was loaded, live tasks can be shown

function historyRow(task) {
  const what = el("td", {}, taskPhrase(task));
  const other = task.counterparty_id;
  if (other && (task.type === "transfer" || task.type === "transfer-in")) {
    what.replaceChildren(
      `${task.type === "transfer" ? "transfer to" : "transfer from"} `,
      el("a", { href: `/console/user/${encodeURIComponent(other)}`, text: `user ${other}` }),
    );
  }
  const outcome = task.status === "cancelled" ? `cancelled: ${task.reason}` : task.status;
  return el(
    "tr",
    { "data-task-id": task.id, "data-status": task.status },
    el("td", { text: task.id }),
    el("td", { text: formatDateTime(task.created_at) }),
    what,
    el("td", { class: "num", text: formatAmount(task.amount) }),
    el("td", { class: `status-${task.status}`, text: outcome, title: reasonText(task.reason) || null }),
    el("td", { class: "num", text: formatAmount(task.balance_after) }),
    el("td", { text: formatTime(task.processed_at) }),
  );
}

const HISTORY_KEEP = 1000; // rows kept while live events pile up; older ones can be loaded again
let historyQueued = false;

function queueHistory() {
  if (!historyQueued) {
    historyQueued = true;
    requestAnimationFrame(renderHistory);
  }
}

function renderHistory() {
  historyQueued = false;
  if (newestFirst && tasks.size > HISTORY_KEEP) {
    const ids = [...tasks.keys()].sort(compareIds);
    const drop = ids.length - HISTORY_KEEP;
    for (const id of ids.slice(0, drop)) tasks.delete(id);
    cursor = ids[drop]; // "Load older" continues below the oldest row kept
    more = true;
  }
  const ordered = [...tasks.values()].sort((a, b) => (newestFirst ? compareIds(b.id, a.id) : compareIds(a.id, b.id)));
  $("history-body").replaceChildren(...ordered.map(historyRow));
  $("history-empty").hidden = ordered.length > 0;
  const button = $("history-more");
  button.hidden = !more;
  button.textContent = newestFirst ? "Load older tasks" : "Load newer tasks";
}

function addTask(task) {
  if (task.user_id !== undefined && String(task.user_id) !== userId) return;
  // Oldest first, before the last page: it will come with a later page.
  if (!newestFirst && !reachedEnd && !tasks.has(task.id)) return;
  tasks.set(task.id, task);
  queueHistory();
}

async function loadHistory() {
  const query = { limit: PAGE };
  if (newestFirst) {
    query.order = "desc";
    if (cursor) query.before = cursor;
  } else {
    query.after = cursor || 0;
  }
  try {
    const { data } = await get(`/api/v1/user/${userId}/tasks`, { query });
    for (const task of data) {
      if (!tasks.has(task.id) || tasks.get(task.id).status === "pending") tasks.set(task.id, task);
    }
    if (data.length) cursor = data[data.length - 1].id;
    more = data.length === PAGE;
    reachedEnd = !more;
    renderHistory();
  } catch (error) {
    if (newestFirst && error.status === 400) {
      useOldestFirst();
      await loadHistory();
      return;
    }
    $("history-note").textContent = describeError(error);
  }
}

function useOldestFirst() {
  newestFirst = false;
  cursor = null;
  $("history-note").textContent = "Oldest first: this server does not list newest first yet.";
}

$("history-more").addEventListener("click", loadHistory);

// -- holds --------------------------------------------------------------------------------------

let holdsAvailable = true;
let holdsTimer = null;

function holdRow(hold) {
  const amountId = `capture-${hold.id}`;
  const capture = el(
    "form",
    { class: "inline", novalidate: true, "data-hold-id": hold.id },
    el("label", { for: amountId, text: "Amount (empty: all)" }),
    el("input", { id: amountId, name: "amount", inputmode: "numeric", autocomplete: "off", size: "10" }),
    el("button", { type: "submit", text: "Capture" }),
    el("button", { type: "button", class: "secondary", text: "Void", onclick: () => holdAction(hold, "void", {}) }),
  );
  capture.addEventListener("submit", (event) => {
    event.preventDefault();
    const raw = capture.elements.amount.value.trim();
    let body = {};
    try {
      if (raw) body = { amount: parseAmount(raw) };
    } catch (error) {
      showOutcome($("holds-outcome"), "error", error.message);
      return;
    }
    holdAction(hold, "capture", body);
  });
  const captured = hold.captured_amount ? ` (${formatAmount(hold.captured_amount)} captured)` : "";
  return el(
    "tr",
    { "data-hold-id": hold.id },
    el("td", { text: hold.id }),
    el("td", { class: "num", text: `${formatAmount(hold.amount)}${captured}` }),
    el("td", { text: formatDateTime(hold.expires_at) }),
    el("td", {}, capture),
  );
}

async function loadHolds() {
  if (!holdsAvailable) return;
  try {
    const { data } = await get(`/api/v1/user/${userId}/holds`, { query: { status: "active", limit: 100 } });
    $("holds-body").replaceChildren(...data.map(holdRow));
    $("holds-empty").hidden = data.length > 0;
    $("holds-section").hidden = false;
  } catch (error) {
    if (error.endpointMissing) {
      holdsAvailable = false;
      $("holds-section").hidden = true;
      unavailable("hold");
    } else if (!$("holds-section").hidden) {
      showOutcome($("holds-outcome"), "error", `The holds could not be read: ${describeError(error)}`);
    }
  }
}

function scheduleHolds() {
  clearTimeout(holdsTimer);
  holdsTimer = setTimeout(loadHolds, 300);
}

async function holdAction(hold, verb, body) {
  const outcome = $("holds-outcome");
  showOutcome(outcome, "busy", `${verb === "void" ? "Voiding" : "Capturing"} hold ${hold.id}…`);
  try {
    const { data } = await act(`/api/v1/hold/${encodeURIComponent(hold.id)}/${verb}/`, body, {
      onUnauthorized: (error) => showOutcome(outcome, "error", error.message),
    });
    const { kind, text } = describeTask(data);
    showOutcome(outcome, kind, text);
    addTask(data);
    noteFinished(data);
  } catch (error) {
    showOutcome(outcome, "error", error.endpointMissing ? `This server cannot ${verb} holds yet.` : describeError(error));
  }
  scheduleHolds();
}

// -- actions --------------------------------------------------------------------------------------

const ACTIONS = {
  replenish: {
    path: () => `/api/v1/user/${userId}/amount/`,
    body: (form) => ({ type: "replenishment", amount: parseAmount(form.elements.amount.value) }),
  },
  "write-off": {
    path: () => `/api/v1/user/${userId}/amount/`,
    body: (form) => ({ type: "write-off", amount: parseAmount(form.elements.amount.value) }),
  },
  transfer: {
    path: () => `/api/v1/user/${userId}/transfer/`,
    capability: ["POST", "/api/v1/user/{user_id}/transfer/"],
    body: (form) => {
      const to = form.elements.to.value.trim();
      if (!isUserId(to)) throw new Error("“To user” must be a user id (digits).");
      if (to === userId) throw new Error("A transfer goes to another user.");
      return { to, amount: parseAmount(form.elements.amount.value) };
    },
  },
  hold: {
    path: () => `/api/v1/user/${userId}/holds/`,
    capability: ["POST", "/api/v1/user/{user_id}/holds/"],
    body: (form) => {
      const body = { amount: parseAmount(form.elements.amount.value) };
      const expires = form.elements.expires_in.value.trim();
      if (expires) body.expires_in = Number(parseAmount(expires, { label: "Expires in" }));
      return body;
    },
  },
};

function unavailable(name) {
  const form = $(`action-${name}`);
  form.querySelector("fieldset").disabled = true;
  const note = form.querySelector(".unavailable");
  note.textContent = "Not available on this server yet.";
  note.hidden = false;
}

for (const [name, action] of Object.entries(ACTIONS)) {
  const form = $(`action-${name}`);
  const outcome = $(`${name}-outcome`);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    let body;
    try {
      body = action.body(form);
    } catch (error) {
      showOutcome(outcome, "error", error.message);
      return;
    }
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    showOutcome(outcome, "busy", "Sending…");
    try {
      const { data } = await act(action.path(), body, {
        onUnauthorized: (error) => showOutcome(outcome, "error", error.message),
      });
      const { kind, text } = describeTask(data);
      showOutcome(outcome, kind, text);
      addTask(data);
      noteFinished(data);
      if (HOLD_TYPES.has(data.type)) scheduleHolds();
    } catch (error) {
      if (error.endpointMissing) {
        unavailable(name);
        showOutcome(outcome, "error", "This server does not offer this action yet.");
      } else {
        showOutcome(outcome, "error", describeError(error));
      }
    } finally {
      button.disabled = false;
    }
  });
}

// -- start ----------------------------------------------------------------------------------------

const STREAM_STATES = {
  connecting: ["Connecting…", null],
  live: ["Live: updates as tasks finish.", "ok"],
  reconnecting: ["Connection lost: reconnecting (nothing is missed).", "warn"],
  unauthorized: ["Live updates need an API token: use the API token button.", "bad"],
  failed: ["Live updates are unavailable.", "bad"],
};

function setStreamState(state, error) {
  const [text, kind] = STREAM_STATES[state];
  const node = $("stream-state");
  const full = state === "failed" && error ? `${text} ${describeError(error)}` : text;
  if (node.textContent !== full) node.textContent = full;
  if (kind) node.dataset.kind = kind;
  else delete node.dataset.kind;
}

async function start() {
  if (!isUserId(userId)) {
    $("user-heading").textContent = "No such user";
    problem(`“${userId}” is not a user id: a user id is a whole number from 1 to 2^63−1.`);
    setStreamState("failed");
    for (const name of Object.keys(ACTIONS)) $(`action-${name}`).querySelector("fieldset").disabled = true;
    return;
  }
  $("user-heading").textContent = `User ${userId}`;
  const capabilities = await loadCapabilities();
  for (const [name, action] of Object.entries(ACTIONS)) {
    if (action.capability && !capabilities.has(...action.capability)) unavailable(name);
  }
  if (!capabilities.has("GET", "/api/v1/user/{user_id}/holds")) holdsAvailable = false;
  if (capabilities.known && !capabilities.hasParameter("GET", "/api/v1/user/{user_id}/tasks", "order")) useOldestFirst();

  // Load once the stream is live, so that nothing finishing in between is missed; or after 3 s
  // anyway, so that the page is useful even when the stream is not.
  let loaded = false;
  const load = () => {
    if (loaded) return;
    loaded = true;
    loadUser();
    loadHistory();
    loadHolds();
  };
  setTimeout(load, 3000);
  new TaskStream(`/api/v1/user/${userId}/events`, {
    onTask: (task) => {
      eventsSeen += 1;
      addTask(task);
      noteFinished(task);
      if (HOLD_TYPES.has(task.type)) scheduleHolds();
    },
    onState: (state, error) => {
      setStreamState(state, error);
      if (state === "live") load();
      if (state === "failed") {
        load();
        if (error && error.code === "user_not_found") problem(`There is no user ${userId}.`);
      }
    },
  }).start();
}

start();
