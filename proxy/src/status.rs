//! The status page of the admin listener: `GET /status` (HTML, no external assets, refreshed
//! every two seconds by its own script from `GET /status.json`) shows each pool's backends with
//! health, drain and ejection state, requests and streams in flight, error rate and mean
//! latency over the last refresh, and the recent health transitions, ejections, drains and
//! failovers ([`Events`], the last [`MAX_EVENTS`]).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use crate::state::Snapshot;

/// Events kept for the page; older ones are dropped.
pub const MAX_EVENTS: usize = 50;

/// Recent events, bounded.
#[derive(Debug, Default)]
pub struct Events(Mutex<VecDeque<Value>>);

impl Events {
    /// Records `kind` (`up`, `down`, `ejected`, `drain`, `undrain`, `failover`) of `backend`.
    pub fn record(&self, pool: &str, backend: &str, kind: &str, detail: &str) {
        let mut events = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if events.len() >= MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(json!({
            "at_ms": unix_ms(),
            "pool": pool,
            "backend": backend,
            "kind": kind,
            "detail": detail,
        }));
    }

    /// Newest first.
    pub fn recent(&self) -> Vec<Value> {
        let events = self.0.lock().unwrap_or_else(|e| e.into_inner());
        events.iter().rev().cloned().collect()
    }
}

