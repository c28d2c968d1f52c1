"""`arq-deploy report RUN`: one self-contained HTML page of everything a run directory holds.

It reads what the stages wrote (search summary and policy, export reports, certification summaries, robustness checks,
benchmarks; see docs/architecture.md), recognising each JSON file by its content, and embeds every PNG as a data URI,
so the page can be mailed or archived as one file. Files it does not recognise are listed, not dropped silently.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from pathlib import Path

from arq_deploy.core.errors import ArqError

SECTIONS = ("search", "export", "certification", "corruptions", "systematic", "attacks", "bench", "other")
TITLES = {"search": "Mixed-precision search", "export": "Export (QDQ ONNX vs torch)",
          "certification": "Randomized-smoothing certification", "corruptions": "Natural corruptions",
          "systematic": "Systematic noise", "attacks": "Adversarial attacks", "bench": "Latency, throughput, energy",
          "other": "Other results"}


def classify(obj) -> str | None:
    """Which stage wrote this JSON object (None: not a result file)."""
    if not isinstance(obj, dict):
        return None
    if obj.get("check") in ("corruptions", "systematic", "attacks"):
        return obj["check"]
    if isinstance(obj.get("summary"), dict) and "acr" in obj["summary"]:
        return "certification"
    if "validation" in obj and "policy_summary" in obj:
        return "export"
    if "best_reward" in obj:
        return "search"
    if obj.get("format") == "arq-bench" or ("latency" in obj and "throughput" in obj):
        return "bench"
    return None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        text = json.dumps(v, sort_keys=True)
        return text if len(text) <= 160 else text[:157] + "…"
    return str(v)


def _kv_table(d: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in d.items())
    return f"<table class='kv'>{rows}</table>"


def _rows_table(rows: list[dict], limit: int = 200) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and not isinstance(r[k], (dict, list))]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                   for r in rows[:limit])
    more = f"<p>… {len(rows) - limit} more rows in the JSON file</p>" if len(rows) > limit else ""
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def _render(kind: str, obj: dict) -> str:
    """The interesting part of a result file as HTML tables."""
    if kind == "certification":
        return _kv_table({k: v for k, v in obj["summary"].items() if k != "radii"}) + _kv_table(obj.get("meta", {}))
    if kind in ("corruptions", "systematic", "attacks"):
        parts = [_kv_table(obj.get("summary", {}))]
        if obj.get("rows"):
            parts.append(_rows_table(obj["rows"]))
        parts.append(_kv_table(obj.get("meta", {})))
        return "".join(parts)
    if kind == "export":
        keep = ("model", "policy_summary", "bops_fraction", "quantizer", "sigma", "calibration", "validation")
        return _kv_table({k: obj[k] for k in keep if k in obj})
    if kind == "bench":
        keep = ("model", "target", "runner", "latency", "throughput", "memory", "energy_j_per_inference", "host")
        return _kv_table({k: obj[k] for k in keep if k in obj})
    return _kv_table(obj)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(path.name)}'>"
            f"<figcaption>{html.escape(path.name)}</figcaption></figure>")


def collect(run: Path) -> tuple[dict[str, list[tuple[Path, dict]]], list[Path], list[Path]]:
    """({section: [(file, obj)]}, PNG files, unrecognised JSON files) under `run`, sorted by path."""
    found: dict[str, list[tuple[Path, dict]]] = {s: [] for s in SECTIONS}
    unknown = []
    for p in sorted(run.rglob("*.json")):
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            unknown.append(p)
            continue
        kind = classify(obj)
        if kind is None:
            unknown.append(p)
        else:
            found[kind].append((p, obj))
    pngs = sorted(run.rglob("*.png"))
    return found, pngs, unknown


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.85em}td,th{border:1px solid #ccc;padding:2px 6px;
text-align:left;vertical-align:top}table.kv th{background:#f4f4f4}figure{display:inline-block;margin:.5em}
img{max-width:560px}h2{border-bottom:2px solid #444}h3{font-size:1em;font-family:monospace}"""


def build_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN/report.html (or `out`) atomically; returns its path."""
    from arq_deploy.core.fileio import write_text

    run = Path(run)
    if not run.is_dir():
        raise ArqError(f"{run} is not a run directory")
    out = Path(out) if out else run / "report.html"
    found, pngs, unknown = collect(run)
    if not any(found.values()) and not pngs:
        raise ArqError(f"{run} holds no results of arq-deploy (search, export, certify, check or bench output)")
    used: set[Path] = set()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>arq-deploy report: {html.escape(run.name)}"
             f"</title><style>{CSS}</style></head><body><h1>arq-deploy report: {html.escape(run.name)}</h1>"
             f"<p>{html.escape(str(run.resolve()))}, written "
             f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}</p>"]
    for kind in SECTIONS:
        if not found[kind]:
            continue
        parts.append(f"<h2>{TITLES[kind]}</h2>")
        for p, obj in found[kind]:
            rel = p.relative_to(run)
            parts.append(f"<h3>{html.escape(str(rel))}</h3>{_render(kind, obj)}")
            figs = [q for q in pngs if q.parent == p.parent and (q.stem.startswith(p.stem.split('.')[0])
                                                                   or p.stem.startswith(q.stem))]
            parts.extend(_img(q) for q in figs if q not in used)
            used.update(figs)
    rest = [q for q in pngs if q not in used]
    if rest:
        parts.append("<h2>Plots</h2>" + "".join(_img(q) for q in rest))
    if unknown:
        parts.append("<h2>Other files</h2><ul>" + "".join(f"<li>{html.escape(str(p.relative_to(run)))}</li>"
                                                           for p in unknown) + "</ul>")
    parts.append("</body></html>")
    write_text(out, "\n".join(parts))
    return out
