// Building the page from data without ever parsing it as markup: every value from the API
// becomes a text node or an attribute value, never HTML.

/**
 * h("a", {href: "#/jobs", class: "id"}, "text", otherNode) -> element.
 * Props: `on<event>` functions become listeners; null/undefined/false skip the attribute.
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name in el && typeof value !== "string") {
      el[name] = value; // properties such as `value` of <meter> or `hidden`
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace all of `el`'s children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const units = ["B", "KiB", "MiB", "GiB", "TiB"];

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function number(n) {
  if (n === null || n === undefined) return "—";
  if (typeof n !== "number") return String(n);
  return Number.isInteger(n)
    ? n.toLocaleString("en")
    : n.toLocaleString("en", { maximumFractionDigits: 4 });
}

export function percent(fraction) {
  return fraction === null || fraction === undefined ? "—" : `${(fraction * 100).toFixed(1)}%`;
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

/** A status badge: the text is the status itself, the class only colours it. */
export function status(value) {
  return h(
    "span",
    { class: `status status-${/^[a-z_]+$/.test(value) ? value : "unknown"}` },
    value,
  );
}

/** A problem-details error (or any Error) as an alert a screen reader announces. */
export function alertBox(error) {
  const detail = error.detail || error.message || String(error);
  return h(
    "div",
    { class: "alert", role: "alert" },
    error.title ? h("strong", {}, `${error.title}: `) : null,
    detail,
  );
}
