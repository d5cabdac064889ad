// #/jobs/{id}: one job, live until it finishes: status, metrics, per-layer sparsity, plots,
// artifacts and its event log.

import { TERMINAL, blobUrl, json, storedKey } from "./api.js";
import { alertBox, bytes, fill, h, number, percent, status, when } from "./dom.js";
import { progress } from "./jobs.js";
import { follow } from "./live.js";

const PLOTS = [
  ["sensitivity", "Sensitivity of each layer"],
  ["layer_sparsity", "Sparsity per layer"],
  ["accuracy", "Accuracy before and after"],
];

export function jobView(main, signal, jobId) {
  const path = `/v1/jobs/${encodeURIComponent(jobId)}`;
  const parts = {
    summary: h("section", { "aria-labelledby": "summary-title" }),
    metrics: h("section", { "aria-labelledby": "metrics-title" }),
    layers: h("section", { "aria-labelledby": "layers-title" }),
    plots: h("section", { "aria-labelledby": "plots-title", hidden: true }),
    artifacts: h("section", { "aria-labelledby": "artifacts-title" }),
    events: h("section", { "aria-labelledby": "events-title" }),
  };
  fill(
    main,
    h("p", {}, h("a", { href: "#/jobs" }, "← All jobs")),
    h("h1", { class: "id" }, jobId),
    Object.values(parts),
  );

  const live = new AbortController();
  signal.addEventListener("abort", () => live.abort(), { once: true });
  let busy = false;
  let finished = false;

  async function update() {
    if (busy || finished) return; // one update at a time; events can arrive faster
    busy = true;
    try {
      const job = await json(path, { signal });
      const [layers, events] = await Promise.all([
        json(`${path}/layers`, { signal }),
        json(`${path}/events?limit=1000`, { signal }),
      ]);
      renderSummary(parts.summary, job);
      renderMetrics(parts.metrics, job.metrics);
      renderLayers(parts.layers, layers.items);
      renderArtifacts(parts.artifacts, job.artifacts);
      renderEvents(parts.events, events);
      finished = TERMINAL.has(job.status);
      if (finished) {
        live.abort();
        await renderPlots(parts.plots, path);
      }
    } catch (error) {
      if (signal.aborted) return;
      fill(parts.summary, alertBox(error));
      if (error.status === 404) live.abort();
    } finally {
      busy = false;
    }
  }

  update().then(() => follow(jobId, update, live.signal));
}

function renderSummary(section, job) {
  const rows = [
    ["Status", status(job.status)],
    ["Progress", progress(job)],
    ["Name", job.name ?? "—"],
    ["Model", h("span", { class: "id" }, job.model_id)],
    ["Result model", job.result_model_id ? h("span", { class: "id" }, job.result_model_id) : "—"],
    ["Attempts", number(job.attempts)],
    ["Created", when(job.created_at)],
    ["Started", when(job.started_at)],
    ["Finished", when(job.finished_at)],
  ];
  if (job.worker) rows.push(["Worker", job.worker]);
  fill(
    section,
    h("h2", { id: "summary-title", class: "visually-hidden" }, "Summary"),
    job.error ? alertBox({ title: job.error.type, detail: job.error.message }) : null,
    definitions(rows, "summary"),
    h(
      "details",
      {},
      h("summary", {}, "Specification"),
      h("pre", {}, JSON.stringify(job.spec, null, 2)),
    ),
  );
}

function definitions(rows, id) {
  return h(
    "dl",
    { class: "facts", id },
    rows.map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]),
  );
}

// Metrics named `<x>_before` and `<x>_after` are shown side by side with their ratio.
function renderMetrics(section, metrics) {
  const title = h("h2", { id: "metrics-title" }, "Metrics");
  if (!metrics) return fill(section, title, h("p", {}, "Not measured yet."));
  const paired = [];
  const single = [];
  const measured = (value) => value !== null && value !== undefined;
  for (const [name, value] of Object.entries(metrics)) {
    if (name.endsWith("_after") && `${name.slice(0, -6)}_before` in metrics) continue;
    const base = name.endsWith("_before") ? name.slice(0, -7) : null;
    if (base && `${base}_after` in metrics) {
      const after = metrics[`${base}_after`];
      if (measured(value) || measured(after)) paired.push([base, value, after]);
    } else if (measured(value)) {
      single.push([name, value]);
    }
  }
  if (!paired.length && !single.length)
    return fill(section, title, h("p", {}, "Not measured yet."));
  const isBytes = (name) => name.includes("bytes");
  const show = (name, value) =>
    isBytes(name) && typeof value === "number" ? bytes(value) : metric(value);
  fill(
    section,
    title,
    h(
      "table",
      { class: "metrics", id: "metrics" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          ["Metric", "Before", "After", "After / before"].map((c) => h("th", { scope: "col" }, c)),
        ),
      ),
      h(
        "tbody",
        {},
        paired.map(([name, before, after]) =>
          h(
            "tr",
            {},
            h("th", { scope: "row" }, name),
            h("td", {}, show(name, before)),
            h("td", {}, show(name, after)),
            h(
              "td",
              {},
              typeof before === "number" && typeof after === "number" && before
                ? `×${(after / before).toFixed(3)}`
                : "",
            ),
          ),
        ),
        single.map(([name, value]) =>
          h(
            "tr",
            {},
            h("th", { scope: "row" }, name),
            h("td", { colspan: 3 }, name === "sparsity" ? percent(value) : show(name, value)),
          ),
        ),
      ),
    ),
  );
}

