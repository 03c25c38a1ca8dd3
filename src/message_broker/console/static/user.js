// One user's page, /console/user/<id>: balance, held and available, the history (newest first),
// the holds, and the actions (replenish, write off, transfer, place a hold; capture or void a
// hold), kept current by the user's event stream without a reload.

import { act, get } from "./api.js";
import {
  applyScopes,
  describeError,
  describeTask,
  el,
  formatAmount,
  formatDateTime,
  formatTime,
  formatWhen,
  isUserId,
  parseAmount,
  perFrame,
  reasonText,
  setText,
  setupChrome,
  showOutcome,
  taskPhrase,
  userLink,
} from "./ui.js";
import { TaskStream } from "./sse.js";

const $ = (id) => document.getElementById(id);
const PAGE = 50;
const HOLDS_PAGE = 100;
// What a done capture, void or release makes of its hold.
const RESOLVES = { capture: "captured", void: "voided", release: "expired" };

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

// a - b for whole numbers that may be Numbers or BigInts (past 2^53).
function minus(a, b) {
  return typeof a === "number" && typeof b === "number" ? a - b : BigInt(a) - BigInt(b);
}

// -- balance, held, available ---------------------------------------------------------------------

let user = null;
let eventsSeen = 0;
let refreshTimer = null;
// Tasks the event stream has delivered, in the order they were applied: an action's answer about
// one of them is no news (the stream has told as much, or newer). The oldest are forgotten.
const streamed = new Set();
const STREAMED_KEEP = 5000;

function renderUser() {
  if (!user) return;
  $("user-heading").textContent = `User ${user.id}`;
  document.title = `User ${user.id} (${user.username}) · message_broker console`;
  $("user-name").textContent = user.username;
  $("user-balance").textContent = formatAmount(user.balance);
  $("user-held").textContent = formatAmount(user.held);
  $("user-available").textContent = formatAmount(user.available);
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
    showActions(true);
    renderUser();
  } catch (error) {
    if (error.code === "user_not_found") noSuchUser();
    else problem(describeError(error));
  }
}

// Forms to act on a user who does not exist would only ever answer 404: hide them.
function showActions(shown) {
  $("actions-section").hidden = !shown;
  $("holds-section").hidden = !shown;
}

function noSuchUser() {
  problem(`There is no user ${userId}.`);
  showActions(false);
}

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(loadUser, 400);
}

// A finished task of this user: its balance_after and available_after are the user's as of it.
// The event stream delivers them in the order they were applied, so each event is the newest
// state; an action's answer may arrive before or after the stream's event for the same task.
function noteBalance(task, fromStream) {
  if (!user || task.status === "pending" || task.balance_after === null || task.balance_after === undefined) return;
  if (!fromStream && streamed.has(task.id)) return;
  user.balance = task.balance_after;
  user.available = task.available_after;
  user.held = minus(task.balance_after, task.available_after);
  renderUser();
}

// -- history --------------------------------------------------------------------------------------

const tasks = new Map(); // id -> task
let cursor = null; // the oldest id shown: "Load older" asks for tasks before it
let more = false;

function historyRow(task) {
  const what = el("td", { class: "wide", "data-label": "What" }, taskPhrase(task));
  const other = task.counterparty_id;
  if (other && (task.type === "transfer" || task.type === "transfer-in")) {
    what.replaceChildren(
      `${task.type === "transfer" ? "transfer to" : "transfer from"} `,
      userLink(other),
    );
  }
  const outcome = task.status === "cancelled" ? `cancelled: ${task.reason}` : task.status;
  return el(
    "tr",
    { "data-task-id": task.id, "data-status": task.status, "data-type": task.type },
    el("td", { "data-label": "Task", text: task.id }),
    el("td", { "data-label": "Created", text: formatWhen(task.created_at), title: formatDateTime(task.created_at) }),
    what,
    el("td", { class: "num", "data-label": "Amount", text: formatAmount(task.amount) }),
    el("td", { class: `status-${task.status}`, "data-label": "Outcome", text: outcome, title: reasonText(task.reason) || null }),
    el("td", { class: "num", "data-label": "Balance after", text: formatAmount(task.balance_after) }),
    el("td", { class: "num", "data-label": "Available after", text: formatAmount(task.available_after) }),
    el("td", { "data-label": "Finished", text: formatTime(task.processed_at) }),
    // The token that posted it (null: the server asked for none).
    el("td", { class: "by", "data-label": "By", text: task.created_by ?? "–" }),
  );
}

