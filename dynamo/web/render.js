// Rendering for the live page: plain DOM, every value through textContent (never HTML).
// Data-driven: a /status key or a request field this file does not know yet is still
// shown, as a generic table, so new server keys appear without changing the page.

export const STEPS = ["received", "reserving", "reserved", "screened", "generating",
  "generated", "awaiting_approval", "approved", "stored", "announced", "accepted", "failing",
  "refunded", "done"];
// What a step is called where a viewer reads it (the step's own name otherwise).
const STEP_LABELS = { awaiting_approval: "waiting for the broadcaster" };
// A request's step only moves forward (STEPS is in that order, on either path), so of two
// copies of one request the one further along is the newer: an answer that was on its way
// while the stream delivered a later change (a cancel's 202, a page read) must not undo it.
// A step this page does not know yet is taken as it comes.
export function newer(known, incoming) {
  if (!known) return incoming;
  const was = STEPS.indexOf(known.step);
  const now = STEPS.indexOf(incoming.step);
  return was >= 0 && now >= 0 && now < was ? known : incoming;
}
// A request may be cancelled at these steps (the server decides; this only offers it).
export const CANCELLABLE = new Set(["received", "reserved", "screened"]);
// /status keys with a panel of their own; any other key goes to "More".
const KNOWN_STATUS_KEYS = new Set(["actors", "queues", "rate_limiter", "requests",
  "orphan_debits", "in_flight", "models", "spend", "fleet", "safety"]);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function ago(iso, now = Date.now()) {
  if (!iso) return "";
  const seconds = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return new Date(iso).toLocaleDateString();
}

function when(iso) {
  return el("time", { datetime: iso, title: iso ? new Date(iso).toLocaleString() : "" }, ago(iso));
}

export function money(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "number") return `$${value < 1 ? value.toFixed(4) : value.toFixed(2)}`;
  if (typeof value === "string") return value;
  for (const key of ["usd", "total_usd", "amount_usd", "today_usd"]) {
    if (typeof value[key] === "number") return money(value[key]);
  }
  return Object.entries(value).map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ");
}

export function describe(request) {
  const inputs = request.inputs || {};
  const subject = typeof inputs.subject === "string" ? inputs.subject : JSON.stringify(inputs);
  return request.style === "friend" && inputs.color ? `${inputs.color} ${subject}` : subject;
}

