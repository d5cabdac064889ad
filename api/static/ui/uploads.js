// #/uploads: the caller's models and datasets, and forms that upload a file to each.

import { json, request } from "./api.js";
import { alertBox, bytes, fill, h, number, when } from "./dom.js";

const COLLECTIONS = [
  {
    key: "models",
    title: "Models",
    accept: ".pt2,.tar,.tar.gz,.tgz,.zip",
    hint: "A torch.export program (.pt2) or a Hugging Face checkpoint archive.",
    columns: ["Id", "Name", "Format", "Parameters", "Size", "Created"],
    cells: (m) => [m.format, number(m.num_parameters), bytes(m.size_bytes), when(m.created_at)],
  },
  {
    key: "datasets",
    title: "Datasets",
    accept: ".npz,.safetensors,.txt,.jsonl",
    hint: "Arrays (.npz, .safetensors) or text (.txt, .jsonl).",
    columns: ["Id", "Name", "Format", "Samples", "Size", "Created"],
    cells: (d) => [d.format, number(d.num_samples), bytes(d.size_bytes), when(d.created_at)],
  },
];

export function uploadsView(main, signal) {
  fill(
    main,
    h("h1", {}, "Models & datasets"),
    COLLECTIONS.map((c) => collection(c, signal)),
  );
}

function collection(spec, signal) {
  const body = h("tbody");
  const message = h("div", { "aria-live": "polite" });
  const file = h("input", {
    type: "file",
    name: "file",
    id: `${spec.key}-file`,
    accept: spec.accept,
    required: true,
  });
  const name = h("input", { type: "text", name: "name", id: `${spec.key}-name`, maxlength: "255" });
  const submit = h("button", { type: "submit" }, "Upload");

  async function load() {
    try {
      const page = await json(`/v1/${spec.key}?limit=200`, { signal });
      fill(
        body,
        page.items.length ? page.items.map(row) : h("tr", {}, h("td", { colspan: 6 }, "None yet.")),
      );
    } catch (error) {
      if (!signal.aborted) fill(message, alertBox(error));
    }
  }

  function row(item) {
    return h(
      "tr",
      { "data-id": item.id },
      h("td", { class: "id" }, item.id),
      h("td", { class: "name" }, item.name ?? ""),
      spec.cells(item).map((cell) => h("td", {}, cell)),
    );
  }

  async function upload(event) {
    event.preventDefault();
    const form = new FormData(event.target);
    if (!form.get("name")) form.delete("name");
    submit.disabled = true;
    fill(message, h("p", {}, "Uploading…"));
    try {
      const created = await (
        await request(`/v1/${spec.key}`, { method: "POST", body: form })
      ).json();
      fill(
        message,
        h("p", { class: "ok" }, "Uploaded ", h("span", { class: "id" }, created.id), "."),
      );
      event.target.reset();
      await load();
    } catch (error) {
      fill(message, alertBox(error));
    } finally {
      submit.disabled = false;
    }
  }

  load();
  return h(
    "section",
    { id: spec.key, "aria-labelledby": `${spec.key}-title` },
    h("h2", { id: `${spec.key}-title` }, spec.title),
    h(
      "form",
      { class: "upload", onsubmit: upload },
      h("label", { for: file.id }, "File"),
      file,
      h("label", { for: name.id }, "Name (optional)"),
      name,
      submit,
      h("p", { class: "hint" }, spec.hint),
    ),
    message,
    h(
      "table",
      {},
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          spec.columns.map((c) => h("th", { scope: "col" }, c)),
        ),
      ),
      body,
    ),
  );
}
