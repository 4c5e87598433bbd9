// modelfleet's page: fed by /events (state changes as they happen, counters each second).
// Plain JavaScript, no library and no build step: it ships inside the package and works offline.
// Every text from the fleet or a backend is set with textContent, never parsed as HTML.
"use strict";

const HISTORY = 900; // one sample a second: 15 minutes, as the server keeps them
const LOG_EVERY_MS = 1000;
const MARK_GLYPH = { "warm start": "▲", "idle stop": "▼", "eviction": "✕", "restart": "↻" };

const $ = (id) => document.getElementById(id);
const el = (tag, attrs, text) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
};

const ui = {
  key: sessionStorage.getItem("modelfleet.key") || "",
  needKey: { api: false, admin: false },
  rows: new Map(), // instance name -> {tr, cells}
  status: new Map(), // instance name -> last status row
  counters: {},
  estimates: {},
  history: {}, // role -> {seconds: [], marks: []}
  roleCanvases: new Map(),
  logPaused: false,
  logText: "",
};

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (ui.key) h.Authorization = "Bearer " + ui.key;
  return h;
}

function notice(text) {
  $("notice").textContent = text || "";
}

async function errorText(resp) {
  const body = await resp.text();
  try {
    const parsed = JSON.parse(body);
    if (parsed && parsed.error && parsed.error.message) return parsed.error.message;
  } catch (_) { /* not JSON: show it as it came */ }
  return body.slice(0, 500) || resp.statusText;
}

async function getJSON(path) {
  const resp = await fetch(path, { headers: headers(), cache: "no-store" });
  if (!resp.ok) throw new Error(resp.status + ": " + (await errorText(resp)));
  return resp.json();
}

function controlsAllowed() {
  return !ui.needKey.admin || ui.key !== "";
}

function setMode() {
  const ok = controlsAllowed();
  $("mode").textContent = ok ? "controls on" : "read-only";
  $("forget").hidden = !ui.key;
  for (const b of document.querySelectorAll("button.admin")) b.disabled = !ok;
}

// --- formatting ------------------------------------------------------------------

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return v.toFixed(v >= 100 || i === 0 ? 0 : 1) + " " + units[i];
}

function duration(s) {
  if (s === null || s === undefined) return "";
  if (s < 60) return Math.floor(s) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s";
  return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
}

const num = (v, digits) => (v === null || v === undefined ? "" : Number(v).toFixed(digits));

// --- the instance table ------------------------------------------------------------

const COLUMNS = ["name", "tier", "state", "node", "pid", "port", "load", "queued", "rps", "p50", "toks",
  "cache", "est", "rss", "restarts", "uptime", "error", "ctl"];
const NUMERIC = new Set(["pid", "port", "load", "queued", "rps", "p50", "toks", "cache", "est", "rss", "restarts", "uptime"]);

function rowFor(inst) {
  let row = ui.rows.get(inst.name);
  if (row) return row;
  const tr = el("tr", { "data-instance": inst.name });
  const cells = {};
  for (const c of COLUMNS) {
    const td = el("td", { class: c + (NUMERIC.has(c) ? " num" : "") + (c === "error" ? " err" : "") });
    cells[c] = td;
    tr.appendChild(td);
  }
  const badge = el("span");
  const reason = el("span", { class: "reason" });
  cells.state.append(badge, reason);
  cells.badge = badge;
  cells.reason = reason;
  for (const [verb, label] of [["start", "Start"], ["stop", "Stop"], ["reload", "Reload"], ["drain", "Drain"]]) {
    const target = verb === "drain" ? inst.name : inst.component;
    const b = el("button", { type: "button", class: "admin", "data-verb": verb, title: verb + " " + target }, label);
    b.addEventListener("click", () => control(verb, target));
    cells.ctl.appendChild(b);
  }
  const logBtn = el("button", { type: "button", "data-verb": "log" }, "Log");
  logBtn.addEventListener("click", () => { $("log-instance").value = inst.name; refreshLog(true); });
  cells.ctl.appendChild(logBtn);
  row = { tr, cells };
  ui.rows.set(inst.name, row);
  $("instances").tBodies[0].appendChild(tr);
  const opt = el("option", { value: inst.name }, inst.name);
  $("log-instance").appendChild(opt);
  return row;
}

function setText(td, text) {
  const s = String(text === undefined || text === null ? "" : text);
  if (td.textContent !== s) td.textContent = s;
}

