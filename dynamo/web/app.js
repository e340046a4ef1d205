// The live page: signs in with a bearer token (kept in sessionStorage, sent only in the
// Authorization header), trades it for a one-use ticket, and follows the server-sent
// event stream /events?ticket=... . The lists are read once per (re)connection; after
// that every change arrives on the stream. A dropped stream reconnects by itself, with
// a new ticket, after a growing pause (no polling storm).

import * as approval from "./approval.js";
import * as render from "./render.js";

const TOKEN_KEY = "dynamo.token";
const RECONNECT_S = [1, 2, 4, 8, 15];
const FINISHED_SHOWN = 50;
const RELATIVE_TIMES_EVERY_MS = 10_000;
const COUNTDOWN_EVERY_MS = 1_000;
const TITLE = "dynamo · live";
const $ = (id) => document.getElementById(id);

const state = {
  token: null,
  caller: null,
  requests: new Map(),
  status: null,
  source: null,
  failures: 0,
  reconnectTimer: null,
  itemErrors: new Map(), // request id -> the last action's error, kept across renders
  previews: new Map(), // request id awaiting approval -> its image's blob: URL ("" while loading)
  deadlines: new Map(), // request id awaiting approval -> when its wait ends, by this clock
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body, extraHeaders = {}) {
  const headers = { Authorization: `Bearer ${state.token}`, ...extraHeaders };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (error) {
    throw new ApiError(0, "dynamo cannot be reached");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, data.error || `HTTP ${response.status}`);
  return data;
}

// -- signing in and out ---------------------------------------------------------------------

function showSignIn(message = "") {
  stopStream();
  state.token = null;
  state.caller = null;
  state.requests.clear();
  $("dashboard").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  $("who").textContent = "";
  renderApprovals();
  $("sign-in-error").textContent = message;
  setLive("signed out", "off");
  $("token").focus();
}

