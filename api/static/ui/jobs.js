// #/jobs: every job of the caller's tenant, newest first, refreshed while the page is open.

import { TERMINAL, json, withQuery } from "./api.js";
import { alertBox, fill, h, percent, status, when } from "./dom.js";

const REFRESH_MS = 1500;
const PAGE = 50;
const STATUSES = ["", "queued", "running", "succeeded", "failed", "cancelled"];

export function jobsView(main, signal) {
  let filter = "";
  let older = []; // pages loaded with "Older jobs", kept as they were
  let nextCursor = null;
  const body = h("tbody");
  const message = h("div", { "aria-live": "polite" });
  const more = h(
    "button",
    { type: "button", class: "secondary", hidden: true, onclick: loadOlder },
    "Older jobs",
  );
  const select = h(
    "select",
    {
      id: "status-filter",
      onchange: () => {
        filter = select.value;
        older = [];
        refresh();
      },
    },
    STATUSES.map((s) => h("option", { value: s }, s || "any")),
  );

  fill(
    main,
    h("h1", {}, "Jobs"),
    h("p", { class: "filters" }, h("label", { for: "status-filter" }, "Status "), select),
    message,
    h(
      "table",
      { class: "jobs" },
      h("caption", { class: "visually-hidden" }, "Jobs, newest first"),
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          ["Job", "Name", "Model", "Status", "Progress", "Created"].map((c) =>
            h("th", { scope: "col" }, c),
          ),
        ),
      ),
      body,
    ),
    more,
  );

  let first = [];
  async function refresh() {
    try {
      const page = await json(withQuery("/v1/jobs", { limit: PAGE, status: filter }), { signal });
      first = page.items;
      if (!older.length) nextCursor = page.next_cursor;
      render();
      message.replaceChildren();
    } catch (error) {
      if (!signal.aborted) fill(message, alertBox(error));
    }
  }

  async function loadOlder() {
    const page = await json(
      withQuery("/v1/jobs", { limit: PAGE, status: filter, cursor: nextCursor }),
      { signal },
    );
    older = older.concat(page.items);
    nextCursor = page.next_cursor;
    render();
  }

  function render() {
    const seen = new Set(first.map((job) => job.id));
    const items = first.concat(older.filter((job) => !seen.has(job.id)));
    fill(
      body,
      items.length ? items.map(row) : h("tr", {}, h("td", { colspan: 6 }, "No jobs yet.")),
    );
    more.hidden = !nextCursor;
  }

  refresh();
  const timer = setInterval(() => {
    if (!document.hidden) refresh();
  }, REFRESH_MS);
  signal.addEventListener("abort", () => clearInterval(timer), { once: true });
}

function row(job) {
  return h(
    "tr",
    { "data-job-id": job.id },
    h("td", {}, h("a", { class: "id", href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id)),
    h("td", {}, job.name ?? ""),
    h("td", { class: "id" }, job.model_id),
    h("td", {}, status(job.status)),
    h("td", {}, progress(job)),
    h("td", {}, when(job.created_at)),
  );
}

/** The stage and a progress bar; finished jobs need no bar. */
export function progress(job) {
  const { stage, fraction } = job.progress ?? {};
  if (TERMINAL.has(job.status)) return h("span", { class: "stage" }, stage ?? "");
  return h(
    "span",
    { class: "progress" },
    h("progress", {
      max: 1,
      value: fraction ?? 0,
      "aria-label": `${stage ?? ""} ${percent(fraction)}`,
    }),
    h("span", { class: "stage" }, `${stage ?? ""} ${percent(fraction)}`),
  );
}