function renderInstance(name) {
  const st = ui.status.get(name);
  if (!st) return;
  const row = rowFor(st);
  const c = row.cells;
  const k = ui.counters[name] || {};
  setText(c.name, st.name);
  setText(c.tier, st.tier);
  setText(c.badge, st.state);
  c.badge.className = "s-" + st.state;
  row.tr.dataset.state = st.state;
  const showReason = ["FAILED", "EJECTED", "BACKOFF", "STARTING", "DRAINING"].includes(st.state.toUpperCase());
  setText(c.reason, showReason ? st.detail : "");
  setText(c.node, st.node);
  setText(c.pid, st.pid);
  setText(c.port, st.port);
  setText(c.load, st.in_flight + " / " + st.slots);
  setText(c.queued, st.queued);
  setText(c.rps, num(k.rps, 2));
  setText(c.p50, num(k.p50_ms, 0));
  setText(c.toks, num(k.tokens_s, 1));
  setText(c.cache, k.cache_ratio === null || k.cache_ratio === undefined ? "" : Math.round(k.cache_ratio * 100) + "%");
  setText(c.est, bytes(ui.estimates[st.component]));
  setText(c.rss, bytes(k.rss));
  setText(c.restarts, st.restarts);
  c.restarts.dataset.count = String(st.restarts);
  setText(c.uptime, duration(k.uptime_s));
  setText(c.error, k.last_error || "");
}

function takeStatus(list) {
  for (const st of list) {
    ui.status.set(st.name, st);
    renderInstance(st.name);
  }
}

// --- per-role sparklines -------------------------------------------------------------

function roleBox(role) {
  let box = ui.roleCanvases.get(role);
  if (box) return box;
  const div = el("div", { class: "role", "data-role": role });
  div.appendChild(el("h3", {}, role));
  box = { div };
  for (const [key, label] of [["rps", "req/s"], ["p50_ms", "p50 ms"], ["queued", "queue"]]) {
    const line = el("div", { class: "spark" });
    const canvas = el("canvas", { width: "260", height: "26", "data-series": key });
    const value = el("span", { class: "num" });
    line.append(el("span", {}, label), canvas, value);
    div.appendChild(line);
    box[key] = { canvas, value };
  }
  $("roles").appendChild(div);
  roleObserver.observe(div);
  ui.roleCanvases.set(role, box);
  return box;
}

function drawSpark(canvas, samples, key, marks, t0, t1) {
  // Drawn at the element's size in device pixels, so lines stay sharp.
  const dpr = window.devicePixelRatio || 1;
  if (canvas.width !== ui.spark.w || canvas.height !== ui.spark.h) {
    canvas.width = ui.spark.w;
    canvas.height = ui.spark.h;
  }
  const ctx = canvas.getContext("2d");
  const w = canvas.width;
  const h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const values = samples.map((s) => s[key]).filter((v) => v !== null && v !== undefined);
  const max = Math.max(1, ...values);
  const x = (t) => ((t - t0) / Math.max(1, t1 - t0)) * w;
  ctx.strokeStyle = "#0969da";
  ctx.lineWidth = 1;
  ctx.beginPath();
  let started = false;
  let lastPx = -1;
  let peak = null;
  // At most one point per pixel column (its highest value): 900 samples on 300 pixels.
  const flush = (px) => {
    const py = h - 2 - (peak / max) * (h - 4);
    if (started) ctx.lineTo(px, py); else ctx.moveTo(px, py);
    started = true;
    peak = null;
  };
  for (const s of samples) {
    const v = s[key];
    if (v === null || v === undefined) {
      if (peak !== null) flush(lastPx);
      started = false;
      continue;
    }
    const px = Math.round(x(s.t));
    if (px !== lastPx && peak !== null) flush(lastPx);
    peak = peak === null ? v : Math.max(peak, v);
    lastPx = px;
  }
  if (peak !== null) flush(lastPx);
  ctx.stroke();
  ctx.fillStyle = "#9a6700";
  ctx.strokeStyle = "rgba(154, 103, 0, 0.35)";
  ctx.font = Math.round(10 * dpr) + "px sans-serif";
  for (const m of marks) {
    if (m.t < t0) continue;
    const px = x(m.t);
    ctx.beginPath();
    ctx.moveTo(px, 0);
    ctx.lineTo(px, h);
    ctx.stroke();
    ctx.fillText(MARK_GLYPH[m.kind] || "•", px + 2, Math.round(10 * dpr));
  }
}