/// Wall-clock milliseconds, for the page's times.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the page shows, as JSON (cumulative counters; the page takes differences).
pub fn document(snapshot: &Snapshot, events: &Events) -> Value {
    let now = crate::outlier::now_ms();
    json!({
        "now_ms": unix_ms(),
        "serving": snapshot.serving(),
        "pools": snapshot.pools.iter().map(|p| json!({
            "name": p.config.name,
            "backends": p.backends.iter().map(|b| json!({
                "name": b.name,
                "address": b.address.to_string(),
                "healthy": b.healthy(),
                "draining": b.draining(),
                "ejected": b.outlier.ejected(now),
                "in_flight": b.active.load(Ordering::Relaxed),
                "streams": b.streams.load(Ordering::Relaxed),
                "requests": b.requests.load(Ordering::Relaxed),
                "errors": b.errors.load(Ordering::Relaxed),
                "answered": b.answered.load(Ordering::Relaxed),
                "latency_us": b.latency_us.load(Ordering::Relaxed),
                "last_error": b.last_error(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "events": events.recent(),
    })
}

/// The page. Everything it needs is inline; the data comes from `/status.json` (same origin).
pub const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mcp-proxy status</title>
<style>
body { font: 15px/1.4 system-ui, sans-serif; margin: 0; padding: 12px; background: #f6f7f9; color: #1d2330; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 18px 0 6px; }
#summary { color: #555; margin-bottom: 8px; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid #e3e6eb; }
th { font-size: 12px; text-transform: uppercase; color: #666; }
.state { font-weight: 600; padding: 1px 8px; border-radius: 10px; }
.up { background: #d9f5e0; color: #11642b; } .down { background: #fbdcdc; color: #8c1515; }
.draining, .ejected { background: #fff0c7; color: #7a5300; }
.err { color: #8c1515; } .muted { color: #777; font-size: 13px; }
ul { padding-left: 18px; background: #fff; margin: 0; } li { padding: 3px 0; }
@media (max-width: 640px) {
  thead { display: none; } table, tbody, tr, td { display: block; width: auto; }
  tr { margin-bottom: 10px; border: 1px solid #e3e6eb; border-radius: 6px; }
  td { border: 0; padding: 3px 10px; } td::before { content: attr(data-label) ": "; color: #666; }
}
</style>
</head>
<body>
<h1>mcp-proxy status</h1>
<div id="summary">loading...</div>
<div id="pools"></div>
<h2>Recent events</h2>
<ul id="events"><li class="muted">none yet</li></ul>
<script>
"use strict";
let previous = null;
const el = (tag, text, cls) => { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; };
function stateOf(b) {
  if (!b.healthy) return ["down", "down"];
  if (b.ejected) return ["ejected", "ejected"];
  if (b.draining) return [b.in_flight > 0 ? "draining" : "drained", "draining"];
  return ["up", "up"];
}
function render(doc) {
  const secs = previous ? Math.max((doc.now_ms - previous.now_ms) / 1000, 0.001) : null;
  const before = new Map();
  if (previous) for (const p of previous.pools) for (const b of p.backends) before.set(p.name + "/" + b.name, b);
  document.getElementById("summary").textContent =
    (doc.serving ? "serving" : "DEGRADED: a pool has no backend to serve") + " · updated " + new Date(doc.now_ms).toLocaleTimeString();
  const pools = document.getElementById("pools");
  pools.replaceChildren();
  for (const p of doc.pools) {
    pools.appendChild(el("h2", "Pool " + p.name));
    const table = el("table"); const head = el("thead"); const hr = el("tr");
    const cols = ["Backend", "State", "In flight", "Streams", "Req/s", "Errors", "Mean latency", "Last error"];
    for (const c of cols) hr.appendChild(el("th", c));
    head.appendChild(hr); table.appendChild(head);
    const body = el("tbody");
    for (const b of p.backends) {
      const old = before.get(p.name + "/" + b.name);
      const dr = old ? b.requests - old.requests : 0, de = old ? b.errors - old.errors : 0;
      const da = old ? b.answered - old.answered : 0, dl = old ? b.latency_us - old.latency_us : 0;
      const rate = secs && old ? (dr / secs).toFixed(1) : "-";
      const errors = old ? (dr > 0 ? (100 * de / dr).toFixed(1) + "%" : "0%") : "-";
      const latency = da > 0 ? (dl / da / 1000).toFixed(1) + " ms" : (b.answered > 0 ? (b.latency_us / b.answered / 1000).toFixed(1) + " ms (all time)" : "-");
      const [label, cls] = stateOf(b);
      const tr = el("tr"); tr.dataset.backend = b.name; tr.dataset.state = label;
      const cells = [[b.name + " (" + b.address + ")"], null, [String(b.in_flight)], [String(b.streams)], [rate], [errors, de > 0 ? "err" : ""], [latency], [b.last_error || "", "muted"]];
      cells.forEach((c, i) => {
        const td = el("td"); td.dataset.label = cols[i];
        if (c === null) td.appendChild(el("span", label, "state " + cls)); else { td.textContent = c[0]; if (c[1]) td.className = c[1]; }
        tr.appendChild(td);
      });
      body.appendChild(tr);
    }
    table.appendChild(body); pools.appendChild(table);
  }
  const events = document.getElementById("events");
  events.replaceChildren();
  if (doc.events.length === 0) events.appendChild(el("li", "none yet", "muted"));
  for (const e of doc.events)
    events.appendChild(el("li", new Date(e.at_ms).toLocaleTimeString() + " · " + e.pool + "/" + e.backend + " · " + e.kind + (e.detail ? " (" + e.detail + ")" : "")));
  previous = doc;
}
async function refresh() {
  try {
    const r = await fetch("status.json", { cache: "no-store" });
    if (r.ok) render(await r.json());
    else document.getElementById("summary").textContent = "status.json answered " + r.status;
  } catch (e) {
    document.getElementById("summary").textContent = "cannot reach the proxy: " + e;
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_bounded_and_newest_first() {
        let e = Events::default();
        for i in 0..(MAX_EVENTS + 10) {
            e.record("p", &format!("b{i}"), "down", "");
        }
        let recent = e.recent();
        assert_eq!(recent.len(), MAX_EVENTS);
        assert_eq!(recent[0]["backend"], format!("b{}", MAX_EVENTS + 9));
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for needle in ["http://", "https://", "src=", "href=", "@import"] {
            assert!(!PAGE.contains(needle), "{needle}");
        }
    }
}