/** A metric value: a number, text, or an evaluation such as {accuracy, loss}. */
function metric(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "object") {
    return Object.entries(value)
      .map(([k, v]) => `${k} ${number(v)}`)
      .join(", ");
  }
  return number(value);
}

function renderLayers(section, layers) {
  const title = h("h2", { id: "layers-title" }, "Per-layer sparsity");
  if (!layers.length) return fill(section, title, h("p", {}, "No layer measured yet."));
  const shape = (s) => (s ? `[${s.join(", ")}]` : "—");
  fill(
    section,
    title,
    h(
      "table",
      { class: "layers", id: "layers" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          ["Layer", "Kind", "Shape before → after", "Parameters", "Non-zero", "Sparsity"].map((c) =>
            h("th", { scope: "col" }, c),
          ),
        ),
      ),
      h(
        "tbody",
        {},
        layers.map((layer) =>
          h(
            "tr",
            {},
            h("th", { scope: "row", class: "id" }, layer.name),
            h("td", {}, layer.kind),
            h("td", {}, `${shape(layer.shape_before)} → ${shape(layer.shape_after)}`),
            h("td", { class: "num" }, number(layer.params)),
            h("td", { class: "num" }, number(layer.nonzero)),
            h(
              "td",
              { class: "sparsity" },
              h("meter", { min: 0, max: 1, value: layer.sparsity ?? 0, "aria-hidden": "true" }),
              h("span", {}, percent(layer.sparsity)),
            ),
          ),
        ),
      ),
    ),
  );
}

// Plots come as SVG fetched with the key (an <img src> could not send it); a plot the job has
// not measured answers 404 and is left out.
async function renderPlots(section, path) {
  const figures = [];
  for (const [name, caption] of PLOTS) {
    // A plot that fails to load is left out too: the numbers are all on the page already.
    const url = await blobUrl(`${path}/plots/${name}.svg`, "image/svg+xml").catch(() => null);
    if (url)
      figures.push(
        h(
          "figure",
          { "data-plot": name },
          h("img", { src: url, alt: caption }),
          h("figcaption", {}, caption),
        ),
      );
  }
  fill(section, h("h2", { id: "plots-title" }, "Plots"), figures);
  section.hidden = !figures.length;
}

function renderArtifacts(section, artifacts) {
  const title = h("h2", { id: "artifacts-title" }, "Artifacts");
  if (!artifacts?.length) return fill(section, title, h("p", {}, "None yet."));
  fill(
    section,
    title,
    h(
      "ul",
      { class: "artifacts" },
      artifacts.map((a) =>
        h(
          "li",
          {},
          download(a),
          ` ${a.format}, ${bytes(a.size_bytes)}, sha256 `,
          h("span", { class: "id" }, a.sha256),
        ),
      ),
    ),
  );
}

// With a key the download must carry it, so it goes through a blob; without one a plain link
// lets the browser stream a large file to disk.
function download(artifact) {
  const label = `Download ${artifact.kind}`;
  if (!storedKey()) return h("a", { href: artifact.download_url, download: "" }, label);
  return h(
    "button",
    {
      type: "button",
      class: "link",
      onclick: async () => {
        const url = await blobUrl(artifact.download_url);
        if (!url) return;
        const a = h("a", { href: url, download: `${artifact.kind}-${artifact.id}` });
        document.body.append(a);
        a.click();
        a.remove();
        setTimeout(() => URL.revokeObjectURL(url), 60_000);
      },
    },
    label,
  );
}

function renderEvents(section, page) {
  fill(
    section,
    h("h2", { id: "events-title" }, "Events"),
    h(
      "ol",
      { class: "events" },
      page.items.map((e) =>
        h(
          "li",
          {},
          h("time", { datetime: e.at }, when(e.at)),
          " ",
          h("span", { class: "stage" }, e.stage),
          " ",
          e.message ?? "",
        ),
      ),
    ),
  );
}
