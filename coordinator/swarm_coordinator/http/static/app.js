// llama-swarm dashboard: renders the snapshots pushed on /dashboard/feed (server-sent
// events) and streams prompts through /v1/chat/completions. No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY_S = 180;
const COLORS = { a: "#4fa3ff", b: "#a78bfa", c: "#3fb950", d: "#d29922" };

let last = null; // the latest snapshot
const reported = []; // [t, tokens/s the nodes report], kept here: the server sends only the current value
const seenEvents = new Set();
let firstEvents = true;

// ---------------------------------------------------------------- formatting

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function fmt(n, digits = 1) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  const a = Math.abs(n);
  if (a >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (n / 1e3).toFixed(1) + "k";
  if (a >= 100) return Math.round(n).toString();
  return n.toFixed(digits);
}
function fmtInt(n) {
  if (n === null || n === undefined) return "–";
  return n >= 1e4 ? fmt(n) : String(Math.round(n));
}
function fmtMs(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : ms.toFixed(ms < 10 ? 1 : 0) + " ms";
}
function fmtClock(ts) {
  const d = new Date(ts * 1000);
  return d.toLocaleTimeString([], { hour12: false });
}
function fmtSecs(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
  return Math.floor(s / 60) + "m " + Math.round(s % 60) + "s";
}
function range(r) {
  return r ? `${r[0]}–${r[1] - 1}` : "–";
}
function mean(values) {
  const v = values.filter((x) => x !== null && x !== undefined);
  return v.length ? v.reduce((a, b) => a + b, 0) / v.length : null;
}

// ---------------------------------------------------------------- tiles

function renderTiles(s) {
  const t = s.totals;
  const L = s.swarm ? s.swarm.num_layers : 0;
  const gaps = s.uncovered.reduce((n, [a, b]) => n + (b - a), 0);
  $("t-nodes").textContent = s.swarm ? `${t.nodes_online} / ${t.nodes}` : "–";
  $("t-nodes").className = "v" + (s.swarm && t.nodes_online < t.nodes ? " bad" : "");
  const cov = $("t-coverage");
  cov.textContent = L ? `${L - gaps} / ${L}` : "–";
  cov.className = "v" + (gaps ? " bad" : "");

  const recent = s.series.slice(-10);
  const tps = recent.reduce((a, p) => a + p.tokens, 0) / Math.max(1, recent.length);
  $("t-tps").textContent = fmt(tps);
  $("t-tps-sub").textContent = `${fmtInt(t.tokens)} tokens served` + (t.reported_tokens_per_s ? ` · nodes ${fmt(t.reported_tokens_per_s)}/s` : "");
  const itl = mean(recent.map((p) => p.itl_ms));
  const ttft = mean(recent.map((p) => p.ttft_ms));
  $("t-itl").textContent = fmtMs(itl);
  $("t-itl-sub").textContent = ttft !== null ? `first token ${fmtMs(ttft)}` : "";
  $("t-sessions").textContent = String(t.swarm_sessions);
  $("t-sessions-sub").textContent = `${t.active} via the gateway · ${fmtInt(t.requests)} requests`;
  const q = s.queue;
  $("t-queue").textContent = q ? String(q.waiting) : "–";
  $("t-queue").className = "v" + (q && q.waiting ? " bad" : "");
  $("t-queue-sub").textContent = q
    ? (q.waiting ? `oldest ${fmtSecs(q.oldest_wait_s)} · ` : "") + `limit ${q.limit}` + (q.refused ? ` · ${fmtInt(q.refused)} refused (429)` : "")
    : "";
}

// ---------------------------------------------------------------- nodes

function sortedNodes(s) {
  const key = (n) => (n.serving || n.assigned || n.hosted || [1e9])[0];
  return [...s.nodes].sort((a, b) => key(a) - key(b) || a.id.localeCompare(b.id));
}