const HISTORY_KEEP = 1000; // rows kept while live events pile up; older ones can be loaded again

function renderHistory() {
  if (tasks.size > HISTORY_KEEP) {
    const ids = [...tasks.keys()].sort(compareIds);
    const drop = ids.length - HISTORY_KEEP;
    for (const id of ids.slice(0, drop)) tasks.delete(id);
    cursor = ids[drop]; // "Load older" continues below the oldest row kept
    more = true;
  }
  const ordered = [...tasks.values()].sort((a, b) => compareIds(b.id, a.id));
  $("history-body").replaceChildren(...ordered.map(historyRow));
  $("history-empty").hidden = ordered.length > 0;
  $("history-more").hidden = !more;
}

const queueHistory = perFrame(renderHistory);

// A task into the history, unless it is an older answer: a pending one about a task known
// finished. Whether it went in.
function merge(task) {
  const known = tasks.get(task.id);
  if (known && known.status !== "pending" && task.status === "pending") return false;
  tasks.set(task.id, task);
  return true;
}

function addTask(task) {
  if (String(task.user_id) === userId && merge(task)) queueHistory();
}

// The next older page, or (newest) the newest page again, merged into what is shown.
async function loadHistory({ newest = false } = {}) {
  const query = { order: "desc", limit: PAGE };
  if (cursor && !newest) query.before = cursor;
  try {
    const { data } = await get(`/api/v1/user/${userId}/tasks`, { query });
    for (const task of data) merge(task);
    if (!newest || cursor === null) {
      if (data.length) cursor = data[data.length - 1].id;
      more = data.length === PAGE;
    }
    $("history-note").textContent = "";
    renderHistory();
  } catch (error) {
    $("history-note").textContent = `The history could not be read: ${describeError(error)}`;
  }
}

$("history-more").addEventListener("click", () => loadHistory());

// -- holds --------------------------------------------------------------------------------------

// id -> hold: the active ones, and those resolved while this page is open (shown with how they
// ended). Kept current by the stream: a done hold task adds one, a done capture, void or
// release resolves one.
const holds = new Map();
let holdsTruncated = false;

function holdStatus(hold) {
  const by = hold.resolved_by ? ` (task ${hold.resolved_by})` : "";
  if (hold.status === "captured") return `captured ${formatAmount(hold.captured_amount)}${by}`;
  if (hold.status === "expired") return `expired: released${by}`;
  return `${hold.status}${by}`;
}

function holdControls(hold) {
  const amountId = `capture-${hold.id}`;
  const form = el(
    "form",
    { class: "inline", novalidate: true, "data-hold-id": hold.id, "data-scope": "write" },
    el("label", { for: amountId, class: "visually-hidden", text: `Amount to capture from hold ${hold.id} (empty: all of it)` }),
    el("input", { id: amountId, name: "amount", inputmode: "numeric", autocomplete: "off", placeholder: "all" }),
    el("button", { type: "submit", text: "Capture", "aria-label": `Capture hold ${hold.id}` }),
    el("button", { type: "button", class: "secondary", text: "Void", "aria-label": `Void hold ${hold.id}` }),
  );
  const buttons = [...form.querySelectorAll("button")];
  const run = async (verb, body) => {
    for (const button of buttons) button.disabled = true;
    await holdAction(hold.id, verb, body);
    for (const button of buttons) button.disabled = false;
    applyScopes(form);
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const raw = form.elements.amount.value.trim();
    let body = {};
    try {
      if (raw) body = { amount: parseAmount(raw, { label: "The amount to capture" }) };
    } catch (error) {
      showOutcome($("holds-outcome"), "error", error.message);
      return;
    }
    run("capture", body);
  });
  buttons[1].addEventListener("click", () => run("void", {}));
  applyScopes(form);
  return form;
}

