// Server-sent events read with fetch() and a ReadableStream, because a browser EventSource
// cannot send an Authorization header. Parses the text/event-stream format (id:, data:, event:,
// retry: fields, comment lines, CR/LF/CRLF line ends), reconnects after a drop with
// Last-Event-ID so that the server replays what was missed, and asks for a token on a 401.

import { ApiError, TOKEN_CHANGED, apiError, askForToken, authHeaders, parseJson, unauthorizedMessage } from "./api.js";

// The parser alone: feed it text as it arrives; it calls onEvent({id, type, data}) for each
// event and onComment(text) for each comment line. `lastEventId` follows the id: fields.
export class SseParser {
  constructor({ onEvent = () => {}, onComment = () => {}, onRetry = () => {} } = {}) {
    this.onEvent = onEvent;
    this.onComment = onComment;
    this.onRetry = onRetry;
    this.buffer = "";
    this.data = [];
    this.type = "";
    this.lastEventId = "";
    this.skipLf = false; // a chunk ended on CR: a LF opening the next one belongs to it
  }

  push(chunk) {
    let text = chunk;
    if (this.skipLf && text.startsWith("\n")) text = text.slice(1);
    this.skipLf = false;
    this.buffer += text;
    let start = 0;
    for (;;) {
      const cr = this.buffer.indexOf("\r", start);
      const lf = this.buffer.indexOf("\n", start);
      if (cr < 0 && lf < 0) break;
      let end;
      let next;
      if (cr >= 0 && (lf < 0 || cr < lf)) {
        end = cr;
        if (cr + 1 < this.buffer.length) next = this.buffer[cr + 1] === "\n" ? cr + 2 : cr + 1;
        else {
          next = cr + 1;
          this.skipLf = true;
        }
      } else {
        end = lf;
        next = lf + 1;
      }
      this.line(this.buffer.slice(start, end));
      start = next;
    }
    this.buffer = this.buffer.slice(start);
  }

  line(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) {
      this.onComment(line.slice(1).trimStart());
      return;
    }
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.type = value;
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.onRetry(Number(value));
  }

  dispatch() {
    const data = this.data;
    const type = this.type || "message";
    this.data = [];
    this.type = "";
    if (data.length === 0) return;
    this.onEvent({ id: this.lastEventId, type, data: data.join("\n") });
  }

  // A connection ended: an event without its closing blank line is dropped, as browsers do.
  reset() {
    this.buffer = "";
    this.data = [];
    this.type = "";
    this.skipLf = false;
  }
}

// A stream that keeps itself open. Callbacks: onTask(task) for each event (its data parsed as
// JSON), onState(state, detail) with state one of "connecting", "live", "reconnecting",
// "unauthorized", "failed" (no retry: e.g. the user does not exist); onGap(error) when a
// reconnect could not resume where the stream left off (410 last_event_id_expired): events
// between the drop and the next "live" may be missing.
export class TaskStream {
  constructor(path, { onTask, onState = () => {}, onGap = () => {} } = {}) {
    this.path = path;
    this.onTask = onTask;
    this.onState = onState;
    this.onGap = onGap;
    this.lastEventId = null;
    this.refusal = null; // the last 401, as an ApiError: its message is what the token prompt says
    this.retryMs = 1000;
    this.backoffMs = 1000;
    this.stopped = true;
    this.controller = null;
    this.wake = null;
    this.onTokenChanged = () => this.wakeUp();
  }

  start() {
    if (!this.stopped) return this;
    this.stopped = false;
    window.addEventListener(TOKEN_CHANGED, this.onTokenChanged);
    this.run();
    return this;
  }

  stop() {
    this.stopped = true;
    window.removeEventListener(TOKEN_CHANGED, this.onTokenChanged);
    if (this.controller) this.controller.abort();
    this.wakeUp();
  }

  wakeUp() {
    if (this.wake) this.wake();
  }

  pause(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.wake = done;
    });
  }

  async run() {
    let first = true;
    while (!this.stopped) {
      this.onState(first ? "connecting" : "reconnecting");
      first = false;
      const outcome = await this.connectOnce();
      if (this.stopped) return;
      if (outcome === "failed") return;
      if (outcome === "unauthorized") {
        // Wait for a token: asked for at once, or entered later (the token button).
        if (!(await askForToken(this.refusal.message))) {
          await this.pause(60 * 60 * 1000);
        }
        continue;
      }
      await this.pause(Math.max(this.backoffMs, this.retryMs));
      this.backoffMs = Math.min(this.backoffMs * 2, 15000);
    }
  }

  async connectOnce() {
    this.controller = new AbortController();
    const headers = { Accept: "text/event-stream", ...authHeaders() };
    if (this.lastEventId) headers["Last-Event-ID"] = this.lastEventId;
    let response;
    try {
      response = await fetch(this.path, { headers, signal: this.controller.signal, cache: "no-store", credentials: "omit" });
    } catch {
      return "dropped";
    }
    if (response.status === 401) {
      this.refusal = new ApiError(401, "unauthorized", unauthorizedMessage(Boolean(headers.Authorization)));
      this.onState("unauthorized", this.refusal);
      return "unauthorized";
    }
    if (!response.ok || !response.body) {
      let body = null;
      try {
        body = parseJson(await response.text());
      } catch {
        // not JSON: not the API's error shape
      }
      const error = apiError(response, body, `The event stream answered ${response.status}`);
      if (error.code === "invalid_last_event_id" || error.code === "last_event_id_expired") {
        // The stream cannot resume from there (a task too old, or gone): start from now, and
        // let the page read afresh what it may have missed.
        this.lastEventId = null;
        this.onGap(error);
        return "dropped";
      }
      if (response.status >= 400 && response.status < 500) {
        this.onState("failed", error);
        return "failed";
      }
      this.onState("reconnecting", error);
      return "dropped";
    }
    this.backoffMs = 1000;
    const parser = new SseParser({
      onEvent: (event) => {
        this.lastEventId = event.id || this.lastEventId;
        let task;
        try {
          task = parseJson(event.data);
        } catch {
          return; // not JSON: not an event of ours
        }
        this.onTask(task);
      },
      onComment: (text) => {
        if (text === "live") this.onState("live");
      },
      onRetry: (ms) => {
        this.retryMs = ms;
      },
    });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.push(value);
      }
    } catch {
      // dropped (or stopped): reconnect below unless stopped
    } finally {
      parser.reset();
    }
    return "dropped";
  }
}