// Only the role boxes on screen are drawn (50 roles are 150 canvases); each is drawn as it scrolls in.
const visibleRoles = new Set();
const roleObserver = new IntersectionObserver((entries) => {
  for (const e of entries) {
    if (e.isIntersecting) visibleRoles.add(e.target.dataset.role); else visibleRoles.delete(e.target.dataset.role);
  }
  renderRoles();
});
ui.spark = { w: 0, h: 0 };

// The canvases' size is read once (and after a resize), not on every draw: a layout read per
// canvas would make the browser lay the page out once per canvas.
function measureSpark() {
  const c = document.querySelector("#roles canvas");
  if (!c) return;
  const dpr = window.devicePixelRatio || 1;
  ui.spark = { w: Math.max(50, Math.round(c.clientWidth * dpr)), h: Math.max(10, Math.round(c.clientHeight * dpr)) };
}

window.addEventListener("resize", () => { measureSpark(); renderRoles(); });

function renderRoles() {
  for (const role of Object.keys(ui.history)) roleBox(role);
  if (!ui.spark.w) measureSpark();
  for (const [role, hist] of Object.entries(ui.history)) {
    if (!visibleRoles.has(role)) continue;
    const box = roleBox(role);
    const last = hist.seconds[hist.seconds.length - 1] || {};
    // The server's clock, not the browser's: the axis ends at the newest sample and spans
    // what there is, up to 15 minutes.
    const now = last.t || Date.now() / 1000;
    const first = hist.seconds.length ? hist.seconds[0].t : now;
    const t0 = Math.max(now - HISTORY, Math.min(first, now - 60));
    for (const key of ["rps", "p50_ms", "queued"]) {
      drawSpark(box[key].canvas, hist.seconds, key, hist.marks, t0, now);
      setText(box[key].value, last[key] === null || last[key] === undefined ? "" : last[key]);
    }
  }
}

function takeRoleSamples(roles) {
  for (const [role, sample] of Object.entries(roles || {})) {
    const hist = ui.history[role] || (ui.history[role] = { seconds: [], marks: [] });
    const prev = hist.seconds[hist.seconds.length - 1];
    if (!prev || prev.t !== sample.t) hist.seconds.push(sample);
    if (hist.seconds.length > HISTORY) hist.seconds.splice(0, hist.seconds.length - HISTORY);
  }
}

// --- memory: estimated and measured fill per tier and node ---------------------------------

function renderFill() {
  const groups = new Map();
  for (const st of ui.status.values()) {
    const running = !["STOPPED", "FAILED"].includes(st.state.toUpperCase());
    for (const key of ["tier " + st.tier, "node " + st.node]) {
      const g = groups.get(key) || { est: 0, rss: 0 };
      if (running) {
        g.est += ui.estimates[st.component] || 0;
        g.rss += (ui.counters[st.name] || {}).rss || 0;
      }
      groups.set(key, g);
    }
  }
  const body = $("fill").tBodies[0];
  body.replaceChildren();
  for (const [key, g] of [...groups.entries()].sort()) {
    const tr = el("tr");
    tr.append(el("td", {}, key), el("td", { class: "num" }, bytes(g.est)), el("td", { class: "num" }, bytes(g.rss)));
    body.appendChild(tr);
  }
}

// --- the first view, then the stream ---------------------------------------------------------

function takeView(v) {
  ui.needKey = v.keys;
  ui.estimates = v.estimates || {};
  ui.counters = v.counters || {};
  for (const [role, h] of Object.entries(v.history || {})) {
    // Columns from the server ({t: [...], rps: [...], ...}) to samples.
    const cols = h.seconds;
    const seconds = cols.t.map((t, i) => ({ t, rps: cols.rps[i], p50_ms: cols.p50_ms[i], queued: cols.queued[i] }));
    ui.history[role] = { seconds: seconds.slice(-HISTORY), marks: h.marks };
  }
  takeStatus(v.instances);
  $("plan").textContent = v.plan.tree;
  renderHooks(v.hooks || []);
  renderSweep(v.sweep);
  const select = $("pg-model");
  if (!select.options.length) {
    for (const [kind, names] of Object.entries(v.names)) {
      const group = el("optgroup", { label: kind.replace("_", " ") });
      for (const n of names) group.appendChild(el("option", { value: n }, n));
      select.appendChild(group);
    }
  }
  setMode();
  renderRoles();
  renderFill();
}

function renderHooks(results) {
  const body = $("hooks").tBodies[0];
  body.replaceChildren();
  if (!results.length) {
    const tr = el("tr");
    tr.appendChild(el("td", { colspan: "4" }, "no hook has run"));
    body.appendChild(tr);
  }
  for (const r of results) {
    const tr = el("tr");
    const name = r.target ? r.name + " @ " + r.target : r.name;
    tr.append(el("td", {}, name), el("td", {}, r.event), el("td", {}, r.status), el("td", { class: "err" }, r.error || r.detail || ""));
    body.appendChild(tr);
  }
}

