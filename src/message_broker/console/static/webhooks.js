// The webhooks page, /console/webhooks: every endpoint with its deliveries by status, and the
// latest failed deliveries with their last error and a button that sends one again.

import { get, request } from "./api.js";
import { describeError, el, formatAmount, formatDateTime, setText, setupChrome, showOutcome, whileVisible } from "./ui.js";

const $ = (id) => document.getElementById(id);
const FAILURES_PER_ENDPOINT = 10;

setupChrome();

function statusText(hook) {
  return hook.status === "enabled" ? "enabled" : `disabled (${hook.disabled_reason})`;
}

function endpointRow(hook) {
  const counts = hook.deliveries || { pending: 0, delivered: 0, failed: 0 };
  return el(
    "tr",
    { "data-webhook-id": hook.id },
    el("td", { text: hook.id }),
    el("td", { class: "wrap", text: hook.url }),
    el("td", { text: hook.events.join(", ") }),
    el("td", { text: statusText(hook), "data-kind": hook.status === "enabled" ? "done" : "cancelled" }),
    el("td", { class: "num", text: formatAmount(counts.pending) }),
    el("td", { class: "num", text: formatAmount(counts.delivered) }),
    el("td", { class: "num", text: formatAmount(counts.failed) }),
  );
}

function lastError(delivery) {
  const last = delivery.attempts[delivery.attempts.length - 1];
  if (!last) return "–";
  const status = last.http_status === null ? "" : `HTTP ${last.http_status}: `;
  return `${formatDateTime(last.attempted_at)} · ${status}${last.error || ""}`;
}

function failureRow(hook, delivery) {
  const button = el("button", { type: "button", text: "Retry now", "aria-label": `Retry delivery ${delivery.id}` });
  button.addEventListener("click", () => retry(hook, delivery, button));
  return el(
    "tr",
    { "data-delivery-id": delivery.id },
    el("td", { text: hook.id }),
    el("td", { text: delivery.id }),
    el("td", {}, el("a", { href: `/api/v1/task/${delivery.task_id}`, text: delivery.task_id })),
    el("td", { text: delivery.event_type }),
    el("td", { class: "num", text: String(delivery.attempt_count) }),
    el("td", { class: "wrap", text: lastError(delivery) }),
    el("td", {}, button),
  );
}

async function retry(hook, delivery, button) {
  button.disabled = true;
  const outcome = $("retry-outcome");
  showOutcome(outcome, "busy", `Sending delivery ${delivery.id} again…`);
  try {
    await request("POST", `/api/v1/webhooks/${hook.id}/deliveries/${delivery.id}/retry`, { interactive: true });
    showOutcome(outcome, "done", `Delivery ${delivery.id} is due again now.`);
    await refresh();
  } catch (error) {
    showOutcome(outcome, "error", describeError(error));
    button.disabled = false;
  }
}

async function refresh() {
  const state = $("webhooks-state");
  let hooks;
  try {
    hooks = (await get("/api/v1/webhooks/")).data;
  } catch (error) {
    setText(state, describeError(error), "error");
    return;
  }
  $("webhooks-body").replaceChildren(...hooks.map(endpointRow));
  setText(state, hooks.length ? `${hooks.length} endpoint${hooks.length === 1 ? "" : "s"}. Live.` : "No endpoints yet. Live.");
  const failures = [];
  for (const hook of hooks) {
    if (!hook.deliveries || !hook.deliveries.failed) continue;
    try {
      const found = await get(`/api/v1/webhooks/${hook.id}/deliveries/`, {
        query: { status: "failed", limit: FAILURES_PER_ENDPOINT },
      });
      for (const delivery of found.data) failures.push([hook, delivery]);
    } catch (error) {
      setText($("failures-state"), describeError(error), "error");
      return;
    }
  }
  $("failures-body").replaceChildren(...failures.map(([hook, delivery]) => failureRow(hook, delivery)));
  setText($("failures-state"), failures.length ? `${failures.length} failed` : "No failed deliveries.");
}

whileVisible(refresh, 5000);
