// Live status page of xds-server: polls the admin JSON API and draws tables and SVG charts.
// Plain JS, no dependencies: the admin server runs on machines without internet access.
// Every text that comes from the server (node ids, NACK messages) goes in as textContent,
// never as HTML: an xDS client chooses its own node id and error text.
"use strict";

const params = new URLSearchParams(location.search);
const INTERVAL_MS = Math.max(200, Number(params.get("interval")) || 2000);
const WINDOW_MS = 10 * 60 * 1000; // how far back the charts go
const KV_METRIC = "named_metrics.kv_cache_usage_perc";
const QUEUE_METRIC = "named_metrics.num_requests_waiting";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];
const SVG_NS = "http://www.w3.org/2000/svg";

// pool name -> endpoint key -> [{t, weight, kv}], trimmed to WINDOW_MS
const history = new Map();

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children.map((c) => (c instanceof Node ? c : document.createTextNode(String(c)))));
  return node;
}

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== null) node.textContent = text;
  return node;
}

function badge(state) {
  return el("span", { class: `badge ${state}` }, state.replace("_", " "));
}

function fmt(value, digits = 2) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function ago(unixSeconds) {
  if (!unixSeconds) return "never";
  const seconds = Math.max(0, Date.now() / 1000 - unixSeconds);
  return seconds < 90 ? `${seconds.toFixed(0)} s ago` : `${(seconds / 60).toFixed(0)} min ago`;
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function record(now, details) {
  for (const pool of details) {
    const series = history.get(pool.pool) || new Map();
    history.set(pool.pool, series);
    for (const e of pool.endpoints) {
      const points = series.get(e.key) || [];
      series.set(e.key, points);
      const kv = e.load && KV_METRIC in e.load.metrics ? e.load.metrics[KV_METRIC] : null;
      // A draining endpoint gets no new requests: chart it at 0, whatever its weight.
      points.push({ t: now, weight: e.state === "draining" ? 0 : e.effective_weight, kv });
      while (points.length && points[0].t < now - WINDOW_MS) points.shift();
    }
  }
}

function renderSummary(health) {
  const last = health.snapshot.last_attempt;
  const fileState = !last || last.ok ? "ok" : "failed";
  const summary = document.getElementById("summary");
  summary.replaceChildren(
    `${health.clients} clients · generation ${health.generation} · snapshot `,
    badge(fileState),
    ` ${health.snapshot.file} (loaded ${ago(health.snapshot.loaded_at)})`,
    ` · changes via API: ${health.mutations}`
  );
  if (fileState === "failed") summary.append(el("div", { class: "nack" }, last.problems.join("\n")));
  document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

function typeCell(status) {
  const cell = el("td", {}, badge(status.state), " ", el("code", {}, status.acked_version || "–"));
  if (status.last_nack) {
    const nack = status.last_nack;
    cell.append(el("div", { class: "nack" }, `NACK ${ago(nack.at)} of ${nack.version}: ${nack.error}`));
  }
  return cell;
}

function nodeState(node) {
  const states = Object.values(node.types).map((t) => t.state);
  return states.includes("rejected") ? "rejected" : node.in_sync ? "in_sync" : "pending";
}

function renderNodes(nodes) {
  const target = document.getElementById("nodes");
  if (!nodes.length) {
    target.replaceChildren(el("p", { class: "muted" }, "no xDS client connected"));
    return;
  }
  const types = ["clusters", "endpoints", "listeners", "routes"];
  const head = el("tr", {}, ...["node", "cluster", "group", "protocol", "sync"].map((h) => el("th", {}, h)));
  head.append(...types.map((t) => el("th", {}, t)));
  const rows = nodes.map((n) => {
    const row = el(
      "tr",
      { "data-node": n.id },
      el("td", {}, n.id),
      el("td", {}, n.cluster),
      el("td", {}, n.group),
      el("td", {}, `${n.protocol} ${n.service}`),
      el("td", {}, badge(nodeState(n)))
    );
    row.append(...types.map((t) => (n.types[t] ? typeCell(n.types[t]) : el("td", { class: "muted" }, "–"))));
    return row;
  });
  target.replaceChildren(el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows)));
}

function endpointRow(e) {
  const metrics = e.load ? e.load.metrics : {};
  const cells = [
    el("td", {}, el("code", {}, e.key)),
    el("td", {}, e.zone || "–"),
    el("td", {}, e.origin),
    el("td", {}, badge(e.state)),
    el("td", { class: "num" }, e.static_weight),
    el("td", { class: "num" }, e.effective_weight + (e.saturated ? " (saturated)" : "")),
    el("td", { class: "num" }, e.load ? fmt(e.load.rps, 1) : "–"),
    el("td", { class: "num" }, e.load ? fmt(e.load.in_progress, 0) : "–"),
    el("td", { class: "num" }, KV_METRIC in metrics ? `${fmt(100 * metrics[KV_METRIC], 0)} %` : "–"),
    el("td", { class: "num" }, QUEUE_METRIC in metrics ? fmt(metrics[QUEUE_METRIC], 0) : "–"),
    el("td", { class: "num" }, e.load ? `${fmt(e.load.age, 1)} s` : "no data"),
  ];
  return el("tr", { "data-endpoint": e.key, "data-state": e.state }, ...cells);
}