function safeImageUrl(url) {
  try {
    const parsed = new URL(url, location.href);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch {
    return null;
  }
}

function viewerName(request) {
  const viewer = request.viewer || {};
  return viewer.twitch_display_name || viewer.twitch_user_id || "?";
}

// -- requests -------------------------------------------------------------------------

export function inFlight(requests, { canCancel, onCancel, errorFor }) {
  const byStep = new Map();
  for (const request of requests) {
    if (!byStep.has(request.step)) byStep.set(request.step, []);
    byStep.get(request.step).push(request);
  }
  const steps = [...STEPS, ...[...byStep.keys()].filter((step) => !STEPS.includes(step))];
  const groups = steps.filter((step) => byStep.has(step)).map((step) => el("div", { class: "step" },
    el("h3", {}, STEP_LABELS[step] || step, " ", el("span", { class: "count" }, byStep.get(step).length)),
    el("ul", { class: "requests" }, byStep.get(step)
      .sort((a, b) => Date.parse(a.created_at) - Date.parse(b.created_at))
      .map((request) => el("li", { class: `request ${request.state}`, "data-id": request.id, "data-step": request.step },
        el("span", { class: `style ${request.style}` }, request.style),
        el("span", { class: "subject" }, describe(request)),
        el("span", { class: "viewer" }, viewerName(request)),
        STEP_LABELS[request.step] ? el("span", { class: "waiting" }, STEP_LABELS[request.step]) : null,
        when(request.created_at),
        canCancel && CANCELLABLE.has(request.step) && request.state === "queued"
          ? el("button", { type: "button", class: "cancel", onclick: () => onCancel(request),
              "aria-label": `Cancel ${describe(request)} for ${viewerName(request)}` }, "Cancel")
          : null,
        el("span", { class: "error", role: "alert" }, errorFor(request.id)))))));
  return groups.length ? groups : [el("p", { class: "empty" }, "Nothing in flight.")];
}

export function finishedItem(request, { onRetry, errorFor }) {
  const image = (request.images || [])[0];
  const src = image && safeImageUrl(image.url);
  const failed = request.state === "failed";
  const failure = request.failure || {};
  const cost = typeof request.cost_usd === "number" ? money(request.cost_usd) : "";
  return el("li", { class: `finished-item ${request.state}`, "data-id": request.id, "data-step": request.step },
    src
      ? el("a", { href: src, target: "_blank", rel: "noopener", class: `thumb ${request.style}` },
          el("img", { src, alt: `${request.style}: ${describe(request)}`, loading: "lazy",
            width: 96, height: 96 }))
      : el("span", { class: `thumb none ${request.style}`, "aria-hidden": "true" }, failed ? "✕" : "…"),
    el("div", { class: "details" },
      el("p", { class: "title" },
        el("span", { class: `style ${request.style}` }, request.style), " ",
        el("span", { class: "subject" }, describe(request)),
        request.name ? el("span", { class: "name" }, ` “${request.name}”`) : null),
      el("p", { class: "meta" },
        el("span", { class: "viewer" }, viewerName(request)), " · ",
        when(request.finished_at || request.created_at),
        cost ? el("span", { class: "cost" }, ` · ${cost}`) : null),
      failed ? el("p", { class: "failure" },
        el("strong", { class: "reason" }, failure.reason || "error"), " ",
        el("span", { class: "message" }, failure.message || "")) : null,
      failed ? el("button", { type: "button", class: "retry", onclick: () => onRetry(request),
        "aria-label": `Send ${describe(request)} again as a new request` }, "Send again") : null,
      el("span", { class: "error", role: "alert" }, errorFor(request.id))));
}

// -- the service's status -----------------------------------------------------------------

export function warnings(status) {
  const found = [];
  const models = status.models || {};
  for (const [kind, model] of Object.entries(models)) {
    if (model && model.shutdown_date) {
      found.push(`The ${kind} model ${model.id || ""} shuts down on ${model.shutdown_date}` +
        (model.days_left !== undefined && model.days_left !== null ? ` (${model.days_left} days left)` : "") + ".");
    }
  }
  for (const [kind, limiter] of Object.entries((status.rate_limiter || {}).kinds || {})) {
    if (limiter.circuit_open) found.push(`The ${kind} API circuit is open: calls are held.`);
    if (limiter.paused_until) found.push(`${kind} calls are paused until ${new Date(limiter.paused_until).toLocaleTimeString()}.`);
  }
  const spend = status.spend;
  if (spend && spend.paused) found.push("Image alerts are paused: today's budget is spent.");
  if (status.orphan_debits > 0) found.push(`${status.orphan_debits} debit(s) may be pending at the ledger: reconcile them.`);
  for (const actor of Object.values(status.actors || {})) {
    if (actor.state !== "running") found.push(`Actor ${actor.name} is ${actor.state}${actor.last_error ? `: ${actor.last_error}` : ""}.`);
  }
  return found;
}

function table(caption, columns, rows) {
  return el("table", { class: "grid" }, el("caption", {}, caption),
    el("thead", {}, el("tr", {}, columns.map((c) => el("th", { scope: "col" }, c)))),
    el("tbody", {}, rows.map((row) => el("tr", {}, row.map((cell, i) =>
      i === 0 ? el("th", { scope: "row" }, cell) : el("td", {}, cell))))));
}

function cell(value) {
  if (value === null || value === undefined) return "–";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

// Any object as a table: a list or a map of objects by row, anything else by key.
export function genericTable(caption, value) {
  const rows = Array.isArray(value) ? value.map((v, i) => [String(i), v]) : Object.entries(value || {});
  if (rows.length && rows.every(([, v]) => v && typeof v === "object" && !Array.isArray(v))) {
    const columns = [...new Set(rows.flatMap(([, v]) => Object.keys(v)))];
    return table(caption, ["", ...columns], rows.map(([k, v]) => [k, ...columns.map((c) => cell(v[c]))]));
  }
  return table(caption, ["", "value"], rows.map(([k, v]) => [k, cell(v)]));
}

const SPEND_KEYS = new Set(["today_usd", "month_usd", "daily_budget_usd", "paused", "paused_until"]);

// One row per live process; its share of the last minute's calls per kind of call.
function fleet(value) {
  if (!Array.isArray(value.processes)) return genericTable("Fleet", value);
  const shares = (p) => Object.entries(p.budget_last_60s || {})
    .map(([kind, b]) => `${kind} ${b.calls ?? 0}${typeof b.share === "number" ? ` (${Math.round(b.share * 100)} %)` : ""}`)
    .join(", ") || "–";
  return table(`Fleet (${value.processes.length} process${value.processes.length === 1 ? "" : "es"})`,
    ["process", "host · pid", "heartbeat", "in hand", "calls in 60 s"],
    value.processes.map((p) => [
      `${String(p.id).slice(0, 8)}${p.this ? " (this)" : ""}`,
      `${p.host ?? "?"} · ${p.pid ?? "?"}`,
      `${Number(p.heartbeat_age_s).toFixed(1)} s ago`,
      String(p.requests_in_hand),
      shares(p)]));
}

// The configured models: which, and when OpenAI shuts each down (the warnings say it too).
function models(value) {
  const entries = Object.entries(value || {});
  if (!entries.every(([, m]) => m && typeof m === "object" && "id" in m)) return genericTable("Models", value);
  return table("Models", ["kind", "model", "shuts down", "state"], entries.map(([kind, m]) => [kind,
    String(m.id),
    m.shutdown_date ? `${m.shutdown_date}${typeof m.days_left === "number" ? ` (${m.days_left} days)` : ""}` : "not announced",
    m.error ? `${m.state ?? "?"}: ${m.error}` : String(m.state ?? "–")]));
}

// The safety net: the blocked terms (how many, when read: never the words), image
// screening, approvals.
function safety(value) {
  const blocked = value.blocked_terms || {};
  const approvals = value.approvals || {};
  const rows = [
    ["blocked terms", blocked.configured
      ? `${blocked.terms} term${blocked.terms === 1 ? "" : "s"}, read ${blocked.loaded_at ? new Date(blocked.loaded_at).toLocaleTimeString() : "?"}${blocked.error ? ` (last change refused: ${blocked.error})` : ""}`
      : "off"],
    ["image screening", value.image_moderation ? "on" : "off"],
    ["images flagged", cell(value.images_flagged)],
  ];
  if (value.approvals) {
    rows.push(["approval", approvals.enabled
      ? `on: ${approvals.timeout_action} after ${approvals.timeout_s} s` : "off"]);
    rows.push(["waiting / approved / rejected / timed out",
      [approvals.waiting, approvals.approved, approvals.rejected, approvals.timeout].map(cell).join(" / ")]);
  }
  return table("Safety", ["", "value"], rows);
}

export function ops(status) {
  const parts = [];
  const kinds = (status.rate_limiter || {}).kinds;
  if (kinds) {
    parts.push(table("Rate limit", ["kind", "calls in 60 s", "limit / min", "state", "waiting"],
      Object.entries(kinds).map(([kind, k]) => [kind,
        String(k.calls_last_60s),
        `${k.effective_per_minute}${k.configured_per_minute !== k.effective_per_minute ? ` (configured ${k.configured_per_minute})` : ""}`,
        k.circuit_open ? "circuit open" : k.paused_until ? `paused until ${new Date(k.paused_until).toLocaleTimeString()}` : "ok",
        String(k.permits_waiting ?? "–")])));
  }
  if (status.spend) {
    const s = status.spend;
    const budget = typeof s.daily_budget_usd === "number" ? ` of ${money(s.daily_budget_usd)}` : " (no daily budget)";
    parts.push(table("Spend", ["", "value"], [
      ["today", `${money(s.today_usd)}${budget}`],
      ["this month", money(s.month_usd)],
      ["image alerts", s.paused ? `paused${s.paused_until ? ` until ${new Date(s.paused_until).toLocaleString()}` : ""}` : "running"],
      ...Object.entries(s).filter(([k]) => !SPEND_KEYS.has(k)).map(([k, v]) => [k, cell(v)])]));
  }
  if (status.actors) {
    parts.push(table("Actors", ["actor", "state", "restarts", "last error"],
      Object.values(status.actors).map((a) => [a.name, a.state, String(a.restarts), a.last_error || "–"])));
  }
  if (status.requests) {
    parts.push(table("Requests", ["", "count"], [
      ...Object.entries(status.requests).map(([k, v]) => [k, String(v)]),
      ["in flight here", cell(status.in_flight)], ["orphan debits", cell(status.orphan_debits)]]));
  }
  if (status.safety) parts.push(safety(status.safety));
  if (status.models) parts.push(models(status.models));
  if (status.fleet) parts.push(fleet(status.fleet));
  if (status.queues) {
    parts.push(table("Queues", ["queue", "depth", "capacity"],
      Object.entries(status.queues).map(([k, q]) => [k, q.depth === null ? (q.error || "–") : String(q.depth), cell(q.capacity)])));
  }
  for (const [key, value] of Object.entries(status)) {
    if (!KNOWN_STATUS_KEYS.has(key)) {
      parts.push(value && typeof value === "object" ? genericTable(key, value) : table(key, ["", "value"], [[key, cell(value)]]));
    }
  }
  return parts;
}