function renderNodes(s) {
  const body = $("nodes").tBodies[0];
  body.replaceChildren();
  for (const n of sortedNodes(s)) {
    const load = n.load || {};
    const layers = n.serving || n.assigned || n.hosted;
    let layerText = range(layers);
    if (n.assigned && n.serving && (n.assigned[0] !== n.serving[0] || n.assigned[1] !== n.serving[1])) {
      layerText = `${range(n.serving)} → ${range(n.assigned)}`;
    }
    const kv = load.free_kv_tokens;
    const row = el(
      "tr",
      { class: n.online ? n.state : "offline", "data-node-id": n.id, "data-state": n.state },
      el("td", { class: "id" }, n.id, el("span", { class: "sub", text: n.address || "" })),
      el("td", {}, n.device, el("span", { class: "sub", text: n.weight_format || "" })),
      el("td", { text: layerText }),
      el("td", {}, el("span", { class: `pill ${n.state}`, text: n.state }),
        n.exposed ? el("span", { class: "pill exposed", title: "listens with neither TLS nor a swarm token", text: "exposed" }) : null),
      el("td", { class: "num", text: n.online && n.load ? String(load.active_sessions) : "–" }),
      el("td", { class: "num", text: n.online && n.load ? String(load.queued_steps) : "–" }),
      el("td", { class: "num", text: n.online && n.load ? fmt(load.tokens_per_s) : "–" }),
      el("td", { class: "num", text: n.online && n.load ? fmtInt(kv) : "–" }),
      el("td", { class: "num", text: n.last_seen_s === null ? "–" : fmtSecs(n.last_seen_s) + " ago" }),
    );
    body.append(row);
  }
  $("nodes-empty").hidden = s.nodes.length > 0;
  const offline = s.nodes.filter((n) => !n.online).length;
  $("nodes-hint").textContent = s.nodes.length ? `${s.nodes.length - offline} online` + (offline ? `, ${offline} offline` : "") : "";
}

// ---------------------------------------------------------------- coverage map

function renderCoverage(s) {
  const box = $("coverage");
  box.replaceChildren();
  if (!s.swarm) {
    box.append(el("div", { class: "coverage-msg", text: "No registry: the gateway serves a fixed backend." }));
    box.dataset.uncovered = "";
    return;
  }
  const L = s.swarm.num_layers;
  const cols = `repeat(${L}, minmax(5px, 1fr))`;
  const step = L <= 16 ? 1 : L <= 40 ? 5 : 10;

  const axis = el("div", { class: "row axis" });
  axis.style.gridTemplateColumns = cols;
  for (let i = 0; i < L; i++) axis.append(el("div", { class: "cell", text: i % step === 0 ? String(i) : "" }));
  box.append(el("div", { class: "label", text: "layer" }), axis);

  const inside = (r, i) => r && i >= r[0] && i < r[1];
  for (const n of sortedNodes(s)) {
    const row = el("div", { class: "row", "data-node-id": n.id });
    row.style.gridTemplateColumns = cols;
    for (let i = 0; i < L; i++) {
      let cls = "cell";
      if (!n.online) cls += inside(n.assigned || n.hosted, i) ? " offline" : "";
      else if (inside(n.serving, i)) cls += " serving";
      else if (inside(n.assigned, i)) cls += " loading";
      row.append(el("div", { class: cls, title: `${n.id} · layer ${i}` }));
    }
    box.append(el("div", { class: "label" + (n.online ? "" : " offline"), text: n.id }), row);
  }

  const count = el("div", { class: "row count" });
  count.style.gridTemplateColumns = cols;
  s.coverage.forEach((c, i) => {
    const cls = c === 0 ? "gap" : c >= 3 ? "r3" : c === 2 ? "r2" : "";
    count.append(el("div", { class: `cell ${cls}`, title: `layer ${i}: ${c} replica(s)`, text: L <= 48 ? String(c) : "" }));
  });
  box.append(el("div", { class: "label total", text: "replicas" }), count);

  const gaps = s.uncovered.reduce((n, [a, b]) => n + (b - a), 0);
  box.dataset.uncovered = String(gaps);
  const minRep = s.coverage.length ? Math.min(...s.coverage) : 0;
  if (gaps) {
    const where = s.uncovered.map(([a, b]) => (b - a === 1 ? `${a}` : `${a}–${b - 1}`)).join(", ");
    box.append(el("div", { class: "coverage-msg bad", text: `${gaps} layer(s) uncovered: ${where}. Generation waits for a reassignment.` }));
  } else {
    box.append(el("div", { class: "coverage-msg ok", text: `All ${L} layers covered, at least ${minRep} replica(s) each.` }));
  }
  $("coverage-hint").textContent = `${s.swarm.model}, ${L} layers`;
}

// ---------------------------------------------------------------- sessions