function renderSweep(sweep) {
  if (!sweep) return;
  $("sweep").textContent = sweep.file + "\n\n" + sweep.text;
  if (sweep.plot) {
    fetch("/ui/api/sweep.png", { headers: headers() }).then((r) => (r.ok ? r.blob() : null)).then((blob) => {
      if (!blob) return;
      const img = $("sweep-plot");
      img.src = URL.createObjectURL(blob);
      img.hidden = false;
    });
  }
}

function onEvent(type, data) {
  if (type === "hello") {
    takeStatus(data.instances);
  } else if (type === "state") {
    const st = ui.status.get(data.instance);
    if (st) {
      st.state = data.new;
      st.detail = data.detail;
      st.pid = data.pid;
      renderInstance(data.instance);
    }
  } else if (type === "counters") {
    Object.assign(ui.counters, data.instances);
    takeStatus(data.status);
    for (const [name, p] of Object.entries(data.starting || {})) {
      const row = ui.rows.get(name);
      if (!row) continue;
      let text = "loading for " + p.elapsed_s + " s" + (p.rss ? ", " + bytes(p.rss) + " so far" : "");
      if (p.log) text += ": " + p.log;
      setText(row.cells.reason, text);
    }
    takeRoleSamples(data.roles);
    for (const m of data.marks || []) {
      const hist = ui.history[m.role] || (ui.history[m.role] = { seconds: [], marks: [] });
      hist.marks.push(m);
      if (hist.marks.length > 2000) hist.marks.shift();
    }
    renderRoles();
    renderFill();
  } else if (type === "dropped") {
    notice(data.detail);
  }
}

// A fetch-read stream rather than EventSource: it can send the key in a header.
async function follow() {
  for (;;) {
    try {
      const resp = await fetch("/events", { headers: headers({ Accept: "text/event-stream" }), cache: "no-store" });
      if (!resp.ok) throw new Error(resp.status + ": " + (await errorText(resp)));
      $("conn").textContent = "live";
      $("conn").className = "conn up";
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          let type = "message";
          let data = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) type = line.slice(6).trim();
            else if (line.startsWith("data:")) data += line.slice(5).trim();
          }
          if (data) onEvent(type, JSON.parse(data));
        }
      }
    } catch (err) {
      notice("event stream: " + err.message);
    }
    $("conn").textContent = "reconnecting…";
    $("conn").className = "conn down";
    await new Promise((r) => setTimeout(r, 1000));
    try { takeView(await getJSON("/ui/api/view")); } catch (_) { /* the next round says why */ }
  }
}

// --- controls (admin key) -------------------------------------------------------------------

