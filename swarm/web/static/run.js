// swarm dashboard: the run view (graph, waterfall, symbol table) and the symbol drawer.
// Built for 100,000 symbols: state lives in flat arrays, events patch them, and each
// panel redraws at most a few times a second, only while it is visible. Canvas text and
// textContent only: nothing from the run becomes markup.
"use strict";

const STATES = ["pending", "ready", "running", "retrying", "completed", "failed", "skipped", "rolled_back", "cancelled"];
const FINISHED = new Set(["completed", "failed", "skipped", "rolled_back", "cancelled"]);
const DONE = new Set(["completed", "rolled_back"]);
const OUTCOME_COLOR = { ok: "--completed", failed: "--failed", timeout: "--retrying", lost: "--rolled_back", running: "--running" };
const SMALL_GRAPH = 300; // above this many symbols the graph shows groups with counts
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
const KIND_STATE = {
  "symbol.queued": "ready", "symbol.started": "running", "symbol.adopted": "running", "symbol.retrying": "retrying",
  "symbol.orphaned": "retrying", "symbol.completed": "completed", "symbol.failed": "failed", "symbol.skipped": "skipped",
  "symbol.cancelled": "cancelled", "symbol.rolled_back": "rolled_back",
};
const RUN_KIND = { "run.completed": "completed", "run.failed": "failed", "run.rolled_back": "rolled_back", "run.cancelled": "cancelled",
  "run.paused": "paused", "run.rolling_back": "rolling_back", "run.rollback_requested": "rolling_back" };

function siftUp(h) {
  let i = h.length - 1;
  while (i > 0) { const p = (i - 1) >> 1; if (h[p][0] <= h[i][0]) break; [h[p], h[i]] = [h[i], h[p]]; i = p; }
}
function siftDown(h) {
  let i = 0;
  for (;;) {
    const l = 2 * i + 1, r = l + 1; let m = i;
    if (l < h.length && h[l][0] < h[m][0]) m = l;
    if (r < h.length && h[r][0] < h[m][0]) m = r;
    if (m === i) return;
    [h[m], h[i]] = [h[i], h[m]]; i = m;
  }
}

function prefixOf(name) {
  const stripped = name.replace(/[._-]?\d+$/, "");
  if (stripped && stripped !== name) return stripped;
  const cut = Math.max(name.lastIndexOf("."), name.lastIndexOf("-"), name.lastIndexOf("_"));
  return cut > 0 ? name.slice(0, cut) : name;
}

// Fields the drawer lays out itself; any other (progress, checkpoint, breaker... as later
// versions add them) is shown as it comes, by name.
const TASK_FIELDS = new Set(["task_id", "symbol", "kind", "parent", "dispatch", "state", "attempts", "losses", "node", "due_at", "started_at", "finished_at", "result", "error"]);
const ATTEMPT_FIELDS = new Set(["token", "attempt", "node", "started_at", "finished_at", "outcome", "exit_code", "duration_ms", "result", "error", "stderr", "truncated"]);
function extraFields(row, known) {
  return Object.entries(row).filter(([k, v]) => !known.has(k) && v !== null && v !== undefined)
    .map(([k, v]) => [k.replace(/_/g, " "), typeof v === "string" ? v : JSON.stringify(v)]);
}

