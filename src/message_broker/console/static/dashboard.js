// The dashboard: live figures (GET /api/v1/stats every second while the tab is visible, /ready
// every 10 s), the live feed of finished tasks (the all-users event stream), finding users and
// creating one.

import { describeError, el, formatAmount, formatTime, isUserId, parseAmount, reasonText, setupChrome, showOutcome, whileVisible } from "./ui.js";
import { ApiError, get, loadCapabilities, newIdempotencyKey, request } from "./api.js";
import { LineChart } from "./chart.js";
import { TaskStream } from "./sse.js";

const $ = (id) => document.getElementById(id);

setupChrome();

// -- figures ------------------------------------------------------------------------------------

const chart = new LineChart($("rate-chart"), {
  title: "Tasks per second over the last 5 minutes",
  windowSeconds: 300,
  series: [
    { key: "accepted", label: "Accepted", className: "s-accepted" },
    { key: "applied", label: "Applied", className: "s-applied" },
    { key: "cancelled", label: "Cancelled", className: "s-cancelled" },
  ],
});

// Text changes only when it differs, so that a status line read by screen readers is not
// announced again every second.
function setText(id, text, kind = null) {
  const node = $(id);
  if (node.textContent !== text) node.textContent = text;
  if (kind) node.dataset.kind = kind;
  else delete node.dataset.kind;
}


function milliseconds(value) {
  return value === null || value === undefined ? "no tasks yet" : `${Number(value).toFixed(2)} ms`;
}

function upDown(up) {
  return up ? ["up", "ok"] : ["down", "bad"];
}

function renderStats(stats) {
  // The last second of each series is still counting: the chart ends at the last complete one.
  const complete = Object.fromEntries(Object.entries(stats.series).map(([name, counts]) => [name, counts.slice(0, -1)]));
  chart.windowSeconds = stats.window_seconds || 300;
  chart.update(complete);
  setText("stat-pending", stats.pending === null ? "unknown (the count failed)" : formatAmount(stats.pending), stats.pending === null ? "warn" : null);
  setText("stat-p50", milliseconds(stats.latency_ms.p50));
  setText("stat-p99", milliseconds(stats.latency_ms.p99));
  setText("stat-loops", formatAmount(stats.active_user_loops));
  setText("stat-database", ...upDown(stats.database));
  setText("stat-listener", ...upDown(stats.listener));
  statsProblems = [];
  if (!stats.database) statsProblems.push("the database does not answer");
  if (!stats.listener) statsProblems.push("the LISTEN connection is down: tasks are applied only by the sweeps");
  showProblems();
}

let statsProblems = [];
let readyProblems = [];

function showProblems() {
  const node = $("health-problems");
  const all = [...new Set([...statsProblems, ...readyProblems])];
  const text = all.length ? `Attention: ${all.join("; ")}.` : "";
  if (node.textContent !== text) node.textContent = text;
  node.hidden = all.length === 0;
}

whileVisible(async () => {
  try {
    const { data } = await get("/api/v1/stats");
    renderStats(data);
    setText("stats-state", "Live: refreshed every second.", "ok");
  } catch (error) {
    setText("stats-state", `Figures unavailable: ${describeError(error)}`, "bad");
  }
}, 1000);

// /ready lists what is down (the listener, the database, and background loops once the server
// reports them): every check that is not true is named.
whileVisible(async () => {
  try {
    const response = await fetch("/ready", { cache: "no-store", credentials: "omit" });
    const body = await response.json();
    const problems = [];
    for (const [name, value] of Object.entries(body.checks || {})) {
      if (value === false) problems.push(`${name} is down`);
      else if (value && typeof value === "object" && value.ok === false) problems.push(`${name} is down`);
    }
    for (const key of ["down", "loops_down", "background_down"]) {
      const value = body[key] || (body.details && body.details[key]);
      if (Array.isArray(value)) for (const name of value) problems.push(`background loop ${name} is down`);
    }
    if (!response.ok && problems.length === 0) problems.push(`the service is not ready (${body.status || response.status})`);
    readyProblems = problems;
  } catch {
    readyProblems = ["the service does not answer /ready"];
  }
  showProblems();
}, 10000);

