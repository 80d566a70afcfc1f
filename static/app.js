"use strict";
// The status page: polls /statsz every 5 s and draws it with DOM APIs only. Nothing is ever assigned to
// innerHTML (backend names and upstream errors are data), and nothing loads from outside: it works air-gapped.
(() => {
  const KEY = "appliance-key"; // sessionStorage: this tab only, never logged
  const POLL_MS = 5000;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  let timer = null;

  // Formatting. Every field may be missing or null; those show as "—".
  const missing = (v) => v === null || v === undefined || (typeof v === "number" && !Number.isFinite(v));
  const num = (v, digits = 0) => (missing(v) ? "—" : Number(v).toLocaleString("en-US", { maximumFractionDigits: digits }));
  const pct = (v) => (missing(v) ? "—" : `${(v * 100).toFixed(1)}%`);
  const ms = (v) => (missing(v) ? "—" : v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${Math.round(v)} ms`);
  const usd = (v) => (missing(v) ? "—" : `$${Number(v).toFixed(v > 0 && v < 0.01 ? 4 : 2)}`);
  const clock = (t) => (missing(t) ? "—" : new Date(t * 1000).toLocaleTimeString());

  function bytes(v) {
    if (missing(v)) return "—";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
  }

  function duration(s) {
    if (missing(s)) return "—";
    s = Math.max(0, Math.round(s));
    const parts = [[Math.floor(s / 86400), "d"], [Math.floor(s / 3600) % 24, "h"], [Math.floor(s / 60) % 60, "m"], [s % 60, "s"]];
    const first = parts.findIndex(([n]) => n > 0);
    if (first < 0) return "0s";
    return parts.slice(first, first + 2).filter(([n]) => n > 0).map(([n, unit]) => `${n}${unit}`).join(" ");
  }

  // DOM helpers.
  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
    return node;
  }

  // rows: arrays of cells; a cell is a string, [text, className] or a DOM node.
  function fill(tableId, rows, emptyText) {
    const body = $(tableId).tBodies[0];
    if (!rows.length) {
      const td = el("td", emptyText, "muted");
      td.colSpan = $(tableId).tHead.rows[0].cells.length;
      body.replaceChildren(el("tr"));
      body.rows[0].append(td);
      return;
    }
    body.replaceChildren(...rows.map((cells) => {
      const tr = el("tr");
      tr.append(...cells.map(cellOf));
      return tr;
    }));
  }

  function cellOf(cell) {
    if (Array.isArray(cell)) return el("td", cell[0], cell[1]);
    if (!(cell instanceof Node)) return el("td", cell);
    const td = el("td");
    td.append(cell);
    return td;
  }

  // Rendering.
  function renderTotals(d) {
    const t = d.totals ?? {};
    const items = [
      ["requests", num(t.requests)],
      ["requests/s", num(t.requests_per_s, 2)],
      ["errors", num(t.errors), t.errors > 0 ? "bad" : ""],
      ["tokens in / out", `${num(t.prompt_tokens)} / ${num(t.completion_tokens)}`],
      ["cache hit rate", pct(t.cache_hit_rate)],
      ["cost", usd(t.cost_usd)],
      ["compute cost", usd(t.compute_cost_usd)],
      ["limit rejections", num(d.limits?.rejections), d.limits?.rejections > 0 ? "warn" : ""],
      ["database size", bytes(d.db?.size_bytes)],
      ["write queue", num(d.db?.write_queue_depth), d.db?.write_queue_depth > 100 ? "warn" : ""],
    ];
    $("totals").replaceChildren(...items.map(([label, value, className]) => {
      const item = el("div");
      item.append(el("dt", label), el("dd", value, className));
      return item;
    }));
  }

  function renderTraffic(points) {
    const box = $("traffic");
    if (!points.length) {
      box.replaceChildren(el("p", "No traffic recorded yet.", "muted"));
      $("traffic-note").textContent = "";
      return;
    }
    if (points.length === 1) points = [points[0], points[0]];
    const [w, h, pad] = [600, 60, 3];
    const peak = Math.max(1, ...points.map((p) => Math.max(p.requests ?? 0, p.errors ?? 0)));
    const x = (i) => ((i * w) / (points.length - 1)).toFixed(1);
    const y = (v) => (h - pad - ((v ?? 0) / peak) * (h - 2 * pad)).toFixed(1);
    const coords = (field) => points.map((p, i) => `${x(i)},${y(p[field])}`).join(" ");
    const chart = svg("svg", { id: "sparkline", viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", role: "img" });
    const total = points.reduce((sum, p) => sum + (p.requests ?? 0), 0);
    const title = svg("title", {});
    title.textContent = `${total} requests in the last ${points.length} minutes, peak ${peak}/min`;
    chart.append(
      title,
      svg("polygon", { class: "area", points: `0,${h} ${coords("requests")} ${w},${h}` }),
      svg("polyline", { class: "requests", points: coords("requests") }),
      svg("polyline", { class: "errors", points: coords("errors") }),
    );
    box.replaceChildren(chart);
    $("traffic-note").textContent = `peak ${num(peak)}/min`;
  }

  function renderBackends(backends, now) {
    const breakerClass = { closed: "good", half_open: "warn", "half-open": "warn", open: "bad" };
    fill("backends", backends.map((b) => {
      const breaker = b.breaker ?? {};
      let breakerText = breaker.state ?? "—";
      if (breaker.retry_after_s > 0) breakerText += ` · retry ${duration(breaker.retry_after_s)}`;
      else if (breaker.consecutive_failures > 0) breakerText += ` · ${breaker.consecutive_failures} fails`;
      return [
        [b.name ?? "?", "name"],
        [b.state ?? (b.up ? "up" : "down"), b.up === true ? "good" : b.up === false ? "bad" : ""],
        [breakerText, breakerClass[breaker.state] ?? ""],
        [ms(b.latency_ms?.p50), "num"], [ms(b.latency_ms?.p95), "num"],
        [num(b.requests), "num"], [pct(b.error_rate), b.error_rate > 0 ? "num bad" : "num"],
        [missing(b.capacity) ? num(b.inflight) : `${num(b.inflight)} / ${num(b.capacity)}`, "num"],
        [num(b.queued), b.queued > 0 ? "num warn" : "num"],
        [num(b.models), "num"], b.kind ?? "—",
        missing(b.last_probe_at) ? "—" : `${duration(now - b.last_probe_at)} ago`,
        [b.last_error ?? "", "wrap"],
      ];
    }), "No backends configured.");
  }

  function renderModels(models) {
    fill("models", models.map((m) => [
      [m.model ?? "?", "name"], [num(m.requests), "num"], [num(m.errors), m.errors > 0 ? "num bad" : "num"],
      [num(m.prompt_tokens), "num"], [num(m.completion_tokens), "num"], [usd(m.cost_usd), "num"],
      [pct(m.cache_hit_rate), "num"],
    ]), "No requests yet.");
  }

  // A cell may also be a DOM node (the progress bar).
  function progress(counts) {
    const total = counts?.total ?? 0;
    const done = (counts?.completed ?? 0) + (counts?.failed ?? 0);
    const bar = el("progress");
    bar.max = Math.max(1, total);
    bar.value = Math.min(done, bar.max);
    bar.textContent = total ? `${Math.round((100 * done) / total)}%` : "—";
    bar.title = total ? `${done} of ${total} lines` : "counting lines";
    return bar;
  }

  function renderBatches(b, now) {
    const active = b?.active ?? [];
    const byStatus = Object.entries(b?.by_status ?? {}).sort(([x], [y]) => x.localeCompare(y));
    $("batches-note").textContent = byStatus.map(([status, n]) => `${status} ${num(n)}`).join(" · ");
    const statusClass = { in_progress: "good", validating: "", finalizing: "", cancelling: "warn" };
    fill("batches", active.map((batch) => {
      const counts = batch.request_counts ?? {};
      return [
        [batch.id ?? "?", "mono"], [batch.status ?? "—", statusClass[batch.status] ?? ""], progress(counts),
        [num(counts.completed), "num"], [num(counts.failed), counts.failed > 0 ? "num bad" : "num"],
        [num(counts.total), "num"], batch.endpoint ?? "—", batch.model ?? "—",
        missing(batch.expires_at) ? "—" : `in ${duration(batch.expires_at - now)}`,
      ];
    }), byStatus.length ? "No batch running." : "No batches yet.");
  }

  function renderErrors(errors) {
    const latest = [...errors].sort((a, b) => (b.time ?? 0) - (a.time ?? 0)).slice(0, 20);
    fill("errors", latest.map((e) => [
      clock(e.time), [num(e.status), "num bad"], e.error_code ?? "—", e.model ?? "—", e.backend ?? "—",
      [e.request_id ?? "", "mono"],
    ]), "No recent errors.");
  }

  function render(d) {
    const now = d.now ?? Date.now() / 1000;
    const backends = d.backends ?? [];
    const up = backends.filter((b) => b.up).length;
    const status = $("status");
    const degraded = d.degraded ?? [];
    status.textContent = (backends.length ? `${up}/${backends.length} backends up` : "no backends")
      + (degraded.length ? " · degraded" : "");
    status.className = `pill ${up === backends.length && up > 0 && !degraded.length ? "good" : up > 0 ? "warn" : "bad"}`;
    const workers = d.workers?.configured;
    const alive = d.workers?.alive;
    const workersText = missing(workers) ? null
      : `${!missing(alive) && alive !== workers ? `${alive}/` : ""}${workers} worker${workers === 1 ? "" : "s"}`;
    $("meta").textContent = [d.version && `v${d.version}`, !missing(d.uptime_s) && `up ${duration(d.uptime_s)}`,
      workersText].filter(Boolean).join(" · ");
    renderTotals(d);
    renderTraffic(d.traffic ?? []);
    renderBackends(backends, now);
    renderModels(d.models ?? []);
    renderBatches(d.batches, now);
    renderErrors(d.recent_errors ?? []);
    $("footer").textContent = `Last updated ${new Date().toLocaleTimeString()} · refreshes every ${POLL_MS / 1000} s`;
    $("banner").textContent = degraded.length ? `Degraded: ${degraded.join(", ")}.` : "";
    $("banner").hidden = !degraded.length;
    $("content").hidden = false;
    document.body.dataset.state = "loaded";
  }

  // Fetching, and the key form.
  function schedule() {
    clearTimeout(timer);
    if (!document.hidden) timer = setTimeout(poll, POLL_MS);
  }

  function failed(message) {
    const banner = $("banner");
    const stale = $("content").hidden ? "" : " Showing the last data received;";
    banner.textContent = `${message}.${stale} Retrying every ${POLL_MS / 1000} s.`;
    banner.hidden = false;
    $("status").textContent = "unreachable";
    $("status").className = "pill bad";
    document.body.dataset.state = "error";
    schedule();
  }

  function askForKey(note) {
    clearTimeout(timer);
    $("key-note").textContent = note ?? "It is kept in this tab only (sessionStorage).";
    $("key-form").hidden = false;
    $("content").hidden = true;
    $("banner").hidden = true;
    $("status").textContent = "key needed";
    $("status").className = "pill";
    document.body.dataset.state = "need-key";
    $("key-input").focus();
  }

  async function poll() {
    clearTimeout(timer);
    const key = sessionStorage.getItem(KEY);
    const headers = { Accept: "application/json" };
    if (key) headers.Authorization = `Bearer ${key}`;
    let response;
    try {
      response = await fetch("/statsz", { headers, cache: "no-store" });
    } catch (error) {
      return failed(`Cannot reach /statsz (${error.message})`);
    }
    if (response.status === 401 || response.status === 403) {
      if (key) sessionStorage.removeItem(KEY);
      const note = response.status === 403 ? "That key may not read /statsz; try another." : "That key was not accepted.";
      return askForKey(key ? note : null);
    }
    if (!response.ok) return failed(`/statsz answered HTTP ${response.status}`);
    let data;
    try {
      data = await response.json();
    } catch {
      return failed("/statsz did not answer JSON");
    }
    try {
      render(data);
    } catch (error) {
      console.error("status page: render failed", error); // a bug here should be loud (tests read the console)
      return failed(`Cannot show /statsz (${error.message})`);
    }
    schedule();
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY, key);
    $("key-input").value = "";
    $("key-form").hidden = true;
    poll();
  });

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && document.body.dataset.state !== "need-key") poll();
  });

  poll();
})();