Views.run = class {
  constructor(root, arg) {
    this.name = "run"; this.root = root; this.runId = arg.runId; this.tab = "graph";
    this.openSymbol = arg.symbol; this.groupBy = "level";
    this.sort = { key: "index", dir: 1 }; this.filter = ""; this.stateFilter = "";
    this.dirty = { head: true, graph: true, table: true, water: true };
    this.frame = null;
    this.t0 = performance.now();
    this.root.append(el("p", { class: "muted", text: `Loading ${this.runId}…` }));
    this.reloadSoon = throttle(() => this.load(), 1500);
    this.drawerSoon = throttle(() => this.loadDrawer(), 500);
    this.ticker = setInterval(() => { this.dirty.head = true; if (this.tab === "water" && this.isLive()) this.dirty.water = true; this.schedule(); }, 1000);
    this.load();
  }
  leave() { clearInterval(this.ticker); if (this.frame) cancelAnimationFrame(this.frame); }
  update(arg) {
    if (arg.runId !== this.runId) return false;
    this.openSymbol = arg.symbol;
    if (arg.symbol) this.loadDrawer(); else $("drawer").hidden = true;
    return true;
  }
  isLive() { return this.run && !["completed", "failed", "rolled_back", "cancelled"].includes(this.run.status); }

  async load() {
    let d;
    try { d = await api(`run/${encodeURIComponent(this.runId)}`); } catch (e) { if (!(e instanceof SignedOut)) clear(this.root).append(el("p", { class: "error", text: `Cannot load run ${this.runId}: ${e.message}` })); return; }
    if (App.view !== this) return;
    this.apply(d);
    this.counts();
    if (!this.built) this.build();
    for (const k of Object.keys(this.dirty)) this.dirty[k] = true;
    this.order = null;
    this.draw(true);
    document.body.dataset.ready = "run";
    this.loadedIn = performance.now() - this.t0;
    document.body.dataset.loadMs = String(Math.round(this.loadedIn));
    if (!document.body.dataset.readyAt) document.body.dataset.readyAt = String(Math.round(performance.now())); // since navigation
    if (this.openSymbol) this.loadDrawer();
    if (this.tab === "water") this.loadAttempts();
  }
  apply(d) {
    this.run = d.run; this.names = d.names; this.deps = d.deps; this.levels = d.levels; this.dispatch = d.dispatch;
    this.state = d.state; this.node = d.node; this.attempts = d.attempts; this.started = d.started; this.finished = d.finished;
    this.skew = d.now - Date.now() / 1000; // the dispatcher's clock minus ours
    this.index = new Map(); for (let i = 0; i < d.names.length; i++) this.index.set(d.names[i], i);
    this.firstStart = null;
    for (const s of d.started) if (s !== null && (this.firstStart === null || s < this.firstStart)) this.firstStart = s;
  }
  now() { return Date.now() / 1000 + (this.skew || 0); }
  counts() {
    const c = {}; for (const s of STATES) c[s] = 0;
    for (const s of this.state) c[s] = (c[s] || 0) + 1;
    this.count = c;
  }

  // --- live events ---------------------------------------------------------------------
  onEvents(msg) {
    if (msg.t === "reload") { this.reloadSoon(); return; }
    let touched = false, drawer = false;
    for (const [kind, ts, runId, symbol, node, attempt, info] of msg.ev) {
      if (runId !== this.runId) continue;
      touched = true;
      if (kind.startsWith("run.")) {
        const status = (info && info.status) || RUN_KIND[kind];
        if (status) this.run.status = status;
        if (["completed", "failed", "rolled_back", "cancelled"].includes(status)) this.run.finished_at = ts;
        continue;
      }
      if (symbol === this.openSymbol) drawer = true;
      const i = this.index.get(symbol);
      if (kind === "symbol.started" || kind === "symbol.adopted") {
        if (this.attemptRows) this.attemptRows.push({ symbol, attempt, node, start: ts, end: null, outcome: "running" });
        if (this.firstStart === null) this.firstStart = ts;
      } else if (kind === "attempt.finished" || kind === "attempt.lost") {
        const a = this.findAttempt(symbol, attempt);
        if (a) { a.end = ts; a.outcome = kind === "attempt.lost" ? "lost" : info.ok ? "ok" : info.timed_out ? "timeout" : "failed"; }
      }
      if (i === undefined) continue; // a rollback symbol: in the waterfall only
      const st = KIND_STATE[kind];
      if (!st) continue;
      const old = this.state[i];
      this.state[i] = st; this.count[old]--; this.count[st] = (this.count[st] || 0) + 1;
      if (kind === "symbol.started") { this.node[i] = node || ""; this.attempts[i] = attempt || this.attempts[i]; if (this.started[i] === null) this.started[i] = ts; }
      if (FINISHED.has(st)) this.finished[i] = ts;
    }
    if (!touched) return;
    this.dirty.head = this.dirty.graph = this.dirty.table = this.dirty.water = true;
    this.schedule();
    if (drawer) this.drawerSoon();
  }
  findAttempt(symbol, attempt) {
    if (!this.attemptRows) return null;
    for (let k = this.attemptRows.length - 1, seen = 0; k >= 0 && seen < 50000; k--, seen++) {
      const a = this.attemptRows[k];
      if (a.symbol === symbol && a.attempt === attempt) return a;
    }
    return null;
  }
  // Redraws wait for the next animation frame; for a big run the header is redrawn twice
  // a second and the panel once: a run at full speed costs the page (and the machine it
  // may share with workers) a few redraws a second, not one per event.
  schedule() {
    if (this.frame || this.pending) return;
    const heavy = this.names && this.names.length > 2000;
    this.pending = setTimeout(() => {
      this.pending = null;
      this.frame = requestAnimationFrame(() => { this.frame = null; this.draw(); });
    }, heavy ? 500 : 50);
  }
  draw(force) {
    if (App.view !== this || !this.built) return;
    if (this.dirty.head) { this.drawHead(); this.dirty.head = false; }
    if (!force && this.names.length > 2000 && performance.now() - (this.panelAt || 0) < 900) {
      if (this.dirty[this.tab]) this.schedule();
      return;
    }
    this.panelAt = performance.now();
    if (this.tab === "graph" && this.dirty.graph) { this.drawGraph(); this.dirty.graph = false; }
    if (this.tab === "table" && this.dirty.table) { this.drawTable(true); this.dirty.table = false; }
    if (this.tab === "water" && this.dirty.water && this.attemptRows) { this.drawWater(); this.dirty.water = false; }
  }

  // --- layout --------------------------------------------------------------------------
  build() {
    this.built = true;
    const r = clear(this.root);
    this.head = el("div", { class: "runhead", id: "runhead" });
    this.tabs = el("div", { class: "tabs" }, [["graph", "Graph"], ["water", "Waterfall"], ["table", "Symbols"]].map(([k, label]) =>
      el("button", { dataset: { tab: k }, id: `tab-${k}`, text: label, onclick: () => this.show(k) })));
    this.panels = {
      graph: el("div", { class: "panel", id: "panel-graph" }),
      water: el("div", { class: "panel", id: "panel-water", hidden: true }),
      table: el("div", { class: "panel", id: "panel-table", hidden: true }),
    };
    r.append(el("h1", {}, el("a", { href: "#/runs", text: "Runs" }), " / ", this.runId), this.head, this.tabs, this.panels.graph, this.panels.water, this.panels.table);
    this.buildTable();
    this.buildWater();
    this.show(this.tab);
  }
  show(tab) {
    this.tab = tab;
    for (const [k, p] of Object.entries(this.panels)) p.hidden = k !== tab;
    for (const b of this.tabs.children) b.classList.toggle("active", b.dataset.tab === tab);
    if (tab === "water" && !this.attemptRows) this.loadAttempts();
    this.dirty[tab] = true;
    this.draw(true);
  }

  drawHead() {
    const run = this.run, c = this.count, total = this.names.length;
    const done = (c.completed || 0) + (c.rolled_back || 0);
    const ended = total - (c.pending || 0) - (c.ready || 0) - (c.running || 0) - (c.retrying || 0);
    const end = run.finished_at || this.now();
    let eta = "";
    if (this.isLive() && this.firstStart !== null && ended > 0 && ended < total) {
      const rate = ended / Math.max(0.001, this.now() - this.firstStart);
      eta = `ETA ${fmtDur((total - ended) / rate)}`;
    }
    if (!this.h) { // built once: its elements stay, so what a user clicks is not replaced
      const span = (attrs) => el("span", attrs || {});
      this.h = { status: span({ id: "run-status" }), bar: el("div", { class: "progress" }), progress: span({ id: "run-progress" }),
        failed: span({ class: "error" }), running: span(), duration: span({ id: "run-duration" }), eta: span({ id: "run-eta" }),
        mode: span({ class: "muted" }), actions: span({ class: "actions" }) };
      const h = this.h;
      clear(this.head).append(el("span", {}, el("b", { text: `${run.workflow} ${run.version}` }), " ", h.status),
        el("span", { class: "grow" }, h.bar, h.progress, h.failed, h.running), h.duration, h.eta, h.mode, h.actions);
    }
    const h = this.h, st = run.status;
    h.bar.title = STATES.map((s) => `${s}: ${c[s] || 0}`).join(", ");
    clear(h.bar).append(...STATES.filter((s) => c[s]).map((s) => { const i = el("i", { class: `s-${s}` }); i.style.width = `${(100 * c[s]) / Math.max(1, total)}%`; return i; }));
    h.progress.textContent = ` ${fmtInt(done)} / ${fmtInt(total)} done`;
    h.failed.textContent = c.failed ? ` · ${fmtInt(c.failed)} failed` : "";
    h.running.textContent = c.running ? ` · ${fmtInt(c.running)} running` : "";
    h.duration.textContent = `duration ${fmtDur(end - run.created_at)}`;
    h.eta.textContent = eta;
    h.mode.textContent = `${run.mode}, on failure: ${run.on_failure}`;
    if (h.shownStatus !== st) {
      h.shownStatus = st;
      clear(h.status).append(badge(st));
      const add = (op, label, danger) => h.actions.append(el("button", { id: `act-${op}`, class: danger ? "danger" : "", text: label, onclick: () => this.action(op) }));
      clear(h.actions);
      if (st === "running") add("pause", "Pause");
      if (st === "paused") add("resume", "Resume");
      if (st === "running" || st === "paused" || st === "rolling_back") add("cancel", "Cancel", true);
      if (st === "completed" || st === "failed") add("rollback", "Roll back", true);
    }
  }

  async action(op) {
    const c = this.count, total = this.names.length, run = this.run;
    const running = c.running || 0, waiting = (c.pending || 0) + (c.ready || 0) + (c.retrying || 0);
    const nodes = [...new Set(this.names.map((_, i) => this.state[i] === "running" ? this.node[i] : null).filter(Boolean))];
    const who = `run ${this.runId} (${run.workflow}, ${fmtInt(total)} symbols)`;
    const texts = {
      pause: [`Pause ${who}?`, `The ${fmtInt(running)} running symbols finish; the ${fmtInt(waiting)} symbols not started yet do not start until you resume.`, "Pause run"],
      resume: [`Resume ${who}?`, `The ${fmtInt(waiting)} waiting symbols start again as workers are free.`, "Resume run"],
      cancel: [`Cancel ${who}?`, `The ${fmtInt(running)} running symbols are terminated${nodes.length ? ` (on ${nodes.slice(0, 5).join(", ")}${nodes.length > 5 ? ", …" : ""})` : ""}, the ${fmtInt(waiting)} not started are cancelled, and the run ends cancelled. The ${fmtInt(c.completed || 0)} completed symbols are not rolled back.`, "Cancel run"],
      rollback: [`Roll back ${who}?`, `The rollbacks of the ${fmtInt(c.completed || 0)} completed symbols that have one run, in reverse dependency order; the run ends rolled back.`, "Roll back"],
    };
    const [title, text, yes] = texts[op];
    if (!(await confirmAction(title, text, yes))) return;
    const reply = await act(op, this.runId);
    if (!reply.ok) { await confirmAction(`Could not ${op}`, reply.error || "refused", "OK"); return; }
    this.reloadSoon();
  }

  // --- graph ---------------------------------------------------------------------------
  drawGraph() {
    const p = this.panels.graph;
    if (this.names.length <= SMALL_GRAPH) { this.drawSmallGraph(p); return; }
    this.drawGroups(p);
  }
  drawSmallGraph(p) {
    const n = this.names.length;
    const byLevel = [];
    for (let i = 0; i < n; i++) (byLevel[this.levels[i]] = byLevel[this.levels[i]] || []).push(i);
    const W = 170, BW = 150, H = 28, BH = 22, PAD = 10;
    const pos = new Array(n);
    let rows = 0;
    byLevel.forEach((ids, lv) => { (ids || []).forEach((i, k) => { pos[i] = [PAD + lv * W, PAD + k * H]; }); rows = Math.max(rows, (ids || []).length); });
    if (!this.graphCanvas) {
      this.graphCanvas = el("canvas", { id: "graph-canvas", onclick: (e) => this.graphClick(e) });
      clear(p).append(this.legend(), el("div", { class: "scroll" }, this.graphCanvas));
    }
    const cv = this.graphCanvas, dpr = window.devicePixelRatio || 1;
    const width = PAD * 2 + byLevel.length * W, height = PAD * 2 + rows * H;
    cv.width = width * dpr; cv.height = height * dpr; cv.style.width = `${width}px`; cv.style.height = `${height}px`;
    const g = cv.getContext("2d"); g.scale(dpr, dpr);
    g.strokeStyle = "#b7beca"; g.lineWidth = 1;
    for (let i = 0; i < n; i++) for (const d of this.deps[i]) {
      const [x1, y1] = pos[d], [x2, y2] = pos[i];
      g.beginPath(); g.moveTo(x1 + BW, y1 + BH / 2); g.bezierCurveTo(x1 + BW + 15, y1 + BH / 2, x2 - 15, y2 + BH / 2, x2, y2 + BH / 2); g.stroke();
    }
    g.font = "12px system-ui, sans-serif"; g.textBaseline = "middle";
    for (let i = 0; i < n; i++) {
      const [x, y] = pos[i], st = this.state[i];
      g.fillStyle = css(`--${st}`); g.fillRect(x, y, BW, BH);
      g.fillStyle = st === "pending" || st === "ready" ? "#1d2330" : "#fff";
      g.save(); g.beginPath(); g.rect(x, y, BW - 4, BH); g.clip(); g.fillText(this.names[i], x + 6, y + BH / 2); g.restore();
    }
    this.graphPos = { pos, BW, BH };
  }
  graphClick(e) {
    if (!this.graphPos) return;
    const r = this.graphCanvas.getBoundingClientRect(), x = e.clientX - r.left, y = e.clientY - r.top;
    const { pos, BW, BH } = this.graphPos;
    for (let i = 0; i < pos.length; i++) if (x >= pos[i][0] && x <= pos[i][0] + BW && y >= pos[i][1] && y <= pos[i][1] + BH) { this.openDrawer(this.names[i]); return; }
  }
  legend() {
    return el("div", { class: "legend" }, STATES.map((s) => { const i = el("i", { class: `s-${s}` }); return el("span", {}, i, s.replace("_", " ")); }));
  }
  drawGroups(p) {
    const n = this.names.length;
    const groups = new Map();
    if (this.groupBy === "level") {
      const levels = Math.max(...this.levels) + 1;
      const span = Math.ceil(levels / 200); // at most 200 rows, whatever the depth
      for (let i = 0; i < n; i++) {
        const b = Math.floor(this.levels[i] / span);
        let gr = groups.get(b);
        if (!gr) groups.set(b, gr = { name: span === 1 ? `level ${b}` : `levels ${b * span}–${Math.min(levels - 1, b * span + span - 1)}`, key: b, counts: {}, total: 0 });
        gr.counts[this.state[i]] = (gr.counts[this.state[i]] || 0) + 1; gr.total++;
      }
    } else {
      for (let i = 0; i < n; i++) {
        const k = prefixOf(this.names[i]);
        let gr = groups.get(k);
        if (!gr) groups.set(k, gr = { name: k, key: k, counts: {}, total: 0 });
        gr.counts[this.state[i]] = (gr.counts[this.state[i]] || 0) + 1; gr.total++;
      }
    }
    let list = [...groups.values()];
    if (this.groupBy === "level") list.sort((a, b) => a.key - b.key); else list.sort((a, b) => b.total - a.total);
    const shown = list.slice(0, 200);
    const select = el("select", { id: "group-by", onchange: () => { this.groupBy = select.value; this.dirty.graph = true; this.draw(true); } },
      el("option", { value: "level", text: "levels" }), el("option", { value: "prefix", text: "name prefixes" }));
    select.value = this.groupBy;
    const rows = shown.map((gr) => {
      const bar = el("span", { class: "gbar" }, STATES.filter((s) => gr.counts[s]).map((s) => { const i = el("i", { class: `s-${s}` }); i.style.width = `${(100 * gr.counts[s]) / gr.total}%`; return i; }));
      const text = STATES.filter((s) => gr.counts[s]).map((s) => `${fmtInt(gr.counts[s])} ${s.replace("_", " ")}`).join(", ");
      return el("div", { class: "group", title: "show these symbols", onclick: () => this.showGroup(gr) },
        el("span", { class: "gname", text: gr.name }), bar, el("span", { class: "gcount", text: `${fmtInt(gr.total)}: ${text}` }));
    });
    clear(p).append(el("div", { class: "tools" }, `${fmtInt(n)} symbols in ${fmtInt(list.length)} groups, by `, select,
      list.length > shown.length ? el("span", { class: "muted", text: ` (the ${shown.length} largest shown)` }) : null),
      this.legend(), el("div", { class: "groups scroll", id: "graph-groups" }, rows));
  }
  showGroup(gr) {
    this.groupFilter = this.groupBy === "level" ? { level: gr.key, span: Math.ceil((Math.max(...this.levels) + 1) / 200) } : { prefix: gr.key };
    this.order = null;
    this.groupNote.textContent = `group: ${gr.name} `;
    this.groupNote.hidden = false;
    this.show("table");
  }

  // --- symbol table (virtual: only the visible rows exist) -------------------------------
  buildTable() {
    const p = this.panels.table;
    const cols = [["index", "#", "c-att"], ["name", "symbol", "c-name"], ["level", "level", "c-level"], ["state", "state", "c-state"], ["dispatch", "backend", "c-dispatch"],
      ["node", "node", "c-node"], ["attempts", "attempts", "c-att"], ["start", "started", "c-start"], ["duration", "duration", "c-dur"]];
    this.filterInput = el("input", { id: "symbol-filter", placeholder: "filter by name", oninput: throttle(() => { this.filter = this.filterInput.value; this.order = null; this.drawTable(); }, 200) });
    const states = el("select", { id: "symbol-state", onchange: () => { this.stateFilter = states.value; this.order = null; this.drawTable(); } },
      el("option", { value: "", text: "every state" }), STATES.map((s) => el("option", { value: s, text: s })));
    this.groupNote = el("button", { class: "link", hidden: true, onclick: () => { this.groupFilter = null; this.groupNote.hidden = true; this.order = null; this.drawTable(); } });
    this.tableCount = el("span", { class: "muted" });
    this.vhead = el("div", { class: "vhead" }, cols.map(([k, label, cls]) => el("span", { class: cls, dataset: { sort: k }, text: label, onclick: () => {
      this.sort = { key: k, dir: this.sort.key === k ? -this.sort.dir : 1 }; this.order = null; this.drawTable();
    } })));
    this.vbody = el("div", { class: "vtable", id: "symbols" });
    this.vscroll = el("div", { class: "scroll", onscroll: () => this.drawRows() }, this.vhead, this.vbody);
    this.cols = cols;
    p.append(el("div", { class: "filters" }, this.filterInput, states, this.groupNote, this.tableCount), this.vscroll);
  }
  sortKey(k) {
    const now = this.now();
    switch (k) {
      case "name": return (i) => this.names[i];
      case "level": return (i) => this.levels[i];
      case "state": return (i) => STATES.indexOf(this.state[i]);
      case "dispatch": return (i) => this.dispatch[i];
      case "node": return (i) => this.node[i];
      case "attempts": return (i) => this.attempts[i];
      case "start": return (i) => this.started[i] === null ? Infinity : this.started[i];
      case "duration": return (i) => this.started[i] === null ? -1 : (this.finished[i] || now) - this.started[i];
      default: return (i) => i;
    }
  }
  drawTable(live) {
    // A live update re-sorts only when the order depends on what changed.
    if (!this.order || (live && ["state", "node", "attempts", "start", "duration"].includes(this.sort.key)) || (live && this.stateFilter)) {
      const f = this.filter.toLowerCase(), sf = this.stateFilter, gf = this.groupFilter;
      const ids = [];
      for (let i = 0; i < this.names.length; i++) {
        if (f && !this.names[i].toLowerCase().includes(f)) continue;
        if (sf && this.state[i] !== sf) continue;
        if (gf && gf.prefix !== undefined && prefixOf(this.names[i]) !== gf.prefix) continue;
        if (gf && gf.level !== undefined && Math.floor(this.levels[i] / gf.span) !== gf.level) continue;
        ids.push(i);
      }
      if (this.sort.key !== "index") {
        const key = this.sortKey(this.sort.key), keys = new Map(), d = this.sort.dir;
        for (const i of ids) keys.set(i, key(i));
        ids.sort((a, b) => { const x = keys.get(a), y = keys.get(b); return (x < y ? -1 : x > y ? 1 : a - b) * d; });
      } else if (this.sort.dir < 0) ids.reverse();
      this.order = ids;
      for (const s of this.vhead.children) { s.classList.toggle("sorted-asc", s.dataset.sort === this.sort.key && this.sort.dir > 0); s.classList.toggle("sorted-desc", s.dataset.sort === this.sort.key && this.sort.dir < 0); }
    }
    this.tableCount.textContent = `${fmtInt(this.order.length)} of ${fmtInt(this.names.length)} symbols`;
    this.vbody.style.height = `${this.order.length * 24}px`;
    this.drawRows();
  }
  drawRows() {
    if (!this.order) return;
    const top = this.vscroll.scrollTop, h = this.vscroll.clientHeight || 600;
    const from = Math.max(0, Math.floor(top / 24) - 5), to = Math.min(this.order.length, Math.ceil((top + h) / 24) + 5);
    const now = this.now();
    const rows = [];
    for (let k = from; k < to; k++) {
      const i = this.order[k];
      const dur = this.started[i] === null ? "" : fmtDur((this.finished[i] || now) - this.started[i]);
      const row = el("div", { class: "vrow", dataset: { symbol: this.names[i] }, onclick: () => this.openDrawer(this.names[i]) },
        el("span", { class: "c-att", text: i + 1 }), el("span", { class: "c-name", text: this.names[i], title: this.names[i] }),
        el("span", { class: "c-level", text: this.levels[i] }), el("span", { class: "c-state" }, badge(this.state[i])),
        el("span", { class: "c-dispatch", text: this.dispatch[i] }), el("span", { class: "c-node", text: this.node[i] }),
        el("span", { class: "c-att", text: this.attempts[i] }), el("span", { class: "c-start", text: this.started[i] ? new Date(this.started[i] * 1000).toLocaleTimeString(undefined, { hour12: false }) : "" }),
        el("span", { class: "c-dur", text: dur }));
      row.style.top = `${k * 24}px`;
      rows.push(row);
    }
    clear(this.vbody).append(...rows);
  }

  // --- waterfall: one lane per worker slot, one bar per attempt ----------------------------
  buildWater() {
    const p = this.panels.water;
    this.waterCanvas = el("canvas", { id: "waterfall" });
    this.waterInfo = el("span", { class: "muted" });
    const zoom = (f) => { const v = this.view; if (!v) return; const mid = (v[0] + v[1]) / 2, half = ((v[1] - v[0]) / 2) * f; this.view = [mid - half, mid + half]; this.dirty.water = true; this.draw(true); };
    p.append(el("div", { class: "tools" }, el("button", { text: "+", title: "zoom in", onclick: () => zoom(0.5) }), el("button", { text: "−", title: "zoom out", onclick: () => zoom(2) }),
      el("button", { text: "fit", onclick: () => { this.view = null; this.dirty.water = true; this.draw(true); } }),
      "wheel: zoom · drag: pan · click a bar: its symbol ", this.waterInfo),
      el("div", { class: "legend" }, Object.entries({ ok: "ok", failed: "failed", timeout: "timed out", lost: "lost", running: "running" }).map(([k, label]) => {
        const i = el("i"); i.style.background = css(OUTCOME_COLOR[k]); return el("span", {}, i, label);
      }), el("span", {}, "a retry has a dark top edge")),
      el("div", { class: "scroll", id: "water-scroll" }, this.waterCanvas));
    const cv = this.waterCanvas;
    cv.addEventListener("wheel", (e) => {
      if (!this.view || !this.waterGeom) return;
      e.preventDefault();
      const t = this.xToT(e.offsetX), f = e.deltaY > 0 ? 1.25 : 0.8;
      this.view = [t - (t - this.view[0]) * f, t + (this.view[1] - t) * f]; this.dirty.water = true; this.draw(true);
    }, { passive: false });
    let drag = null;
    cv.addEventListener("mousedown", (e) => { drag = { x: e.clientX, view: this.view && this.view.slice(), moved: false }; });
    window.addEventListener("mouseup", () => { setTimeout(() => { drag = null; }, 0); });
    cv.addEventListener("mousemove", (e) => {
      if (!drag || !drag.view || !this.waterGeom) return;
      const dx = e.clientX - drag.x; if (Math.abs(dx) > 3) drag.moved = true;
      const per = (drag.view[1] - drag.view[0]) / this.waterGeom.plotW;
      this.view = [drag.view[0] - dx * per, drag.view[1] - dx * per]; this.dirty.water = true; this.draw(true);
    });
    cv.addEventListener("click", (e) => { if (drag && drag.moved) return; this.waterClick(e); });
  }
  async loadAttempts() {
    if (this.loadingAttempts) return;
    this.loadingAttempts = true;
    try {
      const d = await api(`run/${encodeURIComponent(this.runId)}/attempts`);
      const rows = [];
      for (let k = 0; k < d.symbol.length; k++) rows.push({ symbol: d.symbol[k], attempt: d.attempt[k], node: d.node[k], start: d.start[k], end: d.end[k], outcome: d.outcome[k] });
      this.attemptRows = rows; this.slots = d.slots;
      this.dirty.water = true; this.draw(true);
    } catch (e) { if (!(e instanceof SignedOut)) this.waterInfo.textContent = `Cannot load attempts: ${e.message}`; }
    finally { this.loadingAttempts = false; }
  }
  lanes() {
    // Interval partitioning per node: an attempt takes the lane that frees first, if it is
    // free by the attempt's start, else a new one (a heap of lane ends: 100,000 attempts on
    // 512 slots in a few ms). Lanes come out as the node's busy slots.
    const byNode = new Map(), now = this.now();
    const rows = this.attemptRows.slice().sort((a, b) => a.start - b.start);
    for (const a of rows) {
      const key = a.node || "?";
      let heap = byNode.get(key); if (!heap) byNode.set(key, heap = []);
      const end = a.end === null ? now : a.end;
      if (heap.length && heap[0][0] <= a.start + 1e-6) { a.lane = heap[0][1]; heap[0] = [end, a.lane]; siftDown(heap); }
      else { a.lane = heap.length; heap.push([end, a.lane]); siftUp(heap); }
    }
    const names = [...byNode.keys()].sort();
    let offset = 0; const base = new Map();
    for (const n of names) { base.set(n, offset); offset += byNode.get(n).length; }
    for (const a of rows) a.row = base.get(a.node || "?") + a.lane;
    return { rows, names, base, total: offset, byNode };
  }
  xToT(x) { const g = this.waterGeom; return this.view[0] + ((x - g.left) / g.plotW) * (this.view[1] - this.view[0]); }
  drawWater() {
    const { rows, names, base, total, byNode } = this.lanes();
    const now = this.now();
    let t0 = Infinity, t1 = -Infinity;
    for (const a of rows) { t0 = Math.min(t0, a.start); t1 = Math.max(t1, a.end === null ? now : a.end); }
    if (!rows.length) { t0 = this.run.created_at; t1 = this.run.finished_at || now; }
    if (t1 <= t0) t1 = t0 + 1;
    if (!this.view) this.view = [t0 - (t1 - t0) * 0.01, t1 + (t1 - t0) * 0.01];
    const cv = this.waterCanvas, dpr = window.devicePixelRatio || 1;
    const width = Math.max(600, this.panels.water.clientWidth - 24), LANE = 14, TOP = 24, left = 150;
    const height = TOP + Math.max(1, total) * LANE + 4;
    cv.width = width * dpr; cv.height = height * dpr; cv.style.width = `${width}px`; cv.style.height = `${height}px`;
    const g = cv.getContext("2d"); g.scale(dpr, dpr);
    const plotW = width - left - 10;
    this.waterGeom = { left, plotW, LANE, TOP, rows };
    const [v0, v1] = this.view, scale = plotW / (v1 - v0);
    // axis: a tick step of 1, 2 or 5 times a power of ten, at least 90 px apart
    g.font = "11px system-ui, sans-serif"; g.fillStyle = "#6b7280"; g.textBaseline = "middle";
    let step = 0.001; const steps = [1, 2, 5];
    outer: for (let p = 0.001; p < 1e7; p *= 10) for (const m of steps) { step = m * p; if (step * scale >= 90) break outer; }
    const origin = t0; // ticks count from the first attempt's start
    const digits = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
    const label = (t) => (step < 60 ? `+${t.toFixed(digits)} s` : `+${fmtDur(t)}`);
    g.strokeStyle = "#eceff4";
    for (let t = Math.ceil((v0 - origin) / step) * step; origin + t <= v1; t += step) {
      const x = left + (origin + t - v0) * scale;
      g.beginPath(); g.moveTo(x, TOP - 4); g.lineTo(x, height); g.stroke();
      g.fillText(label(t), x + 3, 10);
    }
    // lane labels
    g.fillStyle = "#1d2330";
    for (const n of names) {
      const y = TOP + base.get(n) * LANE;
      g.fillText(`${n} (${byNode.get(n).length})`.slice(0, 24), 4, y + LANE / 2);
      g.strokeStyle = "#d5dae3"; g.beginPath(); g.moveTo(0, y); g.lineTo(width, y); g.stroke();
    }
    // bars, clipped to the plot; bars under a pixel wide in the same lane and pixel merge
    g.save(); g.beginPath(); g.rect(left, TOP, plotW, height - TOP); g.clip();
    const colors = {}; for (const [k, v] of Object.entries(OUTCOME_COLOR)) colors[k] = css(v);
    const lastX = new Map();
    let drawn = 0;
    for (const a of rows) {
      const end = a.end === null ? now : a.end;
      if (end < v0 || a.start > v1) continue;
      const x = left + (a.start - v0) * scale, w = Math.max(1, (end - a.start) * scale);
      const y = TOP + a.row * LANE + 2;
      if (w < 2) { const px = Math.round(x); if (lastX.get(a.row) === px) continue; lastX.set(a.row, px); }
      g.fillStyle = colors[a.outcome] || colors.failed; g.fillRect(x, y, w, LANE - 4);
      if (a.attempt > 1) { g.fillStyle = "#1d2330"; g.fillRect(x, y, w, 2); }
      drawn++;
    }
    g.restore();
    this.waterInfo.textContent = `${fmtInt(rows.length)} attempts on ${fmtInt(total)} slot lanes; ${fmtInt(drawn)} bars drawn`;
  }
  waterClick(e) {
    const g = this.waterGeom; if (!g || e.offsetX < g.left) return;
    const row = Math.floor((e.offsetY - g.TOP) / g.LANE), t = this.xToT(e.offsetX), now = this.now();
    const slack = 3 * (this.view[1] - this.view[0]) / g.plotW;
    for (const a of g.rows) if (a.row === row && a.start - slack <= t && t <= (a.end === null ? now : a.end) + slack) { this.openDrawer(a.symbol); return; }
  }

  // --- the symbol drawer ---------------------------------------------------------------
  openDrawer(name) { location.hash = `#/run/${encodeURIComponent(this.runId)}/s/${encodeURIComponent(name)}`; }
  async loadDrawer() {
    const name = this.openSymbol;
    if (!name) return;
    const body = $("drawer-body");
    $("drawer-title").textContent = name;
    $("drawer").hidden = false;
    let d;
    try { d = await api(`run/${encodeURIComponent(this.runId)}/symbol/${encodeURIComponent(name)}`); } catch (e) { if (!(e instanceof SignedOut)) clear(body).append(el("p", { class: "error", text: e.message })); return; }
    if (this.openSymbol !== name || App.view !== this) return;
    const t = d.task, s = d.spec;
    const kv = (pairs) => el("dl", { class: "kv" }, pairs.filter(([, v]) => v !== undefined && v !== null && v !== "").map(([k, v]) => [el("dt", { text: k }), el("dd", {}, v)]));
    const pre = (value) => el("pre", { text: typeof value === "string" ? value : JSON.stringify(value, null, 2) });
    const parts = [kv([["state", badge(t.state)], ["backend", t.dispatch], ["type", s.type], ["context", s.context], ["level", s.level],
      ["attempts", `${t.attempts}${t.losses ? ` (${t.losses} lost with their worker)` : ""}`], ["node", t.node],
      ["started", fmtTime(t.started_at)], ["finished", fmtTime(t.finished_at)],
      ["duration", t.started_at ? fmtDur((t.finished_at || d.now) - t.started_at) : ""],
      ["retry due", t.state === "retrying" && t.due_at ? fmtTime(t.due_at) : ""],
      ["resources", (s.resources || []).join(", ")], ["requires", Object.entries(s.requires || {}).map(([k, v]) => `${k}=${v}`).join(", ")],
      ...extraFields(t, TASK_FIELDS)])];
    if (t.error) parts.push(el("h3", { text: "Error" }), el("pre", { class: "error", id: "symbol-error", text: t.error }));
    if (d.why && d.why.length) {
      parts.push(el("h3", { text: "Why it is not running" }), el("ul", { class: "why", id: "symbol-why" }, d.why.map((w) => el("li", { text: w.kind === "retry" ? `retry due at ${fmtTime(w.due)}` : w.due && w.kind === "waiting" ? `${w.text} (until ${fmtTime(w.due)})` : w.text }))));
    }
    if (d.dependencies.length) parts.push(el("h3", { text: "Dependencies" }), el("p", {}, d.dependencies.map((x, k) => [k ? ", " : "", el("a", { href: `#/run/${encodeURIComponent(this.runId)}/s/${encodeURIComponent(x.symbol)}`, text: x.symbol }), " ", badge(x.state)])));
    parts.push(el("h3", { text: "Parameters" }), pre(s.parameters || {}));
    if (t.result !== null && t.result !== undefined) parts.push(el("h3", { text: "Output" }), pre(t.result));
    parts.push(el("h3", { text: `Attempts (${d.attempts.length})` }));
    for (const a of d.attempts.slice().reverse()) {
      const code = a.exit_code === null || a.exit_code === undefined ? "" : a.exit_code < 0 ? `signal ${-a.exit_code}` : String(a.exit_code);
      const extra = extraFields(a, ATTEMPT_FIELDS);
      parts.push(el("div", { class: `attempt ${a.outcome}` },
        el("b", { text: `#${a.attempt} ` }), badge(a.outcome === "ok" ? "completed" : a.outcome === "running" ? "running" : "failed"), ` ${a.outcome}`,
        kv([["node", a.node], ["attempt token", a.token], ["started", fmtTime(a.started_at)], ["ended", fmtTime(a.finished_at)],
          ["duration", a.duration_ms !== null ? fmtDur(a.duration_ms / 1000) : ""], ["exit", code], ["truncated", a.truncated ? "output or stderr cut at the cap" : ""], ...extra]),
        a.error ? [el("div", { class: "muted", text: "error" }), el("pre", { class: "error", text: a.error })] : null,
        a.result !== null && a.result !== undefined ? [el("div", { class: "muted", text: "output (stdout)" }), pre(a.result)] : null,
        a.stderr ? [el("div", { class: "muted", text: "stderr (tail)" }), pre(a.stderr)] : null));
    }
    if (d.rollback) parts.push(el("h3", { text: "Rollback" }), kv([["state", badge(d.rollback.state)], ["node", d.rollback.node], ["error", d.rollback.error]]));
    clear(body).append(...parts);
    document.body.dataset.drawer = name;
  }
};