function renderSessions(s) {
  const body = $("sessions").tBodies[0];
  body.replaceChildren();
  const rows = [...s.sessions.map((x) => [x, false]), ...s.recent.slice(0, 8).map((x) => [x, true])];
  for (const [x, done] of rows) {
    const kind = x.endpoint === "chat.completions" ? "chat" : x.endpoint;
    body.append(
      el(
        "tr",
        { class: done ? "recent" : "", "data-session": x.id },
        el("td", { class: "id" }, x.id, el("span", { class: "sub", text: kind })),
        el("td", {}, el("span", { class: `pill ${x.status}`, text: x.status === "done" ? x.finish_reason || "done" : x.status })),
        el("td", { text: x.caller }),
        el("td", { class: "num", text: String(x.prompt_tokens) }),
        el("td", { class: "num", text: `${x.tokens} / ${x.max_tokens}` }),
        el("td", { class: "num", text: x.tokens_per_s ? fmt(x.tokens_per_s) : "–" }),
        el("td", { class: "num", text: fmtSecs(x.elapsed_s) }),
      ),
    );
  }
  $("sessions-empty").hidden = rows.length > 0;
  $("sessions-hint").textContent = `${s.sessions.length} active`;
}

function renderSwarmSessions(s) {
  const body = $("swarm-sessions").tBodies[0];
  body.replaceChildren();
  for (const x of s.swarm_sessions) {
    const route = x.hops.map((h) => `${h.node} [${h.layers[0]}, ${h.layers[1]})`).join(" → ");
    const whole = s.swarm && x.covers >= s.swarm.num_layers;
    const budget = x.max_new_tokens ? ` / ${x.max_new_tokens}` : "";
    body.append(
      el(
        "tr",
        { "data-session": x.id, "data-hops": String(x.hops.length), "data-whole": whole ? "yes" : "no" },
        el("td", { class: "id", title: x.id }, x.id.length > 12 ? x.id.slice(0, 12) + "…" : x.id),
        el("td", { title: whole ? "" : "the hops reported so far do not cover the model" }, route + (whole ? "" : " …")),
        el("td", { class: "num", text: x.prompt_tokens ? String(x.prompt_tokens) : "–" }),
        el("td", { class: "num", text: x.generated === null ? `${x.position} in cache` : `${x.generated}${budget}` }),
        el("td", { class: "num", text: fmtSecs(x.age_s) }),
        el("td", { class: "num", text: fmtSecs(x.idle_s) }),
      ),
    );
  }
  $("swarm-sessions-empty").hidden = s.swarm_sessions.length > 0;
}

// ---------------------------------------------------------------- events

function renderEvents(s) {
  const list = $("events");
  list.replaceChildren();
  for (const e of s.events) {
    const key = `${e.ts}|${e.kind}|${e.node}|${e.detail}`;
    const fresh = !firstEvents && !seenEvents.has(key);
    seenEvents.add(key);
    list.append(
      el(
        "li",
        { class: "event" + (fresh ? " fresh" : ""), "data-kind": e.kind, "data-node": e.node || "" },
        el("span", { class: "ts", text: fmtClock(e.ts) }),
        el("span", { class: `kind ${e.kind}`, text: e.kind }),
        el("span", { class: "what" }, e.node ? el("b", { text: e.node }) : null, e.node && e.detail ? " " : null, e.detail ? el("span", { text: e.detail }) : null),
      ),
    );
  }
  firstEvents = false;
  $("events-empty").hidden = s.events.length > 0;
}

// ---------------------------------------------------------------- policy

function renderPolicy(s) {
  const p = s.policy;
  $("policy-card").hidden = !p || (!p.file && !p.audit_log);
  if (!p) return;
  $("policy-hint").textContent = p.file
    ? `${p.rules.length} rules from ${p.file} · loaded ${fmtClock(p.loaded_at)}` + (p.audit_log ? " · audit log on" : "")
    : "no rules · audit log on";
  $("policy-error").hidden = !p.reload_error;
  $("policy-error").textContent = p.reload_error ? `Reload rejected, old rules kept: ${p.reload_error}` : "";
  const keys = $("policy-keys").querySelector("tbody");
  keys.replaceChildren();
  for (const [key, n] of Object.entries(p.refusals_by_key)) {
    keys.append(el("tr", {}, el("td", { text: key }), el("td", { class: "num", text: fmtInt(n) })));
  }
  $("policy-keys").hidden = Object.keys(p.refusals_by_key).length === 0;
  const list = $("policy-events");
  list.replaceChildren();
  for (const e of p.events) {
    const what = e.rule ? `${e.rule}${e.label ? " (" + e.label + ")" : ""} · ${e.key || ""} · ${e.endpoint || ""}` : e.detail || "";
    list.append(
      el(
        "li",
        { class: "event", "data-kind": e.kind },
        el("span", { class: "ts", text: fmtClock(e.ts) }),
        el("span", { class: `kind ${e.kind}`, text: e.kind.replaceAll("_", " ") }),
        el("span", { class: "what", text: what }),
      ),
    );
  }
  $("policy-empty").hidden = p.events.length > 0;
}