// -- the live feed ------------------------------------------------------------------------------

const FEED_KEEP = 200;
const FEED_SHOW = 100;
let feed = []; // newest first
let held = []; // arrived while paused, newest first
let heldCount = 0;
let paused = false;
let renderQueued = false;

function feedRow(task) {
  const outcome = task.status === "cancelled" ? `cancelled: ${task.reason}` : task.status;
  return el(
    "tr",
    { "data-task-id": task.id, "data-status": task.status },
    el("td", { text: formatTime(task.processed_at) }),
    el("td", { text: task.id }),
    el("td", {}, el("a", { href: `/console/user/${encodeURIComponent(task.user_id)}`, text: task.user_id })),
    el("td", { text: task.type }),
    el("td", { class: "num", text: formatAmount(task.amount) }),
    el("td", { class: `status-${task.status}`, text: outcome, title: reasonText(task.reason) || null }),
    el("td", { class: "num", text: formatAmount(task.balance_after) }),
  );
}

function renderFeed() {
  renderQueued = false;
  const type = $("feed-type").value;
  const status = $("feed-status").value;
  const shown = feed.filter((t) => (!type || t.type === type) && (!status || t.status === status)).slice(0, FEED_SHOW);
  $("feed-body").replaceChildren(...shown.map(feedRow));
  $("feed-empty").hidden = shown.length > 0;
  if (feed.length && !shown.length) $("feed-empty").textContent = "No task in the feed matches the filter.";
  else $("feed-empty").textContent = "No task has finished since this page opened.";
}

function queueRender() {
  if (!renderQueued) {
    renderQueued = true;
    requestAnimationFrame(renderFeed);
  }
}

function onTask(task) {
  if (paused) {
    held.unshift(task);
    if (held.length > FEED_KEEP) held.length = FEED_KEEP;
    heldCount += 1;
    $("feed-paused-note").textContent = `Paused: ${heldCount} new task${heldCount === 1 ? "" : "s"} waiting.`;
    return;
  }
  feed.unshift(task);
  if (feed.length > FEED_KEEP) feed.length = FEED_KEEP;
  queueRender();
}

$("feed-pause").addEventListener("click", () => {
  paused = !paused;
  const button = $("feed-pause");
  button.setAttribute("aria-pressed", String(paused));
  button.textContent = paused ? "Resume" : "Pause";
  $("feed-paused-note").hidden = !paused;
  if (paused) {
    heldCount = 0;
    $("feed-paused-note").textContent = "Paused: new tasks are kept aside.";
  } else {
    feed = [...held, ...feed].slice(0, FEED_KEEP);
    held = [];
    queueRender();
  }
});
$("feed-type").addEventListener("change", renderFeed);
$("feed-status").addEventListener("change", renderFeed);
$("feed-controls").addEventListener("submit", (event) => event.preventDefault());

const FEED_STATES = {
  connecting: ["Connecting…", null],
  live: ["Live.", "ok"],
  reconnecting: ["Connection lost: reconnecting (nothing is missed).", "warn"],
  unauthorized: ["The feed needs an API token: use the API token button.", "bad"],
  failed: ["The feed is unavailable.", "bad"],
};

new TaskStream("/api/v1/events", {
  onTask,
  onState: (state, error) => {
    const [text, kind] = FEED_STATES[state];
    setText("feed-state", error && state === "failed" ? `${text} ${describeError(error)}` : text, kind);
  },
}).start();

// -- users --------------------------------------------------------------------------------------

const PAGE = 20;
let search = null; // {kind: "all" | "prefix", query, cursors: [cursor of each page shown], next}

function userRow(user, withAvailable) {
  const href = `/console/user/${encodeURIComponent(user.id)}`;
  return el(
    "tr",
    { "data-user-id": user.id },
    el("td", {}, el("a", { href, text: user.id })),
    el("td", {}, el("a", { href, text: user.username })),
    el("td", { class: "num", text: formatAmount(user.balance) }),
    withAvailable && el("td", { class: "num", text: formatAmount(user.available) }),
  );
}

