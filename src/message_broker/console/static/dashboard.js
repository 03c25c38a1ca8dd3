// The dashboard: live figures (GET /api/v1/stats every second while the tab is visible, /ready
// every 5 s), the live feed of finished tasks (the all-users event stream), finding users and
// creating one.

import {
  applyScopes,
  describeError,
  describeReady,
  el,
  formatAmount,
  formatTime,
  isUserId,
  parseAmount,
  perFrame,
  reasonText,
  setText,
  setupChrome,
  showOutcome,
  typeLabel,
  userLink,
  whileVisible,
} from "./ui.js";
import { get, newIdempotencyKey, request } from "./api.js";
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
  setText($("stat-pending"), stats.pending === null ? "unknown (the count failed)" : formatAmount(stats.pending), stats.pending === null ? "warn" : null);
  setText($("stat-p50"), milliseconds(stats.latency_ms.p50));
  setText($("stat-p99"), milliseconds(stats.latency_ms.p99));
  setText($("stat-loops"), formatAmount(stats.active_user_loops));
  setText($("stat-database"), ...upDown(stats.database));
  setText($("stat-listener"), ...upDown(stats.listener));
  statsProblems = describeReady(200, { checks: { database: stats.database, listener: stats.listener } }).problems;
  showProblems();
}

let statsProblems = [];
let readyProblems = [];

function showProblems() {
  const node = $("health-problems");
  const all = [...new Set([...statsProblems, ...readyProblems])];
  setText(node, all.length ? `Attention: ${all.join("; ")}.` : "");
  node.hidden = all.length === 0;
}

whileVisible(async () => {
  try {
    const { data } = await get("/api/v1/stats");
    renderStats(data);
    setText($("stats-state"), "Live: refreshed every second.", "ok");
  } catch (error) {
    setText($("stats-state"), `Figures unavailable: ${describeError(error)}`, "bad");
  }
}, 1000);

// /ready: the checks that fail and the background loops that are down, by name. Never needs the
// token (load balancers ask it too).
whileVisible(async () => {
  let status = 0;
  let body = null;
  try {
    const response = await fetch("/ready", { cache: "no-store", credentials: "omit" });
    status = response.status;
    body = await response.json();
  } catch {
    readyProblems = ["the service does not answer /ready"];
    setText($("stat-background"), "unknown", "warn");
    showProblems();
    return;
  }
  const { problems, down } = describeReady(status, body);
  readyProblems = problems;
  if (down.length) setText($("stat-background"), `down: ${down.join(", ")}`, "bad");
  else setText($("stat-background"), ...(body && body.checks && body.checks.background === false ? ["down", "bad"] : ["running", "ok"]));
  showProblems();
}, 5000);

// -- the live feed ------------------------------------------------------------------------------

const FEED_KEEP = 200;
const FEED_SHOW = 100;
let feed = []; // newest first
let held = []; // arrived while paused, newest first
let heldCount = 0;
let paused = false;

// A transfer's other side, or the hold a capture, void or release resolves.
function feedDetail(task) {
  const other = task.counterparty_id;
  if (other && (task.type === "transfer" || task.type === "transfer-in")) {
    return el("span", { class: "detail" }, task.type === "transfer" ? " to " : " from ", userLink(other));
  }
  if (task.hold_id) return el("span", { class: "detail", text: ` (hold ${task.hold_id})` });
  return null;
}

function feedRow(task) {
  const outcome = task.status === "cancelled" ? `cancelled: ${task.reason}` : task.status;
  return el(
    "tr",
    { "data-task-id": task.id, "data-status": task.status, "data-type": task.type },
    el("td", { "data-label": "Finished", text: formatTime(task.processed_at) }),
    el("td", { "data-label": "Task", text: task.id }),
    el("td", { "data-label": "User" }, userLink(task.user_id, task.user_id)),
    el("td", { "data-label": "Type" }, typeLabel(task.type), feedDetail(task)),
    el("td", { class: "num", "data-label": "Amount", text: formatAmount(task.amount) }),
    el("td", { class: `status-${task.status}`, "data-label": "Outcome", text: outcome, title: reasonText(task.reason) || null }),
    el("td", { class: "num", "data-label": "Balance after", text: formatAmount(task.balance_after) }),
  );
}

function renderFeed() {
  const type = $("feed-type").value;
  const status = $("feed-status").value;
  const shown = feed.filter((t) => (!type || t.type === type) && (!status || t.status === status)).slice(0, FEED_SHOW);
  $("feed-body").replaceChildren(...shown.map(feedRow));
  $("feed-empty").hidden = shown.length > 0;
  if (feed.length && !shown.length) $("feed-empty").textContent = "No task in the feed matches the filter.";
  else $("feed-empty").textContent = "No task has finished since this page opened.";
}

const queueRender = perFrame(renderFeed);

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
  onGap: () => {
    // The server could not resume from the last task shown (too long ago): the feed goes on
    // from now, and says that it may have missed some.
    const note = $("feed-gap-note");
    note.textContent = `Reconnected at ${formatTime(new Date().toISOString())}: tasks that finished while the feed was away are not in it (each user's page has them).`;
    note.hidden = false;
  },
  onState: (state, error) => {
    const [text, kind] = FEED_STATES[state];
    setText($("feed-state"), error && state === "failed" ? `${text} ${describeError(error)}` : text, kind);
  },
}).start();

// -- users --------------------------------------------------------------------------------------

const PAGE = 20;
let search = null; // {kind: "all" | "prefix", query, cursors: [cursor of each page shown], next}

function userRow(user) {
  return el(
    "tr",
    { "data-user-id": user.id },
    el("td", { "data-label": "Id" }, userLink(user.id, user.id)),
    el("td", { "data-label": "Username" }, userLink(user.id, user.username)),
    el("td", { class: "num", "data-label": "Balance", text: formatAmount(user.balance) }),
    el("td", { class: "num", "data-label": "Held", text: formatAmount(user.held) }),
    el("td", { class: "num", "data-label": "Available", text: formatAmount(user.available) }),
  );
}

function showUsers(users, message, kind = "done") {
  $("users-body").replaceChildren(...users.map(userRow));
  $("users-table").hidden = users.length === 0;
  showOutcome($("search-state"), kind, message);
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
    showUsers([], describeError(error), "error");
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
      showUsers([], "A user id is a whole number from 1 to 2^63−1.", "error");
      return;
    }
    try {
      const { data } = await get(`/api/v1/user/${query}`);
      showUsers([data], `User ${data.id} found.`);
    } catch (error) {
      if (error.code === "user_not_found") showUsers([], `There is no user ${query}.`);
      else showUsers([], describeError(error), "error");
    }
    return;
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
      userLink(data.id, `Open user ${data.id}`),
    );
    search = null;
    pager();
    showUsers([data], `User ${data.id} created.`);
    event.target.reset();
  } catch (error) {
    showOutcome(outcome, "error", describeError(error));
  } finally {
    button.disabled = false;
    applyScopes(event.target);
  }
});
