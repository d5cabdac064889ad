// Following a job as it runs: the Server-Sent Events stream of GET /v1/jobs/{id}/events when the
// service offers it, polling otherwise. EventSource cannot send an Authorization header, so the
// stream is read with fetch().

import { request } from "./api.js";

const POLL_MS = 1000;

/**
 * Call `onChange()` whenever the job may have changed, until `signal` aborts (the caller aborts
 * once it has seen the job finish). Resolves when following stops.
 */
export async function follow(jobId, onChange, signal) {
  try {
    const response = await request(`/v1/jobs/${encodeURIComponent(jobId)}/events`, {
      accept: "text/event-stream",
      signal,
    });
    if ((response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
      await readStream(response.body, onChange, signal);
      if (signal.aborted) return;
      onChange(); // the stream ends after the job's final event; keep polling until the caller stops
    } else {
      response.body?.cancel();
    }
  } catch (error) {
    if (signal.aborted) return;
    // a dropped stream or a 5xx: fall back to polling below
  }
  await poll(onChange, signal);
}

async function readStream(body, onChange, signal) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  signal.addEventListener("abort", () => reader.cancel(), { once: true });
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    // Events are separated by a blank line; only whole events count.
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop();
    if (events.some((event) => /^data:/m.test(event))) onChange();
  }
}

function poll(onChange, signal) {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setInterval(() => {
      if (!document.hidden) onChange();
    }, POLL_MS);
    signal.addEventListener(
      "abort",
      () => {
        clearInterval(timer);
        resolve();
      },
      { once: true },
    );
  });
}