async function signIn(token) {
  state.token = token;
  $("sign-in-error").textContent = "";
  try {
    await connect();
  } catch (error) {
    sessionStorage.removeItem(TOKEN_KEY);
    const message = error.status === 401 ? "That token was refused."
      : error.status === 503 ? "The auth service is unavailable; try again in a moment."
      : `Cannot sign in: ${error.message}`;
    showSignIn(message);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("sign-in").hidden = true;
  $("dashboard").hidden = false;
  $("sign-out").hidden = false;
  $("token").value = "";
}

// -- the stream -------------------------------------------------------------------------------

function setLive(text, kind) {
  const live = $("live");
  live.textContent = text;
  live.dataset.state = kind;
}

function stopStream() {
  clearTimeout(state.reconnectTimer);
  if (state.source) state.source.close();
  state.source = null;
}

// Opens the stream with a fresh ticket; throws an ApiError if the token is not accepted.
async function connect() {
  const { ticket, caller } = await api("POST", "/events/tickets");
  state.caller = caller;
  $("who").textContent = `${caller.twitch_display_name} (${caller.role})`;
  $("ops").hidden = caller.role !== "broadcaster";
  stopStream();
  const source = new EventSource(`/events?ticket=${encodeURIComponent(ticket)}`);
  state.source = source;
  source.addEventListener("hello", () => {
    state.failures = 0;
    setLive("live", "on");
    reload();
  });
  source.addEventListener("request", (event) => upsert(JSON.parse(event.data)));
  source.addEventListener("status", (event) => showStatus(JSON.parse(event.data)));
  source.addEventListener("resync", () => reload());
  source.onerror = () => {
    if (state.source !== source) return;
    stopStream();
    scheduleReconnect();
  };
}

function scheduleReconnect() {
  const delay = RECONNECT_S[Math.min(state.failures, RECONNECT_S.length - 1)];
  state.failures += 1;
  setLive(`reconnecting in ${delay} s…`, "wait");
  state.reconnectTimer = setTimeout(async () => {
    try {
      await connect();
    } catch (error) {
      if (error.status === 401) return showSignIn("Your token is no longer accepted; sign in again.");
      scheduleReconnect();
    }
  }, delay * 1000);
}

// -- the lists ---------------------------------------------------------------------------------

async function reload() {
  try {
    const pages = await Promise.all([
      api("GET", "/requests?state=queued&limit=100"),
      api("GET", "/requests?state=processing&limit=100"),
      api("GET", `/requests?state=succeeded&limit=${FINISHED_SHOWN}`),
      api("GET", `/requests?state=failed&limit=${FINISHED_SHOWN}`),
    ]);
    // The pages were read while the stream kept going: a change it brought meanwhile wins.
    const known = state.requests;
    state.requests = new Map();
    for (const page of pages) {
      for (const request of page.requests) {
        noteDeadline(request);
        state.requests.set(request.id, render.newer(known.get(request.id), request));
      }
    }
    renderRequests();
  } catch (error) {
    if (error.status === 401) return showSignIn("Your token is no longer accepted; sign in again.");
    setLive(`cannot read the requests: ${error.message}`, "wait");
  }
  if (state.caller && state.caller.role === "broadcaster" && !state.status) {
    api("GET", "/status").then(showStatus).catch(() => {});
  }
}

function upsert(request) {
  noteDeadline(request);
  state.requests.set(request.id, render.newer(state.requests.get(request.id), request));
  renderRequests();
}

// The server says how many seconds a wait has left as it answers: counted down from now.
function noteDeadline(request) {
  const left = request.approval && request.approval.seconds_left;
  if (request.step === approval.WAITING_STEP && typeof left === "number") {
    state.deadlines.set(request.id, Date.now() + left * 1000);
  }
}

function finishedTime(request) {
  return Date.parse(request.finished_at || request.created_at);
}

function renderRequests() {
  renderApprovals();
  // Rendering replaces the lists: keep the keyboard's place.
  const focused = document.activeElement;
  const focusedId = focused && focused.closest && focused.closest("[data-id]")?.dataset.id;
  const focusedClass = focused && focused.className;
  const all = [...state.requests.values()];
  const flying = all.filter((r) => r.state === "queued" || r.state === "processing");
  const finished = all.filter((r) => r.state === "succeeded" || r.state === "failed")
    .sort((a, b) => finishedTime(b) - finishedTime(a)).slice(0, FINISHED_SHOWN);
  // Keep what is shown bounded: forget finished requests that fell off the list.
  const shown = new Set(finished.map((r) => r.id));
  for (const r of all) if (!shown.has(r.id) && (r.state === "succeeded" || r.state === "failed")) state.requests.delete(r.id);
  $("in-flight-count").textContent = flying.length ? `(${flying.length})` : "";
  const errorFor = (id) => state.itemErrors.get(id) || "";
  $("in-flight-body").replaceChildren(...render.inFlight(flying, {
    canCancel: state.caller && state.caller.role === "broadcaster", onCancel: cancel, errorFor }));
  $("finished-list").replaceChildren(...(finished.length
    ? finished.map((r) => render.finishedItem(r, { onRetry: sendAgain, errorFor }))
    : [render.el("li", { class: "empty" }, "Nothing finished yet.")]));
  if (focusedId && focusedClass) {
    const again = document.querySelector(`[data-id="${CSS.escape(focusedId)}"] .${CSS.escape(focusedClass)}`);
    if (again) again.focus();
  }
}

// -- the images awaiting approval (the broadcaster's; a viewer sees "waiting" in flight) --------

function renderApprovals() {
  const broadcaster = state.caller && state.caller.role === "broadcaster";
  const waiting = broadcaster ? approval.waiting([...state.requests.values()])
    .sort((a, b) => (state.deadlines.get(a.id) ?? 0) - (state.deadlines.get(b.id) ?? 0)) : [];
  const ids = new Set(waiting.map((r) => r.id));
  for (const [id, url] of state.previews) {
    if (ids.has(id)) continue;
    if (url) URL.revokeObjectURL(url);
    state.previews.delete(id);
    state.deadlines.delete(id);
  }
  for (const request of waiting) if (!state.previews.has(request.id)) loadPreview(request.id);
  document.title = waiting.length ? `(${waiting.length}) awaiting approval · dynamo` : TITLE;
  $("approvals").hidden = waiting.length === 0;
  $("approvals-count").textContent = waiting.length ? `(${waiting.length})` : "";
  // The keyboard stays on the panel: on the same item, or where a decided one was.
  const list = $("approvals-list");
  const focused = document.activeElement;
  const focusedItem = focused && focused.closest ? focused.closest(".approval-item") : null;
  const place = focusedItem ? [...list.children].indexOf(focusedItem) : -1;
  const focusedClass = focusedItem && focused !== focusedItem ? focused.className : null;
  list.replaceChildren(...waiting.map((request) => approval.item(request, {
    previewUrl: (id) => state.previews.get(id) || null,
    deadlineMs: state.deadlines.get(request.id),
    onDecide: decide,
    errorFor: (id) => state.itemErrors.get(id) || "",
  })));
  if (place >= 0 && list.children.length) {
    const again = list.querySelector(`[data-id="${CSS.escape(focusedItem.dataset.id)}"]`);
    const target = again || list.children[Math.min(place, list.children.length - 1)];
    const button = again && focusedClass ? target.querySelector(`.${CSS.escape(focusedClass)}`) : null;
    (button || target).focus();
  }
}

async function loadPreview(id) {
  state.previews.set(id, "");
  try {
    const response = await fetch(`/requests/${encodeURIComponent(id)}/preview`,
      { headers: { Authorization: `Bearer ${state.token}` } });
    if (!response.ok) throw new ApiError(response.status, `HTTP ${response.status}`);
    const url = URL.createObjectURL(await response.blob());
    if (!state.previews.has(id)) return URL.revokeObjectURL(url); // decided meanwhile
    state.previews.set(id, url);
    renderApprovals();
  } catch (error) {
    if (state.previews.get(id) === "") state.previews.delete(id);
  }
}

async function decide(request, approve) {
  try {
    const decided = await api("POST", `/requests/${encodeURIComponent(request.id)}/${approve ? "approve" : "reject"}`);
    itemError(request.id, "");
    upsert(decided);
  } catch (error) {
    itemError(request.id, error.status === 409 ? "Already decided (elsewhere, or timed out)." : error.message);
    if (error.status === 409) api("GET", `/requests/${encodeURIComponent(request.id)}`).then(upsert).catch(() => {});
  }
}

function showStatus(status) {
  state.status = status;
  $("ops-body").replaceChildren(...render.ops(status));
  $("warnings").replaceChildren(...render.warnings(status).map((text) => render.el("p", { class: "warning" }, text)));
}

// -- actions -------------------------------------------------------------------------------------

function itemError(id, message) {
  if (message) state.itemErrors.set(id, message);
  else state.itemErrors.delete(id);
  const item = document.querySelector(`[data-id="${CSS.escape(id)}"] .error`);
  if (item) item.textContent = message;
}

async function cancel(request) {
  try {
    const cancelled = await api("DELETE", `/requests/${encodeURIComponent(request.id)}`);
    itemError(request.id, "");
    upsert(cancelled);
  } catch (error) {
    itemError(request.id, error.message);
  }
}

function bodyFor(request) {
  const mine = state.caller && request.viewer && request.viewer.twitch_user_id === state.caller.twitch_user_id;
  const payload = { style: request.style, inputs: request.inputs };
  return mine ? payload : { type: "image", viewer: request.viewer, payload };
}

async function sendAgain(request) {
  try {
    const accepted = await api("POST", "/requests", bodyFor(request));
    itemError(request.id, "");
    $("submit-result").textContent = `Sent again as ${accepted.id}.`;
  } catch (error) {
    itemError(request.id, error.message);
  }
}

// The API names the field in each clause ("inputs.subject: must be ..."): shown beside it.
function showFieldErrors(message) {
  const form = $("submit-form");
  for (const clause of message.split("; ")) {
    const field = (clause.match(/^(?:payload\.)?(?:inputs\.)?(subject|color|style)\b/) || [])[1] || "form";
    const slot = form.querySelector(`[data-error-for="${field}"]`);
    slot.textContent = slot.textContent ? `${slot.textContent}; ${clause}` : clause;
    const input = form.querySelector(`#${field}`);
    if (input) input.setAttribute("aria-invalid", "true");
  }
}

async function submit(event) {
  event.preventDefault();
  const form = $("submit-form");
  form.querySelectorAll("[data-error-for]").forEach((slot) => { slot.textContent = ""; });
  form.querySelectorAll("[aria-invalid]").forEach((input) => input.removeAttribute("aria-invalid"));
  $("submit-result").textContent = "";
  const style = form.querySelector("input[name=style]:checked").value;
  const inputs = { subject: $("subject").value };
  if (style === "friend") inputs.color = $("color").value;
  try {
    const accepted = await api("POST", "/requests", { style, inputs }, { "Idempotency-Key": crypto.randomUUID() });
    $("submit-result").textContent = `Queued (${accepted.id}).`;
    $("subject").value = "";
  } catch (error) {
    if (error.status === 400) showFieldErrors(error.message);
    else form.querySelector('[data-error-for="form"]').textContent = error.message;
  }
}

// -- wiring -------------------------------------------------------------------------------------

function start() {
  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) {
      $("sign-in-error").textContent = "Enter a token.";
      return;
    }
    signIn(token);
  });
  $("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showSignIn();
  });
  $("submit-form").addEventListener("submit", submit);
  for (const radio of document.querySelectorAll("input[name=style]")) {
    radio.addEventListener("change", () => { $("color-field").hidden = radio.value !== "friend" || !radio.checked; });
  }
  setInterval(() => { if (state.caller) renderRequests(); }, RELATIVE_TIMES_EVERY_MS);
  setInterval(() => approval.tick(), COUNTDOWN_EVERY_MS);
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved);
  else showSignIn();
}

start();