function showUsers(users, message) {
  // Available (balance less holds) once the server reports it.
  const withAvailable = users.some((user) => user.available !== undefined);
  $("users-available").hidden = !withAvailable;
  $("users-body").replaceChildren(...users.map((user) => userRow(user, withAvailable)));
  $("users-table").hidden = users.length === 0;
  showOutcome($("search-state"), "done", message);
}

function pager() {
  $("users-prev").hidden = !search || search.cursors.length <= 1;
  $("users-next").hidden = !search || !search.next;
}

async function loadPage(cursor) {
  const query = { limit: PAGE };
  if (search.kind === "all") query.after = cursor || 0;
  else {
    query.username_prefix = search.query;
    if (cursor) query.after_username = cursor;
  }
  showOutcome($("search-state"), "busy", "Searching…");
  try {
    const { data } = await get("/api/v1/user/", { query });
    const last = data[data.length - 1];
    search.next = data.length === PAGE ? (search.kind === "all" ? last.id : last.username) : null;
    const what = search.kind === "all" ? "users" : `users whose name starts with “${search.query}”`;
    const page = search.cursors.length;
    showUsers(data, data.length ? `Page ${page}: ${data.length} ${what}.` : `No ${what}.`);
  } catch (error) {
    search.next = null;
    if (search.kind === "prefix" && error instanceof ApiError && error.status === 400) {
      showUsers([], "Finding users by username needs a newer server. Search by id, or list every user (empty search).");
    } else {
      showUsers([], describeError(error));
    }
  }
  pager();
}

$("user-search").addEventListener("submit", async (event) => {
  event.preventDefault();
  const query = $("search-input").value.trim();
  if (/^\d+$/.test(query)) {
    search = null;
    pager();
    if (!isUserId(query)) {
      showUsers([], "A user id is a whole number from 1 to 2^63−1.");
      return;
    }
    try {
      const { data } = await get(`/api/v1/user/${query}`);
      showUsers([data], `User ${data.id} found.`);
    } catch (error) {
      showUsers([], error.code === "user_not_found" ? `There is no user ${query}.` : describeError(error));
    }
    return;
  }
  if (query) {
    const capabilities = await loadCapabilities();
    if (capabilities.known && !capabilities.hasParameter("GET", "/api/v1/user/", "username_prefix")) {
      search = null;
      pager();
      showUsers([], "Finding users by username needs a newer server. Search by id, or list every user (empty search).");
      return;
    }
  }
  search = { kind: query ? "prefix" : "all", query, cursors: [null], next: null };
  await loadPage(null);
});

$("users-next").addEventListener("click", async () => {
  if (!search || !search.next) return;
  search.cursors.push(search.next);
  await loadPage(search.next);
});

$("users-prev").addEventListener("click", async () => {
  if (!search || search.cursors.length <= 1) return;
  search.cursors.pop();
  await loadPage(search.cursors[search.cursors.length - 1]);
});

$("create-user").addEventListener("submit", async (event) => {
  event.preventDefault();
  const outcome = $("create-outcome");
  const username = $("new-username").value;
  let balance;
  try {
    if (!username.trim()) throw new Error("Enter a username.");
    balance = parseAmount($("new-balance").value || "0", { min: 0n, label: "Initial balance" });
  } catch (error) {
    showOutcome(outcome, "error", error.message);
    return;
  }
  const button = event.submitter || event.target.querySelector("button[type=submit]");
  button.disabled = true;
  showOutcome(outcome, "busy", "Creating…");
  try {
    const { data } = await request("POST", "/api/v1/user/", {
      body: { username, balance },
      idempotencyKey: newIdempotencyKey(),
      interactive: true,
      onUnauthorized: (error) => showOutcome(outcome, "error", error.message),
    });
    outcome.dataset.kind = "done";
    outcome.replaceChildren(
      `Created user ${data.id} (${data.username}) with balance ${formatAmount(data.balance)}. `,
      el("a", { href: `/console/user/${encodeURIComponent(data.id)}`, text: `Open user ${data.id}` }),
    );
    search = null;
    pager();
    showUsers([data], `User ${data.id} created.`);
    event.target.reset();
  } catch (error) {
    showOutcome(outcome, "error", describeError(error));
  } finally {
    button.disabled = false;
  }
});