// ---------------------------------------------------------------- charts

function niceStep(v) {
  // A round step for 4 grid lines: 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 times a power of ten.
  if (!(v > 0)) return 0.25;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function drawChart(canvas, series, now, unit) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (!w || !h) return;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const padL = 44, padR = 8, padT = 8, padB = 20;
  const pw = w - padL - padR, ph = h - padT - padB;
  const t0 = now - HISTORY_S;
  let vmax = 0;
  for (const s of series) for (const [t, v] of s.points) if (v !== null && t >= t0) vmax = Math.max(vmax, v);
  const ymax = 4 * niceStep((vmax * 1.1) / 4);
  const x = (t) => padL + ((t - t0) / HISTORY_S) * pw;
  const y = (v) => padT + ph - (v / ymax) * ph;

  ctx.font = "11px system-ui, sans-serif";
  ctx.textBaseline = "middle";
  ctx.strokeStyle = "rgba(139,152,165,0.14)";
  ctx.fillStyle = "#5c6975";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = (ymax * i) / 4;
    const yy = Math.round(y(v)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(padL, yy);
    ctx.lineTo(w - padR, yy);
    ctx.stroke();
    ctx.textAlign = "right";
    const label = v >= 1e4 ? fmt(v) : String(Math.round(v * 100) / 100);
    ctx.fillText(label, padL - 6, yy);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const ago of [180, 120, 60, 0]) {
    ctx.fillText(ago ? `-${ago / 60}m` : "now", Math.min(Math.max(x(now - ago), padL + 10), w - padR - 12), padT + ph + 6);
  }

  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 1.8;
    ctx.lineJoin = "round";
    ctx.beginPath();
    let pen = false;
    for (const [t, v] of s.points) {
      if (t < t0 || v === null) { pen = false; continue; }
      if (!pen) { ctx.moveTo(x(t), y(v)); pen = true; } else ctx.lineTo(x(t), y(v));
    }
    ctx.stroke();
    // A point with no neighbour draws no line: show it as a dot.
    ctx.fillStyle = s.color;
    s.points.forEach(([t, v], i) => {
      if (t < t0 || v === null) return;
      const prev = s.points[i - 1], next = s.points[i + 1];
      if ((!prev || prev[1] === null) && (!next || next[1] === null)) {
        ctx.beginPath();
        ctx.arc(x(t), y(v), 2.5, 0, 2 * Math.PI);
        ctx.fill();
      }
    });
    ctx.fillStyle = "#5c6975";
    if (s.fill) {
      const pts = s.points.filter(([t, v]) => t >= t0 && v !== null);
      if (pts.length > 1) {
        ctx.lineTo(x(pts[pts.length - 1][0]), y(0));
        ctx.lineTo(x(pts[0][0]), y(0));
        ctx.closePath();
        ctx.fillStyle = s.fill;
        ctx.fill();
        ctx.fillStyle = "#5c6975";
      }
    }
  }
}

function legend(box, series) {
  box.replaceChildren(
    ...series.map((s) => {
      const sw = el("i", { class: "sw line" });
      sw.style.background = s.color;
      return el("span", {}, sw, s.name + (s.now !== undefined ? `: ${s.now}` : ""));
    }),
  );
}

function renderCharts(s) {
  const now = s.series.length ? s.series[s.series.length - 1].t + 1 : s.time;
  const gw = s.series.map((p) => [p.t, p.tokens]);
  const tps = [
    { name: "gateway", color: COLORS.a, fill: "rgba(79,163,255,0.10)", points: gw, now: fmt(gw.length ? gw[gw.length - 1][1] : 0) },
  ];
  if (s.swarm) {
    tps.push({ name: "nodes report", color: COLORS.b, points: reported, now: fmt(s.totals.reported_tokens_per_s) });
  }
  drawChart($("chart-tps"), tps, now, "");
  legend($("legend-tps"), tps);

  const lat = [
    { name: "per token", color: COLORS.c, points: s.series.map((p) => [p.t, p.itl_ms]) },
    { name: "first token", color: COLORS.d, points: s.series.map((p) => [p.t, p.ttft_ms]) },
  ];
  drawChart($("chart-lat"), lat, now, "ms");
  legend($("legend-lat"), lat);
}