function holdRow(hold) {
  const active = hold.status === "active";
  return el(
    "tr",
    { "data-hold-id": hold.id, "data-status": hold.status },
    el("td", { "data-label": "Hold", text: hold.id }),
    el("td", { class: "num", "data-label": "Amount", text: formatAmount(hold.amount) }),
    el("td", { "data-label": "Expires", text: formatWhen(hold.expires_at, { ms: false }), title: formatDateTime(hold.expires_at) }),
    el("td", { class: active ? "status-active" : "status-resolved", "data-label": "Status", text: holdStatus(hold) }),
    el("td", { class: "wide" }, active ? holdControls(hold) : null),
  );
}

function renderHolds() {
  // A row being typed in is kept as it is (re-rendering would lose the amount and the focus).
  const body = $("holds-body");
  const existing = new Map([...body.children].map((row) => [row.dataset.holdId, row]));
  const rows = [...holds.values()].sort((a, b) => compareIds(a.id, b.id)).map((hold) => {
    const row = existing.get(hold.id);
    return row && row.dataset.status === hold.status ? row : holdRow(hold);
  });
  body.replaceChildren(...rows);
  const active = [...holds.values()].filter((hold) => hold.status === "active").length;
  $("holds-table").hidden = rows.length === 0;
  $("holds-empty").hidden = active > 0;
  $("holds-more").hidden = !holdsTruncated;
}

const queueHolds = perFrame(renderHolds);

async function loadHolds() {
  try {
    const { data } = await get(`/api/v1/user/${userId}/holds`, { query: { status: "active", limit: HOLDS_PAGE } });
    const active = new Set(data.map((hold) => hold.id));
    for (const [id, hold] of holds) if (hold.status === "active" && !active.has(id)) holds.delete(id);
    for (const hold of data) holds.set(hold.id, hold);
    holdsTruncated = data.length === HOLDS_PAGE;
    renderHolds();
  } catch (error) {
    showOutcome($("holds-outcome"), "error", `The holds could not be read: ${describeError(error)}`);
  }
}

function noteHold(task) {
  if (task.status !== "done") return;
  if (task.type === "hold") {
    if (holds.has(task.id)) return; // known already (and perhaps resolved since)
    holds.set(task.id, {
      id: task.id,
      user_id: task.user_id,
      amount: task.amount,
      status: "active",
      captured_amount: null,
      expires_at: task.expires_at,
      resolved_by: null,
    });
  } else if (RESOLVES[task.type] && task.hold_id && holds.has(task.hold_id)) {
    const hold = holds.get(task.hold_id);
    holds.set(task.hold_id, {
      ...hold,
      status: RESOLVES[task.type],
      captured_amount: task.type === "capture" ? task.amount : null,
      resolved_by: task.id,
    });
    if (task.type === "release" && hold.status === "active") {
      $("holds-note").textContent = `Hold ${task.hold_id} expired: ${formatAmount(task.amount)} released (task ${task.id}).`;
    }
  } else {
    return;
  }
  queueHolds();
}

async function holdAction(holdId, verb, body) {
  const outcome = $("holds-outcome");
  showOutcome(outcome, "busy", `${verb === "void" ? "Voiding" : "Capturing"} hold ${holdId}…`);
  await send(outcome, `/api/v1/hold/${encodeURIComponent(holdId)}/${verb}/`, body, (error) =>
    error.code === "hold_not_found" ? noHold(error, holdId) : describeError(error),
  );
}

// 404 hold_not_found: no task has that id, or the API says which kind of task it is instead.
function noHold(error, holdId) {
  const other = /^task \d+ is an? [a-z-]+, not a hold$/.test(error.message || "");
  return other ? `${error.message[0].toUpperCase()}${error.message.slice(1)}.` : `There is no hold ${holdId}.`;
}

