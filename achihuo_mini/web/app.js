// The status page of one achihuo_mini loop: polls /api/page and draws it.
// Every string comes from a backend that anyone with access may have written to: it is put in
// the page with textContent only, never parsed as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
let interval = 2.0;
let failures = 0;

function $(id) { return document.getElementById(id); }

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function num(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "–";
  return Number.isInteger(value) ? value.toLocaleString("en-US") : value.toLocaleString("en-US", { maximumFractionDigits: 1 });
}

function seconds(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "–";
  return value < 1 ? `${(value * 1000).toFixed(1)} ms` : `${value.toFixed(2)} s`;
}

function bytes(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (value >= 1024 && i < units.length - 1) { value /= 1024; i += 1; }
  return `${value.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function replaceRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) tr.append(cell instanceof Node ? cell : el("td", cell));
  return tr;
}

function table(caption, pairs) {
  const t = document.createElement("table");
  t.append(el("caption", caption));
  const body = document.createElement("tbody");
  for (const [k, v] of pairs) body.append(row([k, v]));
  if (!pairs.length) body.append(row(["none", ""]));
  t.append(body);
  return t;
}

function entries(obj) {
  return obj && typeof obj === "object" ? Object.entries(obj) : [];
}

function token() { return $("token").value || sessionStorage.getItem("achihuo-token") || ""; }

async function act(path, body) {
  const result = $("action-result");
  const t = token();
  if (t) sessionStorage.setItem("achihuo-token", t);
  try {
    const answer = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${t}` },
      body: JSON.stringify(body),
    });
    const data = await answer.json();
    result.textContent = answer.ok ? JSON.stringify(data) : `refused (${answer.status}): ${data.error}`;
  } catch (err) {
    result.textContent = `failed: ${err}`;
  }
  refresh();
}

function drawWorkers(workers, actions) {
  const rows = [];
  for (const w of workers) {
    const age = typeof w.last_heartbeat_s === "number" ? `${w.last_heartbeat_s.toFixed(1)} s ago` : "?";
    const cells = [w.alias, w.role, w.host ?? "?", w.pid ?? "?", w.state ?? "?", num(w.running), num(w.succeeded),
      num(w.failed), num(w.rate), age];
    const tr = row(cells);
    tr.dataset.alias = w.alias;
    const td = el("td", null, "action");
    if (actions) {
      const b = el("button", "stop");
      b.type = "button";
      b.addEventListener("click", () => act("/api/stop", { targets: [w.alias] }));
      td.append(b);
    }
    tr.append(td);
    rows.push(tr);
  }
  if (!rows.length) {
    const td = el("td", "no worker is registered");
    td.colSpan = 11;
    rows.push(row([td]));
  }
  replaceRows($("workers").tBodies[0], rows);
}

function drawStats(stats) {
  const box = $("stats");
  if (!stats) {
    box.replaceChildren(el("p", "this backend keeps no statistics", "note"));
    return;
  }
  const http = stats.http || {};
  const lat = http.latency || {};
  const tables = [
    table("tasks", entries(stats.tasks).filter(([, v]) => v).map(([k, v]) => [k, num(v)])),
    table("HTTP", [["requests", num(http.requests)], ["received", bytes(http.bytes)],
      ["mean", seconds(lat.mean)], ["p50", seconds(lat.p50)], ["p90", seconds(lat.p90)], ["p99", seconds(lat.p99)]]),
    table("responses by status", entries(http.status).map(([k, v]) => [k, num(v)])),
    table("errors by type", entries(http.errors).map(([k, v]) => [k, num(v)])),
    table("retries by reason", entries(http.retries).map(([k, v]) => [k, num(v)])),
    table("busiest hosts", entries(http.hosts).map(([k, v]) => [k, num(v)])),
    table("the spider's own counters", entries(stats.custom).map(([k, v]) => [k, num(v)])),
    table("handlers", entries(stats.handlers).map(([k, v]) =>
      [k, entries(v).filter(([, n]) => n).map(([o, n]) => `${o} ${num(n)}`).join(", ")])),
  ];
  box.replaceChildren(...tables);
}

function drawDead(dead, total) {
  const rows = dead.map((d) => row([d.id ?? "?", d.handler === null ? "<undecodable>" : `${d.handler}(${d.name ?? ""})`,
    num(d.failures), d.reason]));
  if (!rows.length) rows.push(row(["none", "", "", ""]));
  replaceRows($("dead").tBodies[0], rows);
  $("dead-note").textContent = total > dead.length
    ? `the oldest ${dead.length} of ${num(total)}; \`dead --show ID\` prints one whole`
    : "";
}

