// The "Awaiting approval" panel (DYNAMO_APPROVAL): each waiting image large, its viewer,
// subject, friend name and the time left, with Approve and Reject buttons. On a focused
// item, the keys A and R do the same. Every value goes in through text nodes (render.el).
// The images come from GET /requests/{id}/preview with the token in a header, so the
// page fetches them itself and shows them as blob: URLs (app.js keeps those).

import { describe, el } from "./render.js";

export const KEYS = { a: true, r: false }; // key -> approve?
export const WAITING_STEP = "awaiting_approval";

export function waiting(requests) {
  return requests.filter((r) => r.step === WAITING_STEP && r.state === "processing");
}

// "1:05 left", from a local deadline in ms since the epoch.
export function timeLeft(deadlineMs, now = Date.now()) {
  if (!Number.isFinite(deadlineMs)) return "";
  const seconds = Math.max(0, Math.ceil((deadlineMs - now) / 1000));
  if (seconds === 0) return "time is up";
  const minutes = Math.floor(seconds / 60);
  return `${minutes}:${String(seconds % 60).padStart(2, "0")} left`;
}

function viewerName(request) {
  const viewer = request.viewer || {};
  return viewer.twitch_display_name || viewer.twitch_user_id || "?";
}

export function item(request, { previewUrl, deadlineMs, onDecide, errorFor }) {
  const what = `${request.style} “${describe(request)}” for ${viewerName(request)}`;
  const src = previewUrl(request.id);
  const node = el("li", {
    class: "approval-item", "data-id": request.id, "data-step": request.step, tabindex: 0,
    "aria-keyshortcuts": "A R", "aria-label": `${what}: press A to approve, R to reject`,
  },
  el("div", { class: `preview ${request.style}` },
    src ? el("img", { src, alt: `The image made for ${what}` })
      : el("span", { class: "loading" }, "loading the image…")),
  el("div", { class: "approval-details" },
    el("p", { class: "title" },
      el("span", { class: `style ${request.style}` }, request.style), " ",
      el("span", { class: "subject" }, describe(request)),
      request.name ? el("span", { class: "name" }, ` “${request.name}”`) : null),
    el("p", { class: "meta" },
      "for ", el("span", { class: "viewer" }, viewerName(request)), " · ",
      el("span", { class: "time-left", "data-deadline": deadlineMs, role: "timer" }, timeLeft(deadlineMs))),
    el("div", { class: "actions" },
      el("button", { type: "button", class: "approve", onclick: () => onDecide(request, true),
        "aria-label": `Approve ${what}` }, "Approve (A)"),
      el("button", { type: "button", class: "reject", onclick: () => onDecide(request, false),
        "aria-label": `Reject ${what}` }, "Reject (R)")),
    el("span", { class: "error", role: "alert" }, errorFor(request.id))));
  node.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const approve = KEYS[event.key.toLowerCase()];
    if (approve === undefined) return;
    event.preventDefault();
    onDecide(request, approve);
  });
  return node;
}

// Every countdown on the page, moved on by one tick.
export function tick(root = document, now = Date.now()) {
  for (const node of root.querySelectorAll(".time-left[data-deadline]")) {
    node.textContent = timeLeft(Number(node.dataset.deadline), now);
  }
}
