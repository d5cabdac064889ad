// The dashboard's entry point: a hash router over three views, and the API key dialog.

import { forgetKey, keyRemembered, onUnauthorized, storedKey, storeKey } from "./api.js";
import { jobView } from "./job.js";
import { jobsView } from "./jobs.js";
import { uploadsView } from "./uploads.js";

const main = document.getElementById("main");
let current = new AbortController();

function route() {
  current.abort(); // stops the previous view's refreshes and requests
  current = new AbortController();
  const hash = location.hash.replace(/^#\/?/, "");
  const job = /^jobs\/(.+)$/.exec(hash);
  if (job) jobView(main, current.signal, decodeURIComponent(job[1]));
  else if (hash === "uploads") uploadsView(main, current.signal);
  else jobsView(main, current.signal);
  for (const link of document.querySelectorAll("header nav a")) {
    const active = link.getAttribute("href") === `#/${hash.split("/")[0] || "jobs"}`;
    if (active) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

// The key dialog: opened by a 401 (with the service's reason) or by the header button.
const dialog = document.getElementById("key-dialog");
const input = document.getElementById("key-input");
const remember = document.getElementById("key-remember");
const reason = document.getElementById("key-reason");

function askForKey(why) {
  reason.textContent = why;
  if (!dialog.open) {
    input.value = "";
    remember.checked = keyRemembered();
    dialog.showModal();
  }
}

onUnauthorized.add((problem) => askForKey(problem.detail || "This service needs an API key."));
document.getElementById("key-form").addEventListener("submit", () => {
  storeKey(input.value.trim(), remember.checked);
  route();
});
document.getElementById("key-forget").addEventListener("click", () => {
  forgetKey();
  dialog.close();
  route();
});
document
  .getElementById("key-button")
  .addEventListener("click", () =>
    askForKey(storedKey() ? "A key is set; enter another to replace it." : "No key is set."),
  );

window.addEventListener("hashchange", route);
route();
