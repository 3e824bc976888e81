// Server-Sent Events read with fetch(), so that the API key can go in a header (EventSource
// cannot send one). Parsing follows the HTML standard's event-stream interpretation; on a dropped
// connection the reader reconnects after the server's `retry` delay with Last-Event-ID, and the
// gateway resumes after that event (docs/api.md, GET /jobs/<id>/events).

import { ApiError, authHeaders } from "./api.js";

/** Feeds text chunks; calls onEvent({id, type, data}) per complete event and onRetry(ms). */
export class EventStreamParser {
  constructor(onEvent, onRetry = () => {}) {
    this.onEvent = onEvent;
    this.onRetry = onRetry;
    this.buffer = "";
    this.data = [];
    this.type = "";
    this.lastEventId = "";
  }

  push(text) {
    this.buffer += text;
    // Lines end in CRLF, LF or CR; a CR at the very end may be half of a CRLF: keep it.
    const lines = this.buffer.split(/\r\n|\n|\r(?!$)/);
    this.buffer = lines.pop();
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === "") {
      if (this.data.length) {
        this.onEvent({ id: this.lastEventId, type: this.type || "message", data: this.data.join("\n") });
      }
      this.data = [];
      this.type = "";
      return;
    }
    if (line.startsWith(":")) return; // a comment (the keep-alive)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.type = value;
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.onRetry(Number(value));
  }
}

/**
 * Follows `path` until `isFinal(event)` or `signal` aborts; reconnects with Last-Event-ID after a
 * network error or a stream that ended early. Resolves when done; rejects with ApiError on a 4xx.
 * `onState` hears "open", "reconnecting" and "closed".
 */
export async function followEvents(path, { onEvent, isFinal, onState = () => {}, signal }) {
  let retryMs = 3000;
  let lastId = "";
  let finished = false;
  while (!finished && !(signal && signal.aborted)) {
    const parser = new EventStreamParser((event) => {
      if (event.id) lastId = event.id;
      onEvent(event);
      if (isFinal(event)) finished = true;
    }, (ms) => { retryMs = ms; });
    try {
      const headers = authHeaders({ Accept: "text/event-stream" });
      if (lastId) headers["Last-Event-ID"] = lastId;
      const response = await fetch(path, { headers, signal, credentials: "omit", cache: "no-store" });
      if (!response.ok) {
        let body = null;
        try { body = await response.json(); } catch (_) { body = null; }
        const error = new ApiError(response.status, body && body.error);
        if (response.status < 500) throw error; // will not get better by asking again
        throw Object.assign(error, { retryable: true });
      }
      onState("open");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.push(value);
        if (finished) { reader.cancel().catch(() => {}); break; }
      }
    } catch (error) {
      if (signal && signal.aborted) break;
      if (error instanceof ApiError && !error.retryable) throw error;
    }
    if (finished || (signal && signal.aborted)) break;
    onState("reconnecting");
    await new Promise((resolve) => setTimeout(resolve, retryMs));
  }
  onState("closed");
}
