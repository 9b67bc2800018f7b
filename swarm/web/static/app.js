// swarm dashboard: sign-in, the live socket, routing, the cluster and runs views.
// Every text from the dispatcher reaches the page through textContent (el() below),
// never through innerHTML: names, parameters and outputs cannot become markup.
"use strict";

const App = {
  signedIn: false, auth: false, socket: null, view: null, backoff: 250, replies: new Map(),
  nextId: 1, clockSkew: 0,
};

// --- DOM helpers -----------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = String(v);
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}
const $ = (id) => document.getElementById(id);
function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
function badge(state) { return el("span", { class: `badge s-${state}`, text: String(state).replace("_", " ") }); }

function fmtTime(ts) {
  if (ts === null || ts === undefined) return "";
  const d = new Date(ts * 1000);
  return d.toLocaleString(undefined, { hour12: false });
}
function fmtDur(s) {
  if (s === null || s === undefined || !isFinite(s)) return "";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  const m = Math.floor(s / 60), r = Math.round(s % 60);
  if (m < 60) return `${m}m ${r}s`;
  return `${Math.floor(m / 60)}h ${m % 60}m`;
}
function fmtInt(n) { return Number(n || 0).toLocaleString("en-US"); }
function throttle(fn, ms) {
  let timer = null, last = 0;
  return function () {
    if (timer) return;
    const wait = Math.max(0, last + ms - Date.now());
    timer = setTimeout(() => { timer = null; last = Date.now(); fn(); }, wait);
  };
}

// --- the API ---------------------------------------------------------------------------

class SignedOut extends Error {}

async function api(path) {
  const r = await fetch(`/api/${path}`, { headers: { "X-Swarm-Request": "1" }, credentials: "same-origin", cache: "no-store" });
  if (r.status === 401) { showSignIn(); throw new SignedOut("signed out"); }
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

async function checkSession() {
  const c = await api("auth/challenge");
  App.auth = c.auth;
  $("signout").hidden = !c.auth;
  return c;
}

async function signIn(token) {
  const c = await api("auth/challenge");
  const proof = window.hmacSha256Hex(token, c.challenge);
  const r = await fetch("/api/auth/session", { headers: { "X-Swarm-Request": "1", "X-Swarm-Proof": `${c.challenge} ${proof}` }, credentials: "same-origin", cache: "no-store" });
  return r.ok;
}

function showSignIn() {
  App.signedIn = false;
  if (App.socket) { App.socket.onclose = null; App.socket.close(); App.socket = null; }
  setLive(false);
  clear($("main"));
  $("drawer").hidden = true;
  $("signin").hidden = false;
  $("token").focus();
}

// --- the live socket -------------------------------------------------------------------

function setLive(on) {
  const n = $("live");
  n.textContent = on ? "live" : "offline";
  n.classList.toggle("off", !on);
}

function connect() {
  if (!App.signedIn || App.socket) return;
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${proto}//${location.host}/ws/dashboard`);
  App.socket = ws;
  ws.onopen = () => { App.backoff = 250; setLive(true); subscribe(); };
  ws.onmessage = (m) => {
    const msg = JSON.parse(m.data);
    if (msg.t === "reply") {
      const done = App.replies.get(msg.id);
      App.replies.delete(msg.id);
      if (done) done(msg);
    } else if (msg.t === "ev" || msg.t === "reload") {
      if (App.view && App.view.onEvents) App.view.onEvents(msg);
    }
  };
  ws.onclose = () => {
    App.socket = null;
    setLive(false);
    for (const done of App.replies.values()) done({ ok: false, error: "connection lost" });
    App.replies.clear();
    if (!App.signedIn) return;
    setTimeout(async () => {
      try { const c = await checkSession(); if (c.signed_in) connect(); else showSignIn(); } catch (e) { connect(); }
    }, App.backoff);
    App.backoff = Math.min(App.backoff * 2, 5000);
  };
}

function subscribe() {
  if (App.socket && App.socket.readyState === 1) {
    App.socket.send(JSON.stringify({ t: "sub", run: App.view && App.view.runId || null }));
  }
}

function act(op, runId) {
  return new Promise((resolve) => {
    if (!App.socket || App.socket.readyState !== 1) { resolve({ ok: false, error: "not connected" }); return; }
    const id = App.nextId++;
    App.replies.set(id, resolve);
    App.socket.send(JSON.stringify({ t: "act", id, op, run_id: runId }));
  });
}

// A confirmation that says what the action will touch; resolves true on "yes".
function confirmAction(title, text, yes) {
  return new Promise((resolve) => {
    $("modal-title").textContent = title;
    $("modal-text").textContent = text;
    $("modal-yes").textContent = yes;
    $("modal").hidden = false;
    const done = (answer) => { $("modal").hidden = true; $("modal-yes").onclick = null; $("modal-no").onclick = null; resolve(answer); };
    $("modal-yes").onclick = () => done(true);
    $("modal-no").onclick = () => done(false);
  });
}

// --- routing ---------------------------------------------------------------------------

const Views = {};

function route() {
  if (!App.signedIn) return;
  const hash = location.hash || "#/";
  const [path, query] = hash.slice(1).split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  let name = "cluster", arg = {};
  if (parts[0] === "runs") { name = "runs"; arg = Object.fromEntries(new URLSearchParams(query || "")); }
  else if (parts[0] === "run" && parts[1]) { name = "run"; arg = { runId: parts[1], symbol: parts[2] === "s" ? parts.slice(3).join("/") : null }; }
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === (name === "run" ? "runs" : name));
  if (App.view && App.view.name === name && App.view.update && App.view.update(arg)) return;
  if (App.view && App.view.leave) App.view.leave();
  $("drawer").hidden = true;
  document.body.dataset.ready = "";
  App.view = new Views[name](clear($("main")), arg);
  subscribe();
}

