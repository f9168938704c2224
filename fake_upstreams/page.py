"""The control page served at `/` on the control port: flip modes by hand.

One self-contained HTML document (no CDN, no external file, so it survives any
packaging). It only calls the control API with fetch; every value shown is put in
the DOM with `textContent`, never `innerHTML`, so nothing from the API is markup.
"""

from __future__ import annotations

from typing import Final

PAGE_HTML: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fake upstreams</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #222; }
  table { border-collapse: collapse; margin: 1rem 0; }
  th, td { border: 1px solid #ccc; padding: .35rem .6rem; text-align: left; }
  th { background: #f3f3f3; }
  .mode { font-weight: 600; }
  .healthy { color: #1a7f37; } .error, .flap { color: #b35900; }
  .down, .hang { color: #c62828; } .slow { color: #6a4fb3; }
  button { margin: 0 .15rem; cursor: pointer; }
  label { margin-right: 1rem; }
  input { width: 5.5rem; }
  #message { min-height: 1.4em; color: #c62828; white-space: pre-wrap; }
</style>
</head>
<body>
<h1>fake upstreams</h1>
<p>
  <label>error status <input id="status" type="number" min="400" max="599" value="500"></label>
  <label>error rate <input id="rate" type="number" min="0" max="1" step="0.05" value="1"></label>
  <label>slow latency_ms <input id="latency_ms" type="number" min="0" value="2000"></label>
  <label>flap period_s <input id="period_s" type="number" min="0.1" step="0.1" value="5"></label>
</p>
<table>
  <thead><tr><th>service</th><th>address</th><th>mode</th><th>options</th>
  <th>requests</th><th>records</th><th>set mode</th></tr></thead>
  <tbody id="services"></tbody>
</table>
<div id="message" role="status"></div>
<script>
"use strict";
const MODES = ["healthy", "error", "slow", "hang", "down", "flap"];
const SHOWN = new Set(["mode", "port", "url", "requests", "recorded", "listening"]);

function numberOf(id) { return Number(document.getElementById(id).value); }

function optionsFor(mode) {
  if (mode === "error") return {status: numberOf("status"), rate: numberOf("rate")};
  if (mode === "slow") return {latency_ms: numberOf("latency_ms")};
  if (mode === "flap") return {status: numberOf("status"), period_s: numberOf("period_s")};
  return {};
}

function say(text) { document.getElementById("message").textContent = text; }

async function call(method, path, body) {
  const init = {method, headers: {"Content-Type": "application/json"}};
  if (body !== undefined) init.body = JSON.stringify(body);
  try {
    const response = await fetch(path, init);
    const data = await response.json();
    if (!response.ok) { say(response.status + ": " + (data.message || data.error)); return; }
    say("");
  } catch (err) {
    say("control API unreachable: " + err);
  }
  await refresh();
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

function renderRow(name, entry) {
  const row = document.createElement("tr");
  cell(row, name);
  const address = cell(row, "");
  const link = document.createElement("a");
  link.href = String(entry.url);
  link.textContent = String(entry.url);
  address.appendChild(link);
  const mode = String(entry.mode) + (entry.phase ? " (" + entry.phase + ")" : "");
  cell(row, mode, "mode " + String(entry.mode).replace(/[^a-z]/g, ""));
  const options = Object.entries(entry)
    .filter(([key]) => !SHOWN.has(key) && key !== "phase")
    .map(([key, value]) => key + "=" + value).join(" ");
  cell(row, options);
  cell(row, String(entry.requests));
  cell(row, String(entry.recorded));
  const actions = cell(row, "");
  const path = "/services/" + encodeURIComponent(name);
  for (const m of MODES) {
    actions.appendChild(button(m, () => call("PUT", path + "/mode", {mode: m, ...optionsFor(m)})));
  }
  actions.appendChild(button("reset", () => call("POST", path + "/reset")));
  return row;
}

async function refresh() {
  let services;
  try {
    const response = await fetch("/services");
    services = await response.json();
  } catch (err) {
    say("control API unreachable: " + err);
    return;
  }
  const body = document.getElementById("services");
  body.replaceChildren(...Object.entries(services).map(([n, e]) => renderRow(n, e)));
}

refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"""