// Capture or void a hold by its id (one not listed: beyond the first page, or from elsewhere).
// Only this user's: the hold is read first.
function holdByIdAction(verb) {
  const form = $("hold-by-id");
  const outcome = $("holds-outcome");
  return async (event) => {
    if (event) event.preventDefault();
    const holdId = form.elements.hold.value.trim();
    let body = {};
    try {
      if (!isUserId(holdId)) throw new Error("The hold id is a whole number (the id of the hold's task).");
      const raw = form.elements.amount.value.trim();
      if (raw && verb === "capture") body = { amount: parseAmount(raw, { label: "The amount to capture" }) };
    } catch (error) {
      showOutcome(outcome, "error", error.message);
      return;
    }
    const id = BigInt(holdId).toString();
    try {
      const { data: hold } = await get(`/api/v1/hold/${id}`);
      if (String(hold.user_id) !== userId) {
        outcome.dataset.kind = "error";
        outcome.replaceChildren(`Hold ${id} belongs to `, userLink(hold.user_id), ": capture or void it on that user's page.");
        return;
      }
    } catch (error) {
      showOutcome(outcome, "error", error.code === "hold_not_found" ? noHold(error, id) : describeError(error));
      return;
    }
    await holdAction(id, verb, body);
  };
}

$("hold-by-id").addEventListener("submit", holdByIdAction("capture"));
$("hold-by-id-void").addEventListener("click", holdByIdAction("void"));

// -- actions --------------------------------------------------------------------------------------

// Send an action and show in `outcome` what came of it: the task, or what went wrong (in the
// words of `failure`).
async function send(outcome, path, body, failure = describeError) {
  try {
    const { data } = await act(path, body, {
      onUnauthorized: (error) => showOutcome(outcome, "error", error.message),
    });
    const { kind, text } = describeTask(data);
    showOutcome(outcome, kind, text);
    finished(data, false);
  } catch (error) {
    showOutcome(outcome, "error", failure(error));
  }
}

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
    body: (form) => {
      const to = form.elements.to.value.trim();
      if (!isUserId(to)) throw new Error("“To user” must be a user id (digits).");
      if (BigInt(to).toString() === userId) throw new Error("A transfer goes to another user.");
      return { to: BigInt(to).toString(), amount: parseAmount(form.elements.amount.value) };
    },
  },
  hold: {
    path: () => `/api/v1/user/${userId}/holds/`,
    body: (form) => {
      const body = { amount: parseAmount(form.elements.amount.value) };
      const expires = form.elements.expires_in.value.trim();
      if (expires) body.expires_in = Number(parseAmount(expires, { label: "Expires in", max: 2592000n }));
      return body;
    },
  },
};

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
      await send(outcome, action.path(), body);
    } finally {
      button.disabled = false;
      applyScopes(form);
    }
  });
}

// A task of this user, from the stream or from an action's answer.
function finished(task, fromStream) {
  addTask(task);
  noteBalance(task, fromStream);
  noteHold(task);
}

// -- balance at a time, statements ---------------------------------------------------------------

const RFC3339 = /^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$/;

// An instant for the API from what the operator typed: RFC 3339 as is, anything else the
// browser reads as a date (a time without an offset: local time), else an Error.
function instant(text, label) {
  const value = text.trim();
  if (RFC3339.test(value)) return value;
  const parsed = value ? new Date(value) : null;
  if (!parsed || Number.isNaN(parsed.getTime())) {
    throw new Error(`${label} must be a date and time, such as 2026-11-30T23:59:59Z.`);
  }
  return parsed.toISOString();
}

$("balance-at-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const outcome = $("balance-at-outcome");
  let at;
  try {
    at = instant($("balance-at-time").value, "Time");
  } catch (error) {
    showOutcome(outcome, "error", error.message);
    return;
  }
  showOutcome(outcome, "busy", "Looking up…");
  try {
    const { data } = await get(`/api/v1/user/${userId}/balance`, { query: { at }, interactive: true });
    const after = data.last_task_id ? `after task ${data.last_task_id}` : "the opening balance";
    showOutcome(
      outcome,
      "done",
      `At ${formatDateTime(data.at)}: balance ${formatAmount(data.balance)}, held ${formatAmount(data.held)}, ` +
        `available ${formatAmount(data.available)} (${after}).`,
    );
    outcome.dataset.balance = String(data.balance);
  } catch (error) {
    const created = error.details && error.details.created_at;
    showOutcome(outcome, "error", created ? `The user was created later, at ${formatDateTime(created)}.` : describeError(error));
  }
});