// ---------------------------------------------------------------- warnings

function renderWarnings(s) {
  const box = $("warnings");
  const lines = s.warnings || [];
  box.querySelector("ul").replaceChildren(...lines.map((w) => el("li", { text: w })));
  box.hidden = lines.length === 0;
}

// ---------------------------------------------------------------- feed

function render(s) {
  last = s;
  $("model").textContent = s.model + (s.swarm && !s.swarm.model.startsWith(s.model) ? ` · ${s.swarm.model}` : "");
  document.title = `llama-swarm · ${s.model}`;
  $("key-label").hidden = !s.auth_required;
  reported.push([s.time, s.totals.reported_tokens_per_s]);
  while (reported.length && reported[0][0] < s.time - HISTORY_S) reported.shift();
  renderWarnings(s);
  renderTiles(s);
  renderNodes(s);
  renderCoverage(s);
  renderSessions(s);
  renderSwarmSessions(s);
  renderEvents(s);
  renderPolicy(s);
  renderCharts(s);
}

function setConn(state, label) {
  const c = $("conn");
  c.dataset.state = state;
  c.querySelector(".label").textContent = label;
}

function connect() {
  const source = new EventSource("/dashboard/feed");
  source.addEventListener("open", () => setConn("live", "live"));
  source.addEventListener("error", () => setConn("down", "reconnecting…"));
  source.addEventListener("snapshot", (e) => {
    setConn("live", "live");
    try {
      render(JSON.parse(e.data));
    } catch (err) {
      console.error("bad snapshot", err);
    }
  });
}

window.addEventListener("resize", () => last && renderCharts(last));

// ---------------------------------------------------------------- prompt box

let controller = null;

async function sendPrompt(ev) {
  ev.preventDefault();
  const text = $("prompt-input").value.trim();
  if (!text || !last) return;
  const out = $("prompt-output");
  const stats = $("prompt-stats");
  out.textContent = "";
  out.className = "output streaming";
  stats.textContent = "waiting for the first token…";
  $("prompt-send").disabled = true;
  $("prompt-stop").hidden = false;
  const key = $("prompt-key").value.trim();
  if (key) localStorage.setItem("swarm-api-key", key);
  const headers = { "Content-Type": "application/json" };
  if (key) headers.Authorization = `Bearer ${key}`;
  const body = {
    model: last.model,
    messages: [{ role: "user", content: text }],
    max_tokens: Number($("prompt-max").value) || 96,
    temperature: Number($("prompt-temp").value) || 0,
    stream: true,
    stream_options: { include_usage: true },
  };
  controller = new AbortController();
  const t0 = performance.now();
  let tFirst = null, usage = null, finish = null;
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body), signal: controller.signal });
    if (!resp.ok) {
      let msg = `${resp.status}`;
      try { msg += ": " + (await resp.json()).error.message; } catch (_) { /* not JSON */ }
      throw new Error(msg);
    }
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
        for (const line of block.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) {
            if (tFirst === null) tFirst = performance.now();
            out.textContent += choice.delta.content;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    const total = (performance.now() - t0) / 1000;
    const n = usage ? usage.completion_tokens : null;
    const decode = tFirst !== null ? (performance.now() - tFirst) / 1000 : 0;
    const parts = [`finished: ${finish || "?"}`];
    if (tFirst !== null) parts.push(`first token ${fmtMs(tFirst - t0)}`);
    if (n) parts.push(`${n} tokens in ${total.toFixed(2)} s`);
    if (n > 1 && decode > 0) parts.push(`${((n - 1) / decode).toFixed(1)} tokens/s`);
    stats.textContent = parts.join(" · ");
    out.className = "output";
  } catch (err) {
    out.className = "output error";
    if (err.name === "AbortError") {
      out.className = "output";
      stats.textContent = "stopped";
    } else {
      out.textContent = (out.textContent ? out.textContent + "\n\n" : "") + String(err.message || err);
      stats.textContent = "";
    }
  } finally {
    $("prompt-send").disabled = false;
    $("prompt-stop").hidden = true;
    controller = null;
  }
}

$("prompt-form").addEventListener("submit", sendPrompt);
$("prompt-stop").addEventListener("click", () => controller && controller.abort());
$("prompt-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.metaKey || e.ctrlKey)) $("prompt-form").requestSubmit();
});
$("prompt-key").value = localStorage.getItem("swarm-api-key") || "";

connect();