// --- cluster view ----------------------------------------------------------------------

Views.cluster = class {
  constructor(root) {
    this.name = "cluster"; this.root = root; this.runId = null;
    this.refresh = throttle(() => this.load(), 1000);
    // Slot counts move with every start and end: at full speed, once every 2 s is enough.
    this.refreshBusy = throttle(() => this.load(), 2000);
    this.ticker = setInterval(() => this.tickAges(), 1000);
    this.load();
  }
  leave() { clearInterval(this.ticker); }
  onEvents(msg) {
    if (msg.t === "reload" || (msg.ev && msg.ev.length)) this.refresh();
    else if (msg.activity) this.refreshBusy();
  }
  async load() {
    let d;
    try { d = await api("cluster"); } catch (e) { if (!(e instanceof SignedOut)) this.root.textContent = `Cannot load: ${e.message}`; return; }
    if (App.view !== this) return;
    this.loadedAt = Date.now();
    this.render(d);
    document.body.dataset.ready = "cluster";
  }
  tickAges() {
    if (!this.loadedAt) return;
    const extra = (Date.now() - this.loadedAt) / 1000;
    for (const c of this.root.querySelectorAll("[data-age]")) c.textContent = fmtDur(Number(c.dataset.age) + extra);
  }
  render(d) {
    const r = clear(this.root);
    const used = d.nodes.reduce((a, n) => a + n.running, 0), total = d.nodes.reduce((a, n) => a + n.slots, 0);
    const q = d.queue || {};
    const queued = (q.ready || 0) + (q.retrying || 0);
    r.append(el("h1", { text: "Cluster" }), el("div", { class: "tiles" },
      el("div", { class: "tile", id: "tile-workers" }, el("b", { text: d.nodes.length }), el("span", { text: "workers connected" })),
      el("div", { class: "tile" }, el("b", { text: `${used} / ${total}` }), el("span", { text: "slots used" })),
      el("div", { class: "tile", id: "tile-queue" }, el("b", { text: fmtInt(queued) }), el("span", { text: `queue depth (ready + retrying); ${fmtInt(q.pending || 0)} pending` })),
      el("div", { class: "tile" }, el("b", { text: d.runs.length }), el("span", { text: "active runs" })),
      el("div", { class: "tile" }, el("b", { text: d.waiting_for_capability.length }), el("span", { text: "waiting for a capability" }))));
    const hasBreaker = d.nodes.some((n) => n.breaker !== undefined);
    r.append(el("h2", { text: "Workers" }), el("table", { id: "workers" },
      el("thead", {}, el("tr", {}, ["name", "backends", "labels", "slots used / total", "heartbeat age", "status", hasBreaker && "breaker"].filter(Boolean).map((h) => el("th", { text: h })))),
      el("tbody", {}, d.nodes.length ? d.nodes.map((n) => el("tr", {},
        el("td", { text: n.name, title: n.node_id }),
        el("td", { text: n.capabilities.join(", ") || "none" }),
        el("td", { text: Object.entries(n.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ") }),
        el("td", {}, el("span", { class: "bar" }, this.fill(n.running / Math.max(1, n.slots))), ` ${n.running} / ${n.slots}`),
        el("td", { class: "num", dataset: { age: n.heartbeat_age }, text: fmtDur(n.heartbeat_age) }),
        el("td", {}, badge(n.draining ? "draining" : "connected")),
        hasBreaker && el("td", { text: n.breaker === undefined ? "" : n.breaker })))
        : el("tr", {}, el("td", { colspan: 6, class: "muted", text: "No worker is connected." })))));
    r.append(el("h2", { text: "Active runs" }), el("table", { id: "active-runs" },
      el("thead", {}, el("tr", {}, ["run", "workflow", "status", "symbols", "started"].map((h) => el("th", { text: h })))),
      el("tbody", {}, d.runs.length ? d.runs.map((x) => el("tr", {},
        el("td", {}, el("a", { href: `#/run/${encodeURIComponent(x.run_id)}`, text: x.run_id })),
        el("td", { text: x.workflow }), el("td", {}, badge(x.status)), el("td", { class: "num", text: fmtInt(x.total) }),
        el("td", { text: fmtTime(x.started) })))
        : el("tr", {}, el("td", { colspan: 5, class: "muted", text: "No run is active." })))));
    r.append(el("h2", { text: "Waiting for a capability" }));
    if (!d.waiting_for_capability.length) r.append(el("p", { class: "muted", text: "Every ready symbol has a worker that can run it." }));
    else r.append(el("table", { id: "waiting" },
      el("thead", {}, el("tr", {}, ["run", "symbol", "backend", "labels required"].map((h) => el("th", { text: h })))),
      el("tbody", {}, d.waiting_for_capability.map((w) => el("tr", {},
        el("td", { text: w.run_id }),
        el("td", {}, el("a", { href: `#/run/${encodeURIComponent(w.run_id)}/s/${encodeURIComponent(w.symbol)}`, text: w.symbol })),
        el("td", { text: w.dispatch }), el("td", { text: Object.entries(w.requires || {}).map(([k, v]) => `${k}=${v}`).join(", ") }))))));
    const gone = (d.known_nodes || []).filter((n) => n.status !== "connected");
    if (gone.length) {
      r.append(el("h2", { text: "Workers seen before" }), el("table", {},
        el("thead", {}, el("tr", {}, ["name", "status", "backends", "slots", "joined", "left", "reason"].map((h) => el("th", { text: h })))),
        el("tbody", {}, gone.slice(0, 50).map((n) => el("tr", {},
          el("td", { text: n.name }), el("td", {}, badge(n.status)), el("td", { text: (n.capabilities || []).join(", ") }),
          el("td", { class: "num", text: n.slots }), el("td", { text: fmtTime(n.joined_at) }), el("td", { text: fmtTime(n.left_at) }),
          el("td", { text: n.reason || "" }))))));
    }
  }
  fill(frac) { const i = el("i"); i.style.width = `${Math.round(Math.min(1, frac) * 100)}%`; return i; }
};

// --- runs view -------------------------------------------------------------------------

const RUN_STATUSES = ["running", "paused", "rolling_back", "completed", "failed", "rolled_back", "cancelled"];
const PAGE = 50;

Views.runs = class {
  constructor(root, arg) {
    this.name = "runs"; this.root = root; this.runId = null;
    this.q = { status: "", workflow: "", sort: "start", dir: "desc", offset: "0", ...arg };
    this.refresh = throttle(() => this.load(), 1000);
    this.build();
    this.load();
  }
  update(arg) { this.q = { status: "", workflow: "", sort: "start", dir: "desc", offset: "0", ...arg }; this.load(); return true; }
  onEvents(msg) { if (msg.t === "reload" || (msg.ev && msg.ev.some((e) => e[0].startsWith("run.")))) this.refresh(); }
  go(changes) {
    const q = { ...this.q, ...changes };
    location.hash = `#/runs?${new URLSearchParams(q)}`;
  }
  build() {
    const r = this.root;
    this.status = el("select", { id: "filter-status", onchange: () => this.go({ status: this.status.value, offset: 0 }) },
      el("option", { value: "", text: "every status" }), RUN_STATUSES.map((s) => el("option", { value: s, text: s })));
    this.workflow = el("input", { id: "filter-workflow", placeholder: "workflow name", list: "workflows",
      onchange: () => this.go({ workflow: this.workflow.value, offset: 0 }) });
    this.datalist = el("datalist", { id: "workflows" });
    this.table = el("table", { id: "runs" });
    this.pager = el("div", { class: "pager" });
    r.append(el("h1", { text: "Runs" }), el("div", { class: "filters" }, "Status", this.status, "Workflow", this.workflow, this.datalist), this.table, this.pager);
  }
  async load() {
    const q = this.q;
    let d;
    try {
      d = await api(`runs?${new URLSearchParams({ status: q.status, workflow: q.workflow, sort: q.sort, dir: q.dir, offset: q.offset, limit: PAGE })}`);
    } catch (e) { if (!(e instanceof SignedOut)) this.table.textContent = `Cannot load: ${e.message}`; return; }
    if (App.view !== this) return;
    this.status.value = q.status;
    if (document.activeElement !== this.workflow) this.workflow.value = q.workflow;
    clear(this.datalist).append(...d.workflows.map((w) => el("option", { value: w })));
    const sortable = (label, key) => el("th", {
      class: `sortable num ${q.sort === key ? `sorted-${q.dir}` : ""}`, text: label, dataset: { sort: key },
      onclick: () => this.go({ sort: key, dir: q.sort === key && q.dir === "desc" ? "asc" : "desc", offset: 0 }) });
    clear(this.table).append(
      el("thead", {}, el("tr", {}, el("th", { text: "run" }), el("th", { text: "workflow" }), el("th", { text: "status" }),
        el("th", { text: "progress" }), sortable("started", "start"), sortable("duration", "duration"))),
      el("tbody", {}, d.runs.length ? d.runs.map((x) => {
        const end = x.finished_at || d.now;
        const frac = x.total ? x.done / x.total : 0;
        const bar = el("i"); bar.style.width = `${Math.round(frac * 100)}%`;
        return el("tr", { dataset: { run: x.run_id } },
          el("td", {}, el("a", { href: `#/run/${encodeURIComponent(x.run_id)}`, text: x.run_id })),
          el("td", { text: `${x.workflow} ${x.version}` }), el("td", {}, badge(x.status)),
          el("td", {}, el("span", { class: "bar" }, bar), ` ${fmtInt(x.done)} / ${fmtInt(x.total)}`, x.failed ? el("span", { class: "error", text: ` (${x.failed} failed)` }) : null),
          el("td", { class: "num", text: fmtTime(x.created_at) }), el("td", { class: "num", text: fmtDur(end - x.created_at) }));
      }) : el("tr", {}, el("td", { colspan: 6, class: "muted", text: "No run matches." }))));
    const off = Number(q.offset) || 0;
    clear(this.pager).append(
      el("button", { disabled: off <= 0, onclick: () => this.go({ offset: Math.max(0, off - PAGE) }), text: "‹ newer" }),
      el("span", { class: "muted", text: d.total ? `${off + 1}–${Math.min(off + PAGE, d.total)} of ${fmtInt(d.total)}` : "0 runs" }),
      el("button", { disabled: off + PAGE >= d.total, onclick: () => this.go({ offset: off + PAGE }), text: "older ›" }));
    document.body.dataset.ready = "runs";
  }
};

// --- start -----------------------------------------------------------------------------

async function start() {
  $("signin-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("signin-error").textContent = "";
    const ok = await signIn($("token").value).catch(() => false);
    $("token").value = "";
    if (!ok) { $("signin-error").textContent = "Wrong token."; return; }
    enter();
  });
  $("signout").addEventListener("click", async () => {
    await api("auth/signout").catch(() => null);
    showSignIn();
  });
  $("drawer-close").addEventListener("click", () => {
    if (App.view && App.view.runId) location.hash = `#/run/${encodeURIComponent(App.view.runId)}`;
    else $("drawer").hidden = true;
  });
  window.addEventListener("hashchange", route);
  let c;
  try { c = await checkSession(); } catch (e) { $("main").textContent = `Cannot reach the dispatcher: ${e.message}`; return; }
  if (c.signed_in) enter(); else showSignIn();
}

function enter() {
  App.signedIn = true;
  $("signin").hidden = true;
  $("signout").hidden = !App.auth;
  connect();
  route();
}

document.addEventListener("DOMContentLoaded", start);