function statementQuery() {
  const query = { from: instant($("statement-from").value, "From") };
  if ($("statement-to").value.trim()) query.to = instant($("statement-to").value, "To");
  return query;
}

$("statement-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const outcome = $("statement-outcome");
  let query;
  try {
    query = statementQuery();
  } catch (error) {
    showOutcome(outcome, "error", error.message);
    return;
  }
  showOutcome(outcome, "busy", "Loading…");
  try {
    const { data } = await get(`/api/v1/user/${userId}/statement`, { query, interactive: true });
    setText($("statement-opening"), formatAmount(data.opening.balance));
    setText($("statement-credits"), formatAmount(data.totals.credits));
    setText($("statement-debits"), formatAmount(data.totals.debits));
    setText($("statement-closing"), formatAmount(data.closing.balance));
    setText($("statement-closing-held"), formatAmount(data.closing.held));
    setText($("statement-entries"), `${data.entries.length} (${data.totals.done}, ${data.totals.cancelled})`);
    $("statement-summary").hidden = false;
    showOutcome(outcome, "done", `Statement from ${formatDateTime(data.from)} to ${formatDateTime(data.to)}.`);
  } catch (error) {
    showOutcome(outcome, "error", describeError(error));
  }
});

// The CSV comes through the API client (it carries the token, which a plain link cannot), then
// is saved under the name the server gives.
$("statement-csv").addEventListener("click", async () => {
  const outcome = $("statement-outcome");
  let query;
  try {
    query = statementQuery();
  } catch (error) {
    showOutcome(outcome, "error", error.message);
    return;
  }
  showOutcome(outcome, "busy", "Preparing the CSV…");
  try {
    const { text, headers } = await get(`/api/v1/user/${userId}/statement`, {
      query,
      accept: "text/csv",
      interactive: true,
    });
    const named = /filename="([^"]+)"/.exec(headers.get("Content-Disposition") || "");
    const link = $("statement-download");
    if (link.href) URL.revokeObjectURL(link.href);
    link.href = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
    link.download = named ? named[1] : `user-${userId}-statement.csv`;
    link.textContent = link.download;
    link.click();
    showOutcome(outcome, "done", `Downloaded ${link.download}.`);
  } catch (error) {
    showOutcome(outcome, "error", describeError(error));
  }
});

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
  setText($("stream-state"), state === "failed" && error ? `${text} ${describeError(error)}` : text, kind);
}

function start() {
  if (!isUserId(userId)) {
    $("user-heading").textContent = "No such user";
    problem(`“${userId}” is not a user id: a user id is a whole number from 1 to 2^63−1.`);
    setStreamState("failed");
    for (const fieldset of document.querySelectorAll("main fieldset")) fieldset.disabled = true;
    showActions(false);
    return;
  }
  $("user-heading").textContent = `User ${userId}`;

  // Load once the stream is live, so that nothing finishing in between is missed; or after 3 s
  // anyway, so that the page is useful even when the stream is not.
  let loaded = false;
  let gap = false;
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
      streamed.add(task.id);
      if (streamed.size > STREAMED_KEEP) streamed.delete(streamed.values().next().value);
      finished(task, true);
    },
    onGap: () => {
      gap = true;
    },
    onState: (state, error) => {
      setStreamState(state, error);
      if (state === "live" && gap && loaded) {
        // The stream could not resume where it left off: read afresh what may have been missed.
        gap = false;
        loadUser();
        loadHistory({ newest: true });
        loadHolds();
      }
      if (state === "live") load();
      if (state === "failed") {
        load();
        if (error && error.code === "user_not_found") noSuchUser();
      }
    },
  }).start();
}

start();