async function post(path, body) {
  const init = { method: "POST", headers: headers({ "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const resp = await fetch(path, init);
  if (!resp.ok) throw new Error(resp.status + ": " + (await errorText(resp)));
  return resp.json();
}

async function control(verb, target) {
  if (!controlsAllowed()) { notice("controls need the admin key"); return; }
  notice(verb + " " + target + "…");
  try {
    await post("/admin/" + verb + "/" + encodeURIComponent(target));
    notice("");
  } catch (err) {
    notice(verb + " " + target + " refused: " + err.message);
  }
}

async function loadCheckpoints() {
  const body = $("checkpoints").tBodies[0];
  body.replaceChildren();
  if (!controlsAllowed()) {
    const tr = el("tr");
    tr.appendChild(el("td", { colspan: "4" }, "checkpoints need the admin key"));
    body.appendChild(tr);
    return;
  }
  try {
    const data = await getJSON("/admin/checkpoints");
    for (const cp of data.checkpoints) {
      const tr = el("tr", { "data-checkpoint": cp.id });
      const btn = el("button", { type: "button", class: "admin" }, "Restore");
      btn.addEventListener("click", async () => {
        notice("restoring " + cp.id + "…");
        try { await post("/admin/checkpoints/" + encodeURIComponent(cp.id)); notice("restored " + cp.id); } catch (err) { notice("restore refused: " + err.message); }
      });
      const td = el("td");
      td.appendChild(btn);
      tr.append(el("td", {}, cp.id), el("td", {}, cp.name), el("td", {}, cp.created_at), td);
      body.appendChild(tr);
    }
  } catch (err) {
    notice("checkpoints: " + err.message);
  }
}

$("cp-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    await post("/admin/checkpoints", { name: $("cp-name").value, include_state: $("cp-state").checked });
    notice("checkpoint created");
    loadCheckpoints();
  } catch (err) {
    notice("checkpoint refused: " + err.message);
  }
});

$("keyform").addEventListener("submit", (ev) => {
  ev.preventDefault();
  ui.key = $("key").value;
  $("key").value = "";
  sessionStorage.setItem("modelfleet.key", ui.key);
  start();
});

$("forget").addEventListener("click", () => {
  ui.key = "";
  sessionStorage.removeItem("modelfleet.key");
  setMode();
  loadCheckpoints();
});

// --- logs: follow, pause, search (read through the launcher by the front door) ---------------------

async function refreshLog(force) {
  const name = $("log-instance").value;
  if (!name || (ui.logPaused && !force)) return;
  if (!controlsAllowed()) { $("log-status").textContent = "logs need the admin key"; return; }
  try {
    const resp = await fetch("/ui/api/logs/" + encodeURIComponent(name), { headers: headers(), cache: "no-store" });
    if (!resp.ok) throw new Error(resp.status + ": " + (await errorText(resp)));
    ui.logText = await resp.text();
    $("log-status").textContent = name + ", " + ui.logText.length + " bytes";
    renderLog();
  } catch (err) {
    $("log-status").textContent = err.message;
  }
}

function renderLog() {
  const pre = $("log");
  const term = $("log-search").value;
  let lines = ui.logText.split("\n");
  if (term) lines = lines.filter((l) => l.toLowerCase().includes(term.toLowerCase()));
  pre.replaceChildren();
  for (const line of lines) {
    if (term) {
      const at = line.toLowerCase().indexOf(term.toLowerCase());
      pre.append(line.slice(0, at), el("mark", {}, line.slice(at, at + term.length)), line.slice(at + term.length) + "\n");
    } else {
      pre.append(line + "\n");
    }
  }
  if ($("log-follow").checked) pre.scrollTop = pre.scrollHeight;
}

$("log-pause").addEventListener("click", () => {
  ui.logPaused = !ui.logPaused;
  $("log-pause").textContent = ui.logPaused ? "Resume" : "Pause";
});
$("log-search").addEventListener("input", renderLog);
$("log-instance").addEventListener("change", () => refreshLog(true));
setInterval(() => { if ($("log-follow").checked) refreshLog(false); }, LOG_EVERY_MS);

// --- playground --------------------------------------------------------------------------------

$("playground").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = $("pg-answer");
  const meta = $("pg-meta");
  out.textContent = "";
  meta.textContent = "";
  out.dataset.done = "false";
  const t0 = performance.now();
  const body = {
    model: $("pg-model").value,
    messages: [{ role: "user", content: $("pg-message").value }],
    max_tokens: Number($("pg-max").value) || 32,
    stream: true,
  };
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
    });
    if (!resp.ok) throw new Error(resp.status + ": " + (await errorText(resp)));
    const served = resp.headers.get("x-modelfleet-instance") || "?";
    meta.textContent = "served by " + served;
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let timings = null;
    let first = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, cut).trim();
        buf = buf.slice(cut + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          if (first === null) first = performance.now() - t0;
          out.textContent += delta.content;
          out.dataset.chunks = String(Number(out.dataset.chunks || 0) + 1);
        }
        if (chunk.timings) timings = chunk.timings;
      }
    }
    const parts = ["served by " + served, "total " + Math.round(performance.now() - t0) + " ms"];
    if (first !== null) parts.push("first token " + Math.round(first) + " ms");
    if (timings) {
      parts.push(timings.predicted_n + " tokens at " + num(timings.predicted_per_second, 1) + " tok/s");
      parts.push("prompt " + timings.prompt_n + " evaluated, " + (timings.cache_n || 0) + " from cache");
    }
    meta.textContent = parts.join(" · ");
  } catch (err) {
    meta.textContent = "refused: " + err.message;
  }
  out.dataset.done = "true";
});

// --- start ----------------------------------------------------------------------------------

let following = false;

async function start() {
  try {
    takeView(await getJSON("/ui/api/view"));
    notice("");
  } catch (err) {
    if (err.message.startsWith("401")) {
      notice("this front door needs its API key: enter it above");
      $("key").placeholder = "API key";
      return;
    }
    notice("view: " + err.message);
    return;
  }
  loadCheckpoints();
  if (!following) {
    following = true;
    follow();
  }
}

start();
