"use strict";
// Polls the appliance's own JSON endpoints; no framework, no CDN: it must work air-gapped.

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function fill(tableId, rows) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    tr.append(...cells);
    return tr;
  }));
}

async function getJSON(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  return { status: response.status, body: await response.json() };
}

async function refresh() {
  try {
    const [ready, health, models] = await Promise.all([getJSON("/ready"), getJSON("/health"), getJSON("/v1/models")]);
    const status = document.getElementById("status");
    status.textContent = ready.status === 200 ? "ready" : `not ready: ${ready.body.reason}`;
    status.className = `pill ${ready.status === 200 ? "ok" : "bad"}`;
    fill("backends", Object.entries(ready.body.backends || {}).map(([name, b]) => [
      cell(name), cell(b.kind), cell(b.state, `state-${b.state}`), cell(String(b.models)),
    ]));
    fill("models", (models.body.data || []).map((m) => [
      cell(m.id), cell((m.backends || []).map((b) => b.id).join(", ") || m.target || ""),
      cell(m.context_window ? String(m.context_window) : "—"),
    ]));
    document.getElementById("footer").textContent =
      `appliance ${health.body.version} · updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    document.getElementById("status").textContent = `unreachable: ${error.message}`;
  }
}

refresh();
setInterval(refresh, 5000);
