"""The control page served at `/` on the control port: see and flip the modes by hand.

Rendered by the server: the table of services and their modes is in the HTML itself, and each
row's forms POST to `/page/services/<name>/mode` or `/reset`, which answer `303 See Other` back
to `/` (with a line saying what happened), so the page works without JavaScript. A small script
only refreshes the counts and modes every two seconds, with `textContent`, never `innerHTML`.
Every value shown is escaped; nothing from a request or the API becomes markup. One
self-contained document (no CDN, no external file). The page says in one line what each mode
does and links to the proxy's status page (`status_url`). The JSON control API (§7)
is untouched by all this: the forms have paths of their own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from html import escape
from typing import Any, Final

from .modes import MODE_OPTIONS, Mode, ModeError

DEFAULT_STATUS_URL: Final = "http://127.0.0.1:8080/status"

# One line each: what a service in that mode does to the requests it gets.
MODE_HELP: Final[dict[Mode, str]] = {
    Mode.HEALTHY: "answers normally.",
    Mode.ERROR: "answers HTTP `status` (500) instead, for a `rate` share of requests (1 = every one).",
    Mode.SLOW: "waits `latency_ms`, then answers normally (the work is done even if the caller gave up).",
    Mode.HANG: "takes the request and never answers; when the mode changes the connection is dropped.",
    Mode.DOWN: "closes its port and every open connection: new connections are refused.",
    Mode.FLAP: "healthy for `period_s` seconds, then errors (`status`) for `period_s`, and so on.",
}

# The form's fields: every option any mode takes, with the value a person most likely wants.
FIELDS: Final[dict[str, tuple[str, str]]] = {  # name → (default, input attributes)
    "status": ("500", 'type="number" min="400" max="599"'),
    "rate": ("1", 'type="number" min="0" max="1" step="0.05"'),
    "latency_ms": ("2000", 'type="number" min="0" step="1"'),
    "period_s": ("5", 'type="number" min="0.1" step="0.1"'),
}
_CODE: Final = re.compile(r"`([^`]+)`")
_SHOWN: Final = frozenset({"mode", "port", "url", "requests", "recorded", "listening", "phase"})


def form_mode(form: Mapping[str, str]) -> dict[str, Any]:
    """A `PUT /services/<name>/mode` body from the page's form: the mode and only the options
    that mode takes (blank ones left to their defaults). ModeError for a field that is no number."""
    mode = form.get("mode", "")
    body: dict[str, Any] = {"mode": mode}
    takes = MODE_OPTIONS[Mode(mode)] if mode in {m.value for m in Mode} else {}
    problems = []
    for key in takes:
        text = form.get(key, "").strip()
        if not text:
            continue
        try:
            number = float(text)
        except ValueError:
            problems.append(f"{key} must be a number, got {text!r}")
            continue
        body[key] = int(number) if key == "status" and number.is_integer() else number
    if problems:
        raise ModeError(problems)
    return body


def _code(text: str) -> str:
    return _CODE.sub(r"<code>\1</code>", text)


def _options(entry: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in entry.items() if key not in _SHOWN)


def _mode_text(entry: Mapping[str, Any]) -> str:
    phase = entry.get("phase")
    return f"{entry['mode']} (now {phase})" if phase else str(entry["mode"])


def _row(name: str, entry: Mapping[str, Any]) -> str:
    service = escape(name)
    path = f"/page/services/{service}"
    current = str(entry["mode"])
    choices = "".join(
        f'<option value="{m.value}"{" selected" if m.value == current else ""}>{m.value}</option>' for m in Mode)
    fields = "".join(
        f'<label>{key} <input name="{key}" value="{escape(str(entry.get(key, default)))}" {attributes}></label>'
        for key, (default, attributes) in FIELDS.items())
    url = escape(str(entry["url"]))
    mode_class = "".join(c for c in current if c.isalpha())
    return (
        f'<tr data-service="{service}"><th scope="row">{service}</th><td><a href="{url}/">{url}</a></td>'
        f'<td class="mode {mode_class}" data-field="mode">{escape(_mode_text(entry))}</td>'
        f'<td data-field="options">{escape(_options(entry))}</td>'
        f'<td data-field="requests">{int(entry["requests"])}</td>'
        f'<td data-field="recorded">{int(entry["recorded"])}</td>'
        f'<td><form method="post" action="{path}/mode"><select name="mode" aria-label="mode of {service}">'
        f'{choices}</select> {fields} <button type="submit">set</button></form>'
        f'<form method="post" action="{path}/reset"><button type="submit">reset</button>'
        f' <small>healthy again, records and count cleared</small></form></td></tr>')


def render_page(services: Mapping[str, Mapping[str, Any]], *, status_url: str = DEFAULT_STATUS_URL,
                control_url: str = "http://127.0.0.1:9100", notice: str = "", problem: str = "") -> str:
    """The whole page for `GET /services`' body; `notice`/`problem` is the last form's outcome."""
    rows = "\n".join(_row(name, entry) for name, entry in services.items())
    help_items = "\n".join(f"<li><b>{mode.value}</b>: {_code(escape(text))}</li>"
                           for mode, text in MODE_HELP.items())
    status = escape(status_url)
    said = (f'<p class="notice" role="status">{escape(notice)}</p>' if notice else "") + (
        f'<p class="problem" role="alert">{escape(problem)}</p>' if problem else "")
    return PAGE_TEMPLATE.format(rows=rows, help=help_items, status=status, said=said,
                                control=escape(control_url))


PAGE_TEMPLATE: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fake upstreams</title>
<style>
  body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #222; }}
  table {{ border-collapse: collapse; margin: 1rem 0; }}
  th, td {{ border: 1px solid #ccc; padding: .35rem .6rem; text-align: left; vertical-align: top; }}
  thead th {{ background: #f3f3f3; }}
  .mode {{ font-weight: 600; }}
  .healthy {{ color: #1a7f37; }} .error, .flap {{ color: #b35900; }}
  .down, .hang {{ color: #c62828; }} .slow {{ color: #6a4fb3; }}
  form {{ margin: 0 0 .3rem; }}
  label {{ margin-right: .4rem; font-size: 12px; }}
  input {{ width: 4.5rem; }}
  .notice {{ color: #1a7f37; }} .problem {{ color: #c62828; white-space: pre-wrap; }}
</style>
</head>
<body>
<h1>fake upstreams</h1>
<p>The shop's payment, inventory, notification and shipping services, as the demo proxy sees
them. Set a mode and watch what the proxy does on its
<a href="{status}">status page</a> ({status}).</p>
{said}
<table>
  <thead><tr><th>service</th><th>address</th><th>mode</th><th>options</th>
  <th>requests</th><th>records</th><th>set mode</th></tr></thead>
  <tbody id="services">
{rows}
  </tbody>
</table>
<h2>What the modes do</h2>
<ul id="modes">
{help}
</ul>
<p>An option is used only by the modes that take it. The same from a terminal:
<code>curl -X PUT {control}/services/payment/mode -d '{{"mode": "down"}}'</code>
(<code>GET /services</code>, <code>PUT /services/NAME/mode</code>, <code>POST /services/NAME/reset</code>).</p>
<script>
"use strict";
// Optional: the page is complete without it. It only keeps the counts and modes current.
async function refresh() {{
  let services;
  try {{
    services = await (await fetch("/services")).json();
  }} catch (err) {{
    return;
  }}
  for (const row of document.querySelectorAll("tr[data-service]")) {{
    const entry = services[row.dataset.service];
    if (!entry) continue;
    const options = Object.entries(entry)
      .filter(([key]) => !["mode", "port", "url", "requests", "recorded", "listening", "phase"].includes(key))
      .map(([key, value]) => key + "=" + value).join(" ");
    const mode = String(entry.mode) + (entry.phase ? " (now " + entry.phase + ")" : "");
    const cells = {{mode, options, requests: String(entry.requests), recorded: String(entry.recorded)}};
    for (const [field, text] of Object.entries(cells)) {{
      const cell = row.querySelector('[data-field="' + field + '"]');
      if (cell.textContent !== text) cell.textContent = text;
    }}
    row.querySelector('[data-field="mode"]').className = "mode " + String(entry.mode).replace(/[^a-z]/g, "");
  }}
}}
setInterval(refresh, 2000);
</script>
</body>
</html>
"""