function chart(title, series, now, { yMax = null, format = (v) => fmt(v, 0) } = {}) {
  const legendRows = Math.ceil(series.length / 3);
  const width = 460, height = 160 + 11 * legendRows, left = 44, right = 10, bottom = 22;
  const top = 22 + 11 * legendRows;
  const root = svg("svg", { class: "chart", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  root.append(svg("text", { x: left, y: 12, class: "title" }, title));
  const all = series.flatMap((s) => s.points);
  if (!all.length) {
    root.append(svg("text", { x: left, y: height / 2 }, "no data yet"));
    return root;
  }
  const t0 = Math.min(...all.map((p) => p.t));
  const span = Math.max(now - t0, 10_000);
  const top_ = yMax ?? Math.max(1, ...all.map((p) => p.v)) * 1.1;
  const x = (t) => left + ((t - (now - span)) / span) * (width - left - right);
  const y = (v) => height - bottom - (v / top_) * (height - top - bottom);
  root.append(svg("line", { x1: left, y1: y(0), x2: width - right, y2: y(0), stroke: "#d1d5db" }));
  for (const v of [0, top_ / 2, top_]) root.append(svg("text", { x: 2, y: y(v) + 3 }, format(v)));
  root.append(svg("text", { x: left, y: height - 6 }, `${Math.round(span / 1000)} s ago`));
  root.append(svg("text", { x: width - right - 20, y: height - 6 }, "now"));
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const points = s.points.map((p) => `${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join(" ");
    root.append(svg("polyline", { points, fill: "none", stroke: color, "stroke-width": 1.5, "data-series": s.name }));
    const legend = { x: left + (i % 3) * 135, y: 26 + Math.floor(i / 3) * 11, style: `fill: ${color}` };
    root.append(svg("text", legend, s.name));
  });
  return root;
}

function poolCharts(name, now) {
  const series = [...(history.get(name) || new Map()).entries()];
  const weights = series.map(([key, points]) => ({ name: key, points: points.map((p) => ({ t: p.t, v: p.weight })) }));
  const kv = series
    .map(([key, points]) => ({ name: key, points: points.filter((p) => p.kv !== null).map((p) => ({ t: p.t, v: p.kv })) }))
    .filter((s) => s.points.length);
  return el(
    "div",
    { class: "charts" },
    chart("effective weight (draining = 0)", weights, now),
    chart("KV-cache utilization", kv, now, { yMax: 1, format: (v) => `${Math.round(v * 100)}%` })
  );
}

function renderPools(pools, details, now) {
  const target = document.getElementById("pools");
  if (!pools.length) {
    target.replaceChildren(el("p", { class: "muted" }, "no pools served"));
    return;
  }
  const head = ["endpoint", "zone", "origin", "state", "static", "effective", "rps", "in flight", "KV cache", "queue", "load age"];
  target.replaceChildren(
    ...pools.map((pool, i) => {
      const detail = details[i];
      // Counted from the endpoints read after the pool list, so a change between the two
      // reads cannot show a table and a summary that disagree.
      const draining = detail.endpoints.filter((e) => e.state === "draining").length;
      const active = detail.endpoints.length - draining;
      const section = el(
        "section",
        { class: "pool", "data-pool": pool.name },
        el("h3", {}, pool.name),
        el(
          "div",
          { class: "muted" },
          `${pool.weighting} weights · ${pool.lb_policy} · ${active} active, ${draining} draining · groups ${pool.node_groups.join(", ") || "none"}`,
          detail.load_data ? "" : " · no load data (LRS not connected)"
        ),
        el(
          "table",
          {},
          el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
          el("tbody", {}, ...detail.endpoints.map(endpointRow))
        )
      );
      if (detail.removed.length) section.append(el("div", { class: "muted" }, `removed through the API: ${detail.removed.join(", ")}`));
      section.append(poolCharts(pool.name, now));
      return section;
    })
  );
}

function showError(err) {
  const box = document.getElementById("error");
  box.hidden = err === null;
  box.textContent = err === null ? "" : `cannot reach the admin API: ${err.message}`;
}

async function refresh() {
  try {
    const [health, nodes, pools] = await Promise.all([getJSON("healthz"), getJSON("api/v1/nodes"), getJSON("api/v1/pools")]);
    const details = await Promise.all(
      pools.pools.map((p) => getJSON(`api/v1/pools/${encodeURIComponent(p.name)}/endpoints`))
    );
    const now = Date.now();
    record(now, details);
    renderSummary(health);
    renderNodes(nodes.nodes);
    renderPools(pools.pools, details, now);
    showError(null);
  } catch (err) {
    showError(err);
  } finally {
    setTimeout(refresh, INTERVAL_MS);
  }
}

refresh();