function drawChart(history) {
  const chart = $("chart");
  const W = Math.max(320, Math.round(chart.clientWidth) || 720), H = 180, left = 44, right = 8, top = 10, bottom = 22;
  chart.setAttribute("viewBox", `0 0 ${W} ${H}`);  // as wide as the page: text keeps its size
  const usePages = history.length > 1 && history[history.length - 1][2] > history[0][2];
  // workers add their counts at each heartbeat (10 s by default, each worker at its own
  // moment): a rate over one sample would saw up and down, so each point is the rate over the
  // last WINDOW seconds (or since the first sample)
  const WINDOW = Math.max(30, 3 * interval);  // three heartbeats at the default 10 s
  const points = [];
  for (let i = 1, j = 0; i < history.length; i += 1) {
    while (history[i][0] - history[j][0] > WINDOW && j < i - 1) j += 1;
    const [t0, a0, p0] = history[j];
    const [t1, a1, p1] = history[i];
    const dt = t1 - t0;
    if (dt <= 0) continue;
    const delta = usePages ? p1 - p0 : a1 - a0;
    points.push([t1, Math.max(0, delta / dt)]);  // a clear resets the counters: never below 0
  }
  $("chart-title").textContent = usePages ? "pages/s (HTTP responses, all workers)" : "tasks/s (all workers)";
  const nodes = [];
  const max = Math.max(1, ...points.map((p) => p[1]));
  const t1 = points.length ? points[points.length - 1][0] : Date.now() / 1000;
  const t0 = points.length ? Math.min(points[0][0], t1 - 60) : t1 - 60;
  const x = (t) => left + ((t - t0) / Math.max(1, t1 - t0)) * (W - left - right);
  const y = (v) => top + (1 - v / max) * (H - top - bottom);
  const grid = svg("g", { class: "grid" });
  for (const f of [0, 0.5, 1]) {
    grid.append(svg("line", { x1: left, x2: W - right, y1: y(max * f), y2: y(max * f) }));
    nodes.push(svg("text", { class: "axis", x: left - 4, y: y(max * f) + 4, "text-anchor": "end" }, num(max * f)));
  }
  nodes.unshift(grid);
  nodes.push(svg("text", { class: "axis", x: left, y: H - 6 }, `${Math.round((t1 - t0) / 60 * 10) / 10} min ago`));
  nodes.push(svg("text", { class: "axis", x: W - right, y: H - 6, "text-anchor": "end" }, "now"));
  if (points.length) {
    nodes.push(svg("polyline", { class: "rate", points: points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ") }));
  }
  chart.replaceChildren(...nodes);
  const last = points.length ? points[points.length - 1][1] : null;
  $("chart-note").textContent = points.length
    ? `now ${num(last)}/s, peak ${num(Math.max(...points.map((p) => p[1])))}/s over the last ${Math.round((t1 - t0) / 60 * 10) / 10} min`
    : "collecting samples…";
}

function draw(data) {
  const s = data.status;
  interval = data.interval || interval;
  $("loop-name").textContent = s.name;
  document.title = `${s.name} · achihuo_mini`;
  const q = s.queue;
  $("where").textContent = `queue: ${q.backend} at ${q.location}${q.durability ? ` (durability: ${q.durability})` : ""}`
    + ` · done set: ${s.done.backend} at ${s.done.location}`;
  $("q-ready").textContent = num(q.ready);
  $("q-delayed").textContent = num(q.delayed);
  $("q-leased").textContent = num(q.leased);
  $("q-dead").textContent = num(q.dead);
  $("done-count").textContent = num(s.done.count);
  $("rate").textContent = num(s.workers.reduce((sum, w) => sum + (typeof w.rate === "number" ? w.rate : 0), 0));
  document.body.classList.toggle("actions", Boolean(data.actions));
  $("actions").hidden = !data.actions;
  drawWorkers(s.workers, data.actions);
  drawStats(s.stats);
  drawDead(data.dead, q.dead);
  drawChart(data.history);
  const health = $("health");
  health.textContent = `updated ${new Date(data.now * 1000).toLocaleTimeString()}`;
  health.className = "ok";
}

async function refresh() {
  try {
    const answer = await fetch("/api/page", { cache: "no-store" });
    const data = await answer.json();
    if (!answer.ok) throw new Error(data.error || answer.status);
    draw(data);
    failures = 0;
  } catch (err) {
    failures += 1;
    const health = $("health");
    health.textContent = `cannot read the loop (${err.message || err}); trying again`;
    health.className = "stale";
  }
}

async function poll() {
  await refresh();
  setTimeout(poll, Math.min(30, interval * (1 + Math.min(failures, 5))) * 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  $("requeue").addEventListener("click", () => act("/api/requeue", { limit: null }));
  $("stop-all").addEventListener("click", () => act("/api/stop", { targets: ["all"] }));
  poll();
});
