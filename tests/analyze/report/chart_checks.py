"""What a browser test can assert about every rendered chart, read from the live Vega views.

`CHART_FACTS` (run with page.evaluate) returns per chart: each continuous position scale's type,
domain and the range of the data it was built from; each colour scale's domain and the colours it
hands out; and the positions of the data marks (not axes, legends or titles) in the scenegraph.
`problems(fact)` turns one chart's facts into readable failures; an empty list means it passes.
"""

from __future__ import annotations

import math
from typing import Any

CHART_FACTS = r"""() => {
  const out = [];
  const isColour = v => typeof v === 'string' && /^(#[0-9a-f]{3,8}|rgb|hsl)/i.test(v);
  for (const [id, r] of Object.entries(window.moecapEmbeds)) {
    const view = r.view, spec = r.vgSpec;
    const scales = [];
    const collect = (node) => {
      for (const s of (node.scales || [])) scales.push(s);
      for (const m of (node.marks || [])) if (m.type === 'group') collect(m);
    };
    collect(spec);
    const facts = {id, slug: document.getElementById(id).closest('figure').dataset.slug, scales: [], colours: [], marks: []};
    for (const s of scales) {
      let live;
      try { live = view.scale(s.name); } catch (e) { live = null; }
      if (!live) continue;
      const dom = live.domain();
      const range = live.range ? live.range() : [];
      const rangeText = JSON.stringify(s.range || '');
      const positional = /"(width|height|childWidth|childHeight)"|^"(width|height)"$/.test(rangeText);
      if (['linear', 'log', 'pow', 'sqrt', 'symlog'].includes(live.type) && positional) {
        // The data behind the domain: {data, field} or {fields: [...]} or {data, fields}.
        const values = [];
        const d = s.domain || {};
        const sources = d.fields ? d.fields.map(f => typeof f === 'string' ? {data: d.data, field: f} : f) : (d.data ? [{data: d.data, field: d.field}] : []);
        for (const src of sources) {
          let rows = [];
          try { rows = view.data(src.data) || []; } catch (e) { rows = []; }
          const f = typeof src.field === 'string' ? src.field : (src.field && src.field.signal ? null : null);
          if (!f) continue;
          for (const row of rows) { const v = row[f]; if (typeof v === 'number' && isFinite(v)) values.push(v); }
        }
        facts.scales.push({name: s.name, type: live.type, domain: dom, explicit: Array.isArray(s.domain), dataMin: values.length ? Math.min(...values) : null, dataMax: values.length ? Math.max(...values) : null, n: values.length});
      } else if (live.type === 'ordinal' && range.length && isColour(range[0])) {
        facts.colours.push({name: s.name, domain: dom.map(String), colours: dom.map(v => live(v))});
      }
    }
    const walk = (node, depth) => {
      if (!node) return;
      if (node.marktype && node.role === 'mark' && node.items) {
        const name = node.name || '';
        if (['symbol', 'rect', 'line', 'area', 'trail'].includes(node.marktype)) {
          for (const it of node.items) {
            if (typeof it.x === 'number') facts.marks.push([node.marktype, it.x, it.y, it.x2 ?? (it.width != null ? it.x + it.width : null), it.y2 ?? (it.height != null ? it.y + it.height : null), name]);
          }
        }
      }
      for (const it of (node.items || [])) walk(it, depth + 1);
    };
    walk(view.scenegraph().root, 0);
    out.push(facts);
  }
  return out;
}"""


def problems(fact: dict[str, Any]) -> list[str]:
    """Failures of one chart: repeated colours within a colour scale, a negative axis where the data
    are non-negative, a log axis outside its data's decade, marks all at one position or at NaN."""
    found = []
    where = fact["slug"]
    for c in fact["colours"]:
        if len(set(c["colours"])) != len(c["domain"]):
            found.append(f"{where}: colour scale {c['name']} repeats colours over {len(c['domain'])} series")
    for s in fact["scales"]:
        lo, hi = s["domain"][0], s["domain"][-1]
        if s["n"] == 0 or s["dataMin"] is None:
            continue
        if s["dataMin"] >= 0 and lo < 0:
            found.append(f"{where}: {s['name']} axis starts at {lo} below 0 for non-negative data")
        if s["type"] == "log" and not (s["dataMin"] / 10.001 <= lo and hi <= s["dataMax"] * 10.001):
            found.append(
                f"{where}: log axis {s['name']} [{lo}, {hi}] beyond its data [{s['dataMin']}, {s['dataMax']}]"
            )
        if s["type"] != "log" and hi > max(s["dataMax"], 0) * 2.5 + 1e-9 and s["dataMax"] > 0:
            found.append(f"{where}: {s['name']} axis ends at {hi}, far beyond its data's max {s['dataMax']}")
    pts = [m for m in fact["marks"] if m[1] is not None]
    if not pts:
        found.append(f"{where}: no data marks drawn")
        return found
    if any(v is not None and isinstance(v, float) and math.isnan(v) for m in pts for v in m[1:5]):
        found.append(f"{where}: marks at NaN positions")
    xs = {round(v, 3) for m in pts for v in (m[1], m[3]) if v is not None}
    ys = {round(v, 3) for m in pts for v in (m[2], m[4]) if v is not None}
    if len(xs) < 2 or len(ys) < 2:
        found.append(f"{where}: every mark sits on one value (x {sorted(xs)[:3]}, y {sorted(ys)[:3]})")
    return found
