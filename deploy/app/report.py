"""`arq-deploy report RUN`: one self-contained HTML page of everything a run directory holds.

It reads what the stages wrote (see docs/architecture.md), recognising each JSON file by its content: export reports
(`*.export.json`), certification summaries (`*.summary.json`) and their TSV logs, benchmarks (`arq-deploy bench`),
robustness checks (`corruptions.json`, `systematic.json`, `attacks.json`), a search run (`summary.json`,
`search.jsonl`, `manifest.json`), compiled artifacts' `manifest.json` and the demo's `demo.json`.

The page opens with a summary of the run (headline cards, then one row per deployed model: policy, BOPs, target and
backend, certified accuracy per radius, ACR, latency, throughput; and one row per checked model: clean against worst
corruption, ACC_s, WCAR), followed by one section per kind of result. Numbers are formatted for reading (accuracies as
percentages with one decimal, ACR with three, milliseconds with three significant digits) and nested objects are
small tables, never raw JSON. Every PNG is embedded as a data URI, as are the plots the report draws itself (the
certified-accuracy curves of all runs together, BOPs against measured latency, the search's reward per episode when
its PNG is missing), so the page can be mailed or archived as one file. Files it does not use are listed at the end.

A small inline script marks any image that fails to load (a visible note, and `data-natural-width` on every image) and
records script errors in `data-page-errors` on <html>, so a browser check (tests/test_report.py) can read both.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from arq_deploy.core.errors import ArqError

CHECKS = ("corruptions", "systematic", "attacks")


def classify(obj) -> str | None:
    """Which stage wrote this JSON object (None: not a result file this report reads)."""
    if not isinstance(obj, dict):
        return None
    if obj.get("check") in CHECKS:
        return obj["check"]
    if isinstance(obj.get("summary"), dict) and "acr" in obj["summary"]:
        return "certification"
    if "validation" in obj and "policy_summary" in obj:
        return "export"
    if "best_reward" in obj:
        return "search"
    if obj.get("format") in ("arq-deploy/bench", "arq-bench") or ("latency" in obj and "throughput" in obj):
        return "bench"
    if obj.get("format") == "arq-artifact" and isinstance(obj.get("arq"), dict):
        return "artifact"
    if obj.get("format") == "arq-deploy/search":
        return "search-manifest"
    if isinstance(obj.get("rows"), list) and "certified_inputs" in obj:
        return "demo"
    return None


# --------------------------------------------------------------------------------------------------- formatting
def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pct(v, digits: int = 1) -> str:
    """0.4166… -> '41.7%'."""
    return f"{100 * v:.{digits}f}%" if _finite(v) else "–"


def sig(v, n: int = 3) -> str:
    """`n` significant digits without an exponent: 0.029618… -> '0.0296', 177.3 -> '177', 1234.5 -> '1235'."""
    if not _finite(v):
        return "–"
    if v == 0:
        return "0"
    decimals = max(0, n - 1 - math.floor(math.log10(abs(v))))
    return f"{v:,.{decimals}f}"


def ms(v) -> str:
    return f"{sig(v)} ms" if _finite(v) else "–"


def rate(v) -> str:
    return f"{v:,.0f}/s" if _finite(v) else "–"


def bops_pct(fraction) -> str:
    """A BOPs fraction of W32A32 as a percentage with 3 significant digits (budgets like 0.538% keep their digits)."""
    return f"{_trim(sig(100 * fraction))}%" if _finite(fraction) else "–"


def num(v) -> str:
    """Any number, readable: integers with separators, floats with 4 significant digits, tiny ones as 1.2e-05."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if not math.isfinite(v):
        return "–"
    if v == int(v) and abs(v) < 1e15:
        return num(int(v))
    if abs(v) >= 1e-3:
        return _trim(sig(v, 4))
    return f"{v:.2e}"


def _trim(text: str) -> str:
    """'0.2500' -> '0.25', '5.00' -> '5'."""
    return text.rstrip("0").rstrip(".") if "." in text else text


_PCT_WORDS = ("acc", "agreement", "rate", "fraction", "wcar", "union", "mnr", "drop", "frac_")


def fmt_key(key: str, v) -> str:
    """A value formatted by what its key says it is (accuracies as %, ACR, ms, images/s), else `num`."""
    k = str(key).lower()
    if _finite(v) and not isinstance(v, int):
        if "bops_fraction" in k:
            return bops_pct(v)
        if k == "acr":
            return f"{v:.3f}"
        if k.endswith("_ms"):
            return ms(v)
        if "images_per_s" in k:
            return rate(v)
        if any(w in k for w in _PCT_WORDS) and 0.0 <= v <= 1.0:
            return pct(v)
        if k.endswith(("seconds", "_s", "seconds_per_input")):
            return f"{sig(v)} s"
    if isinstance(v, str) and "sha256" in k and len(v) > 16:
        return v[:12] + "…"
    return num(v) if isinstance(v, (int, float)) else str(v)


LABELS = {"acr": "ACR", "mnr": "mNR", "mce": "mCE", "relative_mce": "relative mCE", "acc_s": "ACC_s",
          "bops": "BOPs", "bops_fraction": "BOPs of W32A32"}


def pretty(key) -> str:
    return LABELS.get(str(key), str(key).replace("_", " "))


def value_html(key, v, depth: int = 0) -> str:
    """One value as HTML: a scalar formatted by `fmt_key`, a dict as a small table, a list as a list or a table."""
    if v is None or v == "":
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, dict):
        if not v:
            return "–"
        if depth >= 3:
            return _e(", ".join(f"{pretty(k)}: {fmt_key(k, x)}" for k, x in v.items() if not isinstance(x, (dict, list))))
        return kv_table(v, depth + 1, cls="kv small")
    if isinstance(v, list):
        if v and all(isinstance(x, dict) for x in v):
            return rows_table(v, limit=20, cls="small")
        items = [fmt_key(key, x) if not isinstance(x, (dict, list)) else value_html(key, x, depth + 1) for x in v[:16]]
        more = f" … ({len(v)} in all)" if len(v) > 16 else ""
        return _e(", ".join(items)) + more if all(not isinstance(x, (dict, list)) for x in v) else " ".join(items)
    return _e(fmt_key(key, v))


def kv_table(d: dict, depth: int = 0, cls: str = "kv", skip=()) -> str:
    rows = "".join(f"<tr><th>{_e(pretty(k))}</th><td>{value_html(k, v, depth)}</td></tr>"
                   for k, v in d.items() if k not in skip)
    return f"<table class='{cls}'>{rows}</table>"


def rows_table(rows: list[dict], limit: int = 200, cls: str = "", cols: list[str] | None = None) -> str:
    if cols is None:
        cols = []
        for r in rows:
            cols += [k for k in r if k not in cols and k != "key"]
    head = "".join(f"<th>{_e(pretty(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(_td(value_html(c, r.get(c), 2), r.get(c)) for c in cols) + "</tr>"
                   for r in rows[:limit])
    more = f"<p class='note'>… {len(rows) - limit} more rows in the file</p>" if len(rows) > limit else ""
    return f"<table class='{cls}'><tr>{head}</tr>{body}</table>{more}"


def _td(inner: str, raw=None) -> str:
    numeric = isinstance(raw, (int, float)) and not isinstance(raw, bool)
    return f"<td class='num'>{inner}</td>" if numeric else f"<td>{inner}</td>"


def table(headers: list[str], rows: list[list[str]], cls: str = "", numeric_from: int = 1, text_cols=()) -> str:
    """A table of already-rendered cells; columns from `numeric_from` on, except `text_cols`, are right-aligned."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td class='num'>{c}</td>" if i >= numeric_from and i not in text_cols
                                    else f"<td>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table class='{cls}'><tr>{head}</tr>{body}</table>"


# --------------------------------------------------------------------------------------------------- reading
def _read_json(p: Path):
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _radius_key(k) -> float | None:
    try:
        return float(k)
    except (TypeError, ValueError):
        return None


@dataclass
class CertRun:
    """One certification run: from its `*.summary.json`, or summarised from its TSV log when there is none."""

    label: str
    source: Path  # the summary JSON, or the TSV log
    meta: dict
    summary: dict
    radii_correct: list[tuple[float, bool]] | None = None  # per input (radius, correct), from the TSV log
    png: Path | None = None

    @property
    def certified(self) -> dict[float, float]:
        out = {}
        for k, v in (self.summary.get("certified_accuracy") or {}).items():
            r = _radius_key(k)
            if r is not None and _finite(v):
                out[r] = float(v)
        return dict(sorted(out.items()))


def read_cert_log(path: Path) -> tuple[dict, list[dict]] | None:
    """(meta, rows) of a certification TSV log ('# {meta}', a column line with radius and correct, then rows),
    read without touching the file; None when it is not one. A partial last line is ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    lines = text.split("\n")
    if len(lines) < 2 or not lines[0].startswith("# "):
        return None
    try:
        meta = json.loads(lines[0][2:])
    except ValueError:
        return None
    cols = lines[1].split("\t")
    if not isinstance(meta, dict) or not {"radius", "correct"} <= set(cols):
        return None
    rows = []
    for line in lines[2:-1] if not text.endswith("\n") else lines[2:]:
        parts = line.split("\t")
        if len(parts) != len(cols):
            continue
        rows.append(dict(zip(cols, parts)))
    return meta, rows


@dataclass(frozen=True)
class _Cert:
    """What `summarize` reads of a certificate."""

    correct: bool
    radius: float
    prediction: int
    seconds: float


def _summary_from_rows(rows: list[dict]) -> tuple[dict, list[tuple[float, bool]]]:
    from arq_deploy.certify.stats import summarize

    certs = []
    for r in rows:
        try:
            certs.append(_Cert(r["correct"].strip() in ("1", "True", "true"), float(r["radius"]),
                               int(r.get("predict", "0")), float(r.get("time", "0") or 0)))
        except ValueError:
            continue
    if not certs:
        return {}, []
    return summarize(certs).to_dict(), [(c.radius, c.correct) for c in certs]


@dataclass
class Run:
    """What a run directory holds, sorted by path."""

    root: Path
    exports: list = field(default_factory=list)
    certs: list = field(default_factory=list)
    benches: list = field(default_factory=list)
    checks: dict = field(default_factory=lambda: {c: [] for c in CHECKS})
    searches: list = field(default_factory=list)  # (dir, summary dict or {}, rows, manifest or {})
    demos: list = field(default_factory=list)
    artifacts: list = field(default_factory=list)
    pngs: list = field(default_factory=list)
    unused: list = field(default_factory=list)
    used_pngs: set = field(default_factory=set)

    def rel(self, p: Path) -> str:
        try:
            return str(p.relative_to(self.root))
        except ValueError:
            return str(p)

    def empty(self) -> bool:
        return not (self.exports or self.certs or self.benches or any(self.checks.values()) or self.searches
                    or self.demos or self.pngs)


def collect(root: Path) -> Run:
    run = Run(root)
    search_dirs: dict[Path, dict] = {}
    for p in sorted(root.rglob("*.jsonl")):
        if p.name == "search.jsonl":
            search_dirs.setdefault(p.parent, {})["rows"] = p
    for p in sorted(root.rglob("*.json")):
        obj = _read_json(p)
        kind = classify(obj) if not p.name.endswith(".config.json") else None
        if kind == "certification":
            tsv = read_cert_log(p.with_name(p.name[: -len(".summary.json")] + ".tsv")) \
                if p.name.endswith(".summary.json") else None
            curve = _summary_from_rows(tsv[1])[1] if tsv else None
            png = p.with_name(p.name[: -len(".summary.json")] + ".png") if p.name.endswith(".summary.json") else None
            run.certs.append(CertRun(_cert_label(obj.get("meta", {}), p), p, obj.get("meta", {}),
                                     obj["summary"], curve, png if png and png.exists() else None))
        elif kind == "export":
            run.exports.append((p, obj))
        elif kind == "bench":
            run.benches.append((p, obj))
        elif kind in CHECKS:
            run.checks[kind].append((p, obj))
        elif kind == "search":
            search_dirs.setdefault(p.parent, {})["summary"] = obj
        elif kind == "search-manifest":
            search_dirs.setdefault(p.parent, {})["manifest"] = obj
        elif kind == "demo":
            run.demos.append((p, obj))
        elif kind == "artifact":
            run.artifacts.append((p, obj))
        elif not (p.name in ("policy.json", "float.json") and p.parent in search_dirs):
            run.unused.append(p)
    summarised = {c.source.with_name(c.source.name[: -len(".summary.json")] + ".tsv") for c in run.certs}
    for p in sorted(root.rglob("*.tsv")):
        if p in summarised or p.parent in search_dirs:  # a search's float-cert.tsv is its reward cache
            continue
        log = read_cert_log(p)
        if log is None:
            run.unused.append(p)
            continue
        summary, curve = _summary_from_rows(log[1])
        if summary:
            png = p.with_suffix(".png")
            run.certs.append(CertRun(_cert_label(log[0], p), p, log[0], summary, curve,
                                     png if png.exists() else None))
    for d, parts in sorted(search_dirs.items()):
        rows = []
        if "rows" in parts:
            for line in parts["rows"].read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
        if parts.get("summary") or rows:
            run.searches.append((d, parts.get("summary", {}), rows, parts.get("manifest", {})))
    run.pngs = sorted(root.rglob("*.png"))
    return run


def _is_path(s: str, meta: dict | None = None) -> bool:
    """Whether a result's "model" names a file or an artifact directory (the certify stage always writes the model's
    sha256 beside it), not a label such as the demo's "W8A8/tvm"."""
    if meta is not None and "model_sha256" in meta:
        return True
    return s.startswith(("/", ".")) or s.endswith((".onnx", ".pt", ".th", ".pt2")) or Path(s).exists()


def _cert_label(meta: dict, p: Path) -> str:
    model = str(meta.get("model") or "")
    if model and not _is_path(model, meta):
        return model  # the demo's "W8A8/tvm"
    name = Path(model).name if model else p.name.split(".")[0]
    return f"{name} · {meta['backend']}" if meta.get("backend") else name


# --------------------------------------------------------------------------------------------------- model identity
class Models:
    """What the export reports and artifact manifests say about each model file (model, policy, BOPs fraction, base
    accuracy), found by the path other results name it by: the whole path first, else its file or folder name (the
    run directory may have moved, or the stage was run with relative paths from elsewhere)."""

    def __init__(self, run: Run):
        self.by_path: dict[str, dict] = {}
        self.by_name: dict[str, list[dict]] = {}
        for p, obj in run.exports:
            v = obj.get("validation") or {}
            info = {"model": obj.get("model"), "policy": obj.get("policy_summary"),
                    "bops_fraction": obj.get("bops_fraction"), "sigma": obj.get("sigma"),
                    "accuracy": v.get("accuracy_candidate"), "file": Path(str(obj.get("onnx") or p)).name}
            self._add(str(obj.get("onnx") or p.with_suffix("").with_suffix(".onnx")), info)
        for p, obj in run.artifacts:
            arq = obj["arq"]
            src = (obj.get("source") or {}).get("file")
            base = self.find(src) if src else {}
            info = {**base, "model": arq.get("model"), "policy": arq.get("policy_summary"),
                    "bops_fraction": arq.get("bops_fraction"), "target": (obj.get("target") or {}).get("name"),
                    "file": p.parent.name + "/"}
            self._add(str(p.parent), info)

    def _add(self, path: str, info: dict) -> None:
        self.by_path[_norm(path)] = info
        self.by_name.setdefault(Path(path).name, []).append(info)

    def find(self, path) -> dict:
        if not path:
            return {}
        hit = self.by_path.get(_norm(str(path)))
        if hit:
            return hit
        same = self.by_name.get(Path(str(path)).name, [])
        return same[0] if len(same) == 1 else {}


def _norm(p: str) -> str:
    try:
        return str(Path(p).resolve())
    except OSError:
        return p


# --------------------------------------------------------------------------------------------------- deployments
@dataclass
class Deployment:
    """One model on one backend and target: the summary table's row."""

    key: str
    backend: str | None = None
    target: str | None = None
    model: str | None = None
    file: str | None = None
    policy: str | None = None
    policy_detail: str | None = None
    bops_fraction: float | None = None
    accuracy: float | None = None  # the base (not smoothed) classifier's clean accuracy
    certified: dict = field(default_factory=dict)
    acr: float | None = None
    cert_count: int | None = None
    latency_ms: float | None = None
    throughput: float | None = None
    throughput_batch: int | None = None

    def matches(self, key, backend, target) -> bool:
        return self.key == key and all(a is None or b is None or a == b
                                       for a, b in ((self.backend, backend), (self.target, target)))


def deployments(run: Run, models: Models) -> list[Deployment]:
    out: list[Deployment] = []

    def get(key, backend, target) -> Deployment:
        for d in out:
            if d.matches(key, backend, target):
                d.backend, d.target = d.backend or backend, d.target or target
                return d
        d = Deployment(key, backend, target)
        out.append(d)
        return d

    export_models = {o.get("model") for _, o in run.exports if o.get("model")}
    for _, demo in run.demos:
        by_policy = {Path(str(o.get("onnx", ""))).stem.split(".")[-1]: o for _, o in run.exports}
        for r in demo.get("rows", []):
            if not isinstance(r, dict):
                continue
            pol, be = str(r.get("policy", "?")), str(r.get("backend", "?"))
            d = get(f"{pol}/{be}", be, None)
            exp = by_policy.get(pol, {})
            d.model = d.model or (exp.get("model") or (next(iter(export_models)) if len(export_models) == 1
                                                       else None))
            d.policy = pol
            if exp.get("policy_summary") and exp["policy_summary"] != pol:
                d.policy_detail = exp["policy_summary"]
            d.file = exp and Path(str(exp.get("onnx", ""))).name or None
            if _finite(r.get("bops_pct")):
                d.bops_fraction = r["bops_pct"] / 100
            d.accuracy = r.get("clean_acc")
            d.certified = {r_: a for r_, a in ((_radius_key(k), v) for k, v in (r.get("certified_acc") or {}).items())
                           if r_ is not None}
            d.acr = r.get("acr")
            d.cert_count = demo.get("certified_inputs")
            d.latency_ms = r.get("latency_ms_b1")
            d.throughput, d.throughput_batch = r.get("images_per_s_b100"), 100
    for c in run.certs:
        model = str(c.meta.get("model") or "")
        is_path = _is_path(model, c.meta)
        key = _norm(model) if is_path else model or c.label
        d = get(key, c.meta.get("backend"), c.meta.get("target"))
        _fill_model(d, models.find(model) if is_path else {}, model if is_path else "")
        d.certified = c.certified or d.certified
        d.acr = c.summary.get("acr", d.acr)
        d.cert_count = c.summary.get("count", d.cert_count)
    for p, b in run.benches:
        model = str(b.get("model") or p.name)
        d = get(_norm(model), b.get("runner"), b.get("target"))
        _fill_model(d, models.find(model), model)
        lat, thr = b.get("latency") or {}, b.get("throughput") or {}
        d.latency_ms = lat.get("p50_ms")
        d.throughput, d.throughput_batch = thr.get("images_per_s"), thr.get("batch")
    return sorted(out, key=lambda d: -d.bops_fraction if _finite(d.bops_fraction) else 1.0)  # most BOPs first


def _fill_model(d: Deployment, info: dict, path: str) -> None:
    d.model = d.model or info.get("model")
    d.policy = d.policy or info.get("policy")
    d.bops_fraction = d.bops_fraction if d.bops_fraction is not None else info.get("bops_fraction")
    d.accuracy = d.accuracy if d.accuracy is not None else info.get("accuracy")
    d.target = d.target or info.get("target")
    if _is_path(path):
        d.file = d.file or info.get("file") or Path(path).name


# --------------------------------------------------------------------------------------------------- plots
def _figure(w: float = 6.4, h: float = 3.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


_STYLES = ("-", "--", ":", "-.")


def plot_cert_curves(certs: list[CertRun]) -> bytes | None:
    """Certified accuracy against L2 radius of every certification run on one plot (step curves from the TSV logs,
    points at the summarised radii otherwise)."""
    import numpy as np

    if len(certs) < 2:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    top = max([r for c in certs for r, ok in (c.radii_correct or []) if ok]
              + [r for c in certs for r, a in c.certified.items() if a > 0] + [0.5]) * 1.1
    for i, c in enumerate(certs):
        style = {"ls": _STYLES[(i // 10) % len(_STYLES)], "lw": 1.6, "label": c.label}
        if c.radii_correct:
            radii = np.linspace(0, top, 400)
            correct = np.array([r for r, ok in c.radii_correct if ok])
            acc = (correct[None, :] >= radii[:, None]).sum(axis=1) / len(c.radii_correct)
            ax.step(radii, acc, where="post", **style)
        elif c.certified:
            ax.plot(list(c.certified), list(c.certified.values()), marker="o", **style)
    ax.set(xlabel="L2 radius", ylabel="certified accuracy", ylim=(0, 1.03), xlim=(0, top),
           title="certified accuracy of every certification run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return _png(fig)


def plot_bops_latency(deps: list[Deployment]) -> bytes | None:
    pts = [d for d in deps if _finite(d.bops_fraction) and _finite(d.latency_ms)]
    if len(pts) < 2:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    backends = list(dict.fromkeys(d.backend or "?" for d in pts))
    markers = "osD^v<>p*h"
    for i, be in enumerate(backends):
        sel = [d for d in pts if (d.backend or "?") == be]
        ax.scatter([100 * d.bops_fraction for d in sel], [d.latency_ms for d in sel], marker=markers[i % 10], s=40,
                   label=be, zorder=3)
        for d in sel:
            ax.annotate(d.policy or d.file or d.key, (100 * d.bops_fraction, d.latency_ms), fontsize=7,
                        textcoords="offset points", xytext=(5, 3))
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for axis, vals in ((ax.xaxis, [100 * d.bops_fraction for d in pts]), (ax.yaxis, [d.latency_ms for d in pts])):
        if max(vals) / max(min(vals), 1e-12) > 10:
            (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("log")
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="BOPs, % of W32A32", ylabel="latency p50 at batch 1 (ms)", title="BOPs against measured latency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, title="backend", title_fontsize=8)
    return _png(fig)


def plot_rewards(rows: list[dict]) -> bytes | None:
    import numpy as np

    rewards = np.array([r["reward"] for r in rows if _finite(r.get("reward"))], dtype=float)
    if len(rewards) == 0:
        return None
    fig = _figure(6.4, 3.2)
    ax = fig.add_subplot()
    ax.plot(rewards, ".", ms=4, alpha=0.7, label="episode reward")
    ax.plot(np.maximum.accumulate(rewards), "-", label="best so far")
    ax.set(xlabel="episode", ylabel="reward", title="search reward per episode")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def img_data(data: bytes, alt: str, caption: str = "", cls: str = "") -> str:
    b64 = base64.b64encode(data).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return (f"<figure class='{cls}'><img src='data:image/png;base64,{b64}' alt='{_e(alt)}' "
            f"onerror=\"this.setAttribute('data-failed','1')\">{cap}</figure>")


def img_file(run: Run, path: Path, cls: str = "thumb") -> str:
    run.used_pngs.add(path)
    return img_data(path.read_bytes(), path.name, run.rel(path), cls)


# --------------------------------------------------------------------------------------------------- sections
def _radii(deps_or_certs, trim: bool = False) -> list[float]:
    """The radii any of them was summarised at; `trim`: only up to the first one at which all are 0."""
    rs = sorted({r for x in deps_or_certs for r in x.certified})
    if trim:
        zero = [r for r in rs if all(not x.certified.get(r) for x in deps_or_certs)]
        rs = [r for r in rs if not zero or r <= zero[0]]
    return rs


def _model_cell(d: Deployment) -> str:
    name = _e(d.model or "–")
    sub = f"<div class='sub'>{_e(d.file)}</div>" if d.file else ""
    return name + sub


def _policy_cell(policy, detail=None) -> str:
    if not policy:
        return "–"
    return _e(policy) + (f"<div class='sub'>{_e(detail)}</div>" if detail else "")


def _target_cell(target, backend) -> str:
    if target and backend:
        return f"{_e(target)} / {_e(backend)}"
    return _e(target or backend or "–")


def summary_table(deps: list[Deployment]) -> str:
    radii = _radii(deps, trim=True)
    headers = ["model", "policy", "BOPs<div class='sub'>% of W32A32</div>", "target / backend",
               "clean acc<div class='sub'>base model</div>",
               *[f"cert. acc<div class='sub'>r = {r:g}</div>" for r in radii], "ACR",
               "latency<div class='sub'>p50, batch 1</div>", "throughput<div class='sub'>images/s</div>"]
    rows = []
    for d in deps:
        thr = rate(d.throughput) + (f"<div class='sub'>batch {d.throughput_batch}</div>"
                                    if d.throughput_batch and _finite(d.throughput) else "")
        rows.append([_model_cell(d), _policy_cell(d.policy, d.policy_detail), bops_pct(d.bops_fraction),
                     _target_cell(d.target, d.backend), pct(d.accuracy),
                     *[pct(d.certified.get(r)) for r in radii], f"{d.acr:.3f}" if _finite(d.acr) else "–",
                     ms(d.latency_ms), thr])
    return table(headers, rows, cls="summary", numeric_from=2, text_cols={3})


def robustness_rows(run: Run) -> list[dict]:
    """One entry per checked model: its headline numbers from corruptions, systematic and attacks."""
    by_model: dict[str, dict] = {}
    for kind in CHECKS:
        for p, obj in run.checks[kind]:
            meta = obj.get("meta") or {}
            name = str(meta.get("artifact") or p.parent)
            e = by_model.setdefault(name, {"artifact": Path(name).name or name, "policy": meta.get("policy"),
                                           "backend": meta.get("backend"), "target": meta.get("target"),
                                           "images": meta.get("images")})
            s = obj.get("summary") or {}
            if kind == "corruptions":
                rows = [r for r in obj.get("rows", []) if _finite(r.get("accuracy"))]
                e["clean"] = s.get("clean_accuracy", e.get("clean"))
                if rows:
                    w = min(rows, key=lambda r: r["accuracy"])
                    e["worst_corruption"] = (f"{w.get('corruption')} s{w.get('severity')}", w["accuracy"])
                e["mean_corruption"] = s.get("mean_corruption_accuracy")
                e["mnr"], e["mce"] = s.get("mnr"), s.get("mce")
            elif kind == "systematic":
                e["acc_s"] = s.get("acc_s")
                e.setdefault("clean", s.get("reference_accuracy"))
                if s.get("worst") is not None:
                    e["worst_systematic"] = (s["worst"], s.get("worst_accuracy"))
            else:
                clean = s.get("clean") or {}
                e.setdefault("clean", clean.get("runner_accuracy"))
                e["wcar"] = {k: v.get("runner") for k, v in (s.get("wcar") or {}).items() if isinstance(v, dict)}
                e["trusted"] = s.get("trusted")
    return list(by_model.values())


def robustness_table(entries: list[dict]) -> str:
    eps = list(dict.fromkeys(k for e in entries for k in (e.get("wcar") or {})))
    headers = ["checked model", "clean acc", "worst corruption", "mean corruption acc", "mNR", "ACC<sub>s</sub>",
               "worst systematic", *[f"WCAR<div class='sub'>ε = {_e(k)}</div>" for k in eps]]
    if any("mce" in e and e["mce"] is not None for e in entries):
        headers.insert(5, "mCE")
    rows = []
    for e in entries:
        facts = [e.get("policy"), e.get("target"), e.get("backend"),
                 f"{e['images']} images" if e.get("images") else None]
        who = f"{_e(e['artifact'])}<div class='sub'>{_e(' · '.join(str(x) for x in facts if x))}</div>"
        wc = e.get("worst_corruption")
        ws = e.get("worst_systematic")
        row = [who, pct(e.get("clean")),
               f"{pct(wc[1])}<div class='sub'>{_e(wc[0])}</div>" if wc else "–",
               pct(e.get("mean_corruption")), pct(e.get("mnr")),
               pct(e.get("acc_s")), f"{pct(ws[1])}<div class='sub'>{_e(ws[0])}</div>" if ws else "–"]
        trusted = e.get("trusted")
        row += [pct((e.get("wcar") or {}).get(k)) + ("" if trusted is None or (e.get("wcar") or {}).get(k) is None
                                                      else "<div class='sub'>trusted</div>" if trusted
                                                      else "<div class='sub warn'>masking check failed</div>")
                for k in eps]
        if "mCE" in headers:
            row.insert(5, num(e["mce"]) if _finite(e.get("mce")) else "–")
        rows.append(row)
    return table(headers, rows, cls="summary")


def cards(run: Run, deps: list[Deployment], robust: list[dict]) -> str:
    out = []

    def card(title, value, caption=""):
        out.append(f"<div class='card'><div class='ct'>{_e(title)}</div><div class='cv'>{value}</div>"
                   f"<div class='cc'>{caption}</div></div>")

    models = list(dict.fromkeys(d.model for d in deps if d.model)) or \
        list(dict.fromkeys(o.get("model") for _, o in run.exports if o.get("model")))
    sigmas = sorted({float(c.meta["sigma"]) for c in run.certs if _finite(c.meta.get("sigma"))}
                    | {float(o["sigma"]) for _, o in run.demos if _finite(o.get("sigma"))})
    if models:
        card("model", _e(", ".join(models)), _e(f"σ = {', '.join(f'{s:g}' for s in sigmas)}") if sigmas else "")
    pols = [d for d in deps if _finite(d.bops_fraction)]
    if pols:
        low = min(pols, key=lambda d: d.bops_fraction)
        names = list(dict.fromkeys(d.policy for d in deps if d.policy))
        card("lowest BOPs", bops_pct(low.bops_fraction),
             f"of W32A32: {_e(low.policy or low.key)}" + (f"; policies: {_e(', '.join(names))}" if len(names) > 1
                                                         else ""))
    certd = [d for d in deps if _finite(d.acr)]
    if certd:
        best = max(certd, key=lambda d: d.acr)
        top_r = max((r for r in best.certified if best.certified[r] > 0), default=None)
        extra = f"; cert. acc {pct(best.certified[top_r])} at r = {top_r:g}" if top_r else ""
        card("best ACR", f"{best.acr:.3f}", _e(f"{_label(best)}{extra}"))
    timed = [d for d in deps if _finite(d.latency_ms)]
    if timed:
        fast = min(timed, key=lambda d: d.latency_ms)
        card("lowest latency", ms(fast.latency_ms), _e(f"p50 at batch 1: {_label(fast)}"))
        thr = [d for d in deps if _finite(d.throughput)]
        if thr:
            hi = max(thr, key=lambda d: d.throughput)
            card("highest throughput", rate(hi.throughput).replace("/s", ""),
                 _e(f"images/s at batch {hi.throughput_batch}: {_label(hi)}"))
    for e in robust:
        if e.get("worst_corruption") and _finite(e.get("clean")):
            card("clean → worst corruption", f"{pct(e['clean'])} → {pct(e['worst_corruption'][1])}",
                 _e(f"{e['worst_corruption'][0]}, {e['artifact']}"))
        if _finite(e.get("acc_s")):
            card("ACC_s (systematic noise)", pct(e["acc_s"]),
                 _e(f"worst {e['worst_systematic'][0]}: {pct(e['worst_systematic'][1])}")
                 if e.get("worst_systematic") else "")
        if e.get("wcar"):
            k, v = list(e["wcar"].items())[-1]
            card(f"WCAR at ε = {k}", pct(v), "deployed model, " + ("trusted" if e.get("trusted")
                                                                 else "gradient-masking check failed"))
    for d, s, rows, _ in run.searches:
        best = s.get("best_reward", max((r.get("reward") for r in rows if _finite(r.get("reward"))), default=None))
        frac = s.get("best_bops_fraction")
        card("search: best reward", f"{best:.3f}" if _finite(best) else "–",
             _e(f"at {bops_pct(frac)} of W32A32 BOPs, " if _finite(frac) else "")
             + _e(f"{s.get('episodes', len(rows))} episodes ({run.rel(d)})"))
    return f"<div class='cards'>{''.join(out)}</div>" if out else ""


def _label(d: Deployment) -> str:
    if d.policy and d.backend:
        return f"{d.policy} on {d.backend}"
    return d.file or d.key


def certification_section(run: Run) -> str:
    certs = run.certs
    radii = _radii(certs)
    headers = ["run", "σ", "N0 / N / α", "inputs", *[f"cert. acc<div class='sub'>r = {r:g}</div>" for r in radii],
               "ACR", "abstain", "time / input"]
    rows = []
    for c in certs:
        m, s = c.meta, c.summary
        where = " / ".join(str(x) for x in (m.get("target"), m.get("backend")) if x)
        n_txt = " / ".join(num(m[k]) if k in m else "–" for k in ("n0", "n", "alpha"))
        sub = _e(run.rel(c.source)) + (" · " + _e(where) if where else "")
        rows.append([f"{_e(c.label)}<div class='sub'>{sub}</div>", num(m["sigma"]) if _finite(m.get("sigma")) else "–", _e(n_txt),
                     num(s.get("count")) if s.get("count") is not None else "–",
                     *[pct(c.certified.get(r)) for r in radii], f"{s['acr']:.3f}" if _finite(s.get("acr")) else "–",
                     pct(s.get("abstain_rate")), f"{sig(s['seconds_per_input'])} s"
                     if _finite(s.get("seconds_per_input")) else "–"])
    parts = [table(headers, rows, numeric_from=1)]
    irs = [c for c in certs if isinstance(c.meta.get("cost"), dict)]
    for c in irs:
        parts.append(f"<h4>{_e(c.label)}: incremental smoothing cost</h4>{kv_table(c.meta['cost'])}")
    combined = plot_cert_curves(certs)
    if combined:
        parts.append(img_data(combined, "certified accuracy of every run", "all runs, from their logs", "wide"))
    figs = [c.png for c in certs if c.png]
    if figs:
        parts.append("<div class='grid'>" + "".join(img_file(run, q) for q in figs) + "</div>")
    return "".join(parts)


def search_section(run: Run) -> str:
    parts = []
    for d, s, rows, manifest in run.searches:
        parts.append(f"<h3>{_e(run.rel(d) if d != run.root else d.name)}</h3>")
        info = {}
        srch, reward = manifest.get("search") or {}, manifest.get("reward") or {}
        if manifest:
            budget = manifest.get("budget") or {}
            info["model"] = manifest.get("model")
            info["method"] = srch.get("method")
            info["reward"] = reward.get("kind")
            info["budget"] = (bops_pct(srch["budget"]) + " of W32A32 BOPs" if budget.get("unit") == "BOPs"
                              and _finite(srch.get("budget")) else f"{num(budget.get('value'))} {budget.get('unit')}"
                              if budget else None)
        info["episodes"] = s.get("episodes", len(rows))
        if s:
            info["best episode"] = s.get("best_episode")
            info["best reward"] = f"{s['best_reward']:.3f}" if _finite(s.get("best_reward")) else s.get("best_reward")
            info["best BOPs"] = bops_pct(s.get("best_bops_fraction")) + " of W32A32"
            info["reward evaluations"] = s.get("evaluations")
            for k in ("reward_seconds", "episode_seconds", "seconds_this_run"):
                if _finite(s.get(k)):
                    info[pretty(k)] = f"{sig(s[k])} s"
            for k, v in s.items():
                if k not in ("episodes", "best_episode", "best_reward", "best_bops_fraction", "evaluations",
                             "reward_seconds", "episode_seconds", "seconds_this_run", "best_policy",
                             "best_reward_info"):
                    info[pretty(k)] = v
        parts.append(kv_table({k: v for k, v in info.items() if v is not None}))
        if isinstance(s.get("best_policy"), dict):
            layers = list(s["best_policy"])
            bits = [s["best_policy"][n] for n in layers]
            parts.append("<h4>best policy (bits per layer)</h4>" + table(
                ["", *map(_e, layers)], [["weights", *[_e(b[0]) for b in bits]],
                                         ["activations", *[_e(b[1]) for b in bits]]], cls="small"))
        curve, best_png = d / "reward_curve.png", d / "best_policy.png"
        figs = [img_file(run, q, "half") for q in (curve, best_png) if q.exists()]
        if not curve.exists() and rows:
            data = plot_rewards(rows)
            if data:
                figs.insert(0, img_data(data, "reward per episode", "reward per episode (from search.jsonl)", "half"))
        if figs:
            parts.append("<div class='grid2'>" + "".join(figs) + "</div>")
        if rows:
            top = sorted((r for r in rows if _finite(r.get("reward"))), key=lambda r: -r["reward"])[:8]
            cost_unit = next((r.get("cost_unit") for r in rows if r.get("cost_unit")), "BOPs")
            tbl = []
            for r in top:
                pol = r.get("policy") or {}
                bits = " ".join(f"{w}/{a}" for w, a in pol.values()) if isinstance(pol, dict) else ""
                cost = bops_pct(r.get("bops_fraction")) if cost_unit == "BOPs" else \
                    f"{sig(r.get('cost'))} {_e(cost_unit)}"
                tbl.append([_e(r.get("episode")), f"{r['reward']:.3f}", cost, _e(bits) or "–",
                            "yes" if r.get("cached") else "no"])
            parts.append(f"<h4>best episodes (of {len(rows)})</h4>" + table(
                ["episode", "reward", "BOPs" if cost_unit == "BOPs" else "cost", "bits W/A per layer", "cached"],
                tbl, cls="small", numeric_from=0, text_cols={3, 4}))
    return "".join(parts)


def export_section(run: Run) -> str:
    rows = []
    for p, o in run.exports:
        v = o.get("validation") or {}
        cal = o.get("calibration") or {}
        layers = " ".join(f"<span class='chip'>{_e(x.get('name'))} {_e(x.get('bits'))}</span>"
                          for x in o.get("layers", []) if isinstance(x, dict))
        agree = (f"{pct(v.get('top1_agreement'), 2)}"
                 f"<div class='sub'>noisy {pct(v.get('noisy_top1_agreement'), 2)}</div>")
        rows.append([f"{_e(Path(str(o.get('onnx') or p)).name)}<div class='sub'>{_e(run.rel(p))}</div>",
                     _e(o.get("model", "–")), _policy_cell(o.get("policy_summary")), bops_pct(o.get("bops_fraction")),
                     _e(o.get("quantizer", "–")), num(o["sigma"]) if _finite(o.get("sigma")) else "–",
                     num(cal["images"]) if "images" in cal else ("in training" if cal.get("in_training") else "–"),
                     agree, num(v.get("max_abs_logit_diff")) if _finite(v.get("max_abs_logit_diff")) else "–",
                     f"{pct(v.get('accuracy_reference'))} / {pct(v.get('accuracy_candidate'))}"
                     f"<div class='sub'>{num(v['images'])} images</div>" if v.get("images") else
                     f"{pct(v.get('accuracy_reference'))} / {pct(v.get('accuracy_candidate'))}",
                     layers or "–"])
    return table(["ONNX", "model", "policy", "BOPs", "quantizer", "σ", "calibration images",
                  "top-1 agreement<div class='sub'>ONNX vs torch</div>", "max |Δ logit|",
                  "accuracy<div class='sub'>torch / ONNX</div>", "layers"], rows, cls="wide", numeric_from=3,
                 text_cols={4, 10})


def bench_section(run: Run, models: Models) -> str:
    rows = []
    for p, b in run.benches:
        info = models.find(b.get("model"))
        lat, thr, mem = b.get("latency") or {}, b.get("throughput") or {}, b.get("memory") or {}
        energy = b.get("energy_j_per_inference")
        e_txt = f"{sig(energy)} J" if _finite(energy) else "n/a"
        e_note = f"<div class='sub'>{_e(str(energy).split(' (')[0][:80])}</div>" if isinstance(energy, str) else ""
        rows.append([f"{_e(Path(str(b.get('model') or p)).name)}<div class='sub'>{_e(run.rel(p))}</div>",
                     _policy_cell(info.get("policy")), bops_pct(info.get("bops_fraction")),
                     _target_cell(b.get("target"), b.get("runner")),
                     " / ".join(ms(lat.get(k)) for k in ("p50_ms", "p90_ms", "p99_ms")),
                     f"{rate(thr.get('images_per_s'))}<div class='sub'>batch {_e(thr.get('batch', '–'))}</div>",
                     f"{sig(mem['peak_increase_mb'])} MB" if _finite(mem.get("peak_increase_mb")) else "–",
                     e_txt + e_note])
    host = next((b.get("host") for _, b in run.benches if isinstance(b.get("host"), dict)), None)
    out = table(["model", "policy", "BOPs", "target / runner", "latency p50 / p90 / p99<div class='sub'>batch 1</div>",
                 "throughput", "peak memory<div class='sub'>increase</div>", "energy<div class='sub'>per inference</div>"],
                rows, numeric_from=2, text_cols={3})
    if host:
        out += "<p class='note'>host: " + _e(", ".join(
            f"{pretty(k)} {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in host.items()
            if v not in (None, [], "") and k != "isa_flags")) + "</p>"
    return out


def _meta_line(meta: dict) -> str:
    bits = [meta.get("policy"), " / ".join(str(x) for x in (meta.get("target"), meta.get("backend")) if x),
            f"{meta['images']} images" if meta.get("images") else None,
            f"seed {meta['seed']}" if meta.get("seed") is not None else None,
            Path(str(meta["artifact"])).name if meta.get("artifact") else None]
    return "<p class='note'>" + _e(" · ".join(str(b) for b in bits if b)) + "</p>"


def corruptions_html(o: dict) -> tuple[str, str, str]:
    s = o.get("summary") or {}
    rows = [r for r in o.get("rows", []) if isinstance(r, dict)]
    sevs = sorted({r.get("severity") for r in rows if isinstance(r.get("severity"), int)})
    names = list(dict.fromkeys(str(r.get("corruption")) for r in rows))
    acc = {(str(r.get("corruption")), r.get("severity")): r.get("accuracy") for r in rows}
    clean = s.get("clean_accuracy")
    body = [[_e(n), *[pct(acc.get((n, v))) for v in sevs],
             pct(sum(a for (c, _), a in acc.items() if c == n and _finite(a))
                 / max(1, sum(1 for (c, _), a in acc.items() if c == n and _finite(a))))] for n in names]
    worst = min((r for r in rows if _finite(r.get("accuracy"))), key=lambda r: r["accuracy"], default=None)
    if worst is not None and "worst" in s:
        s = {**s, "worst": f"{worst.get('corruption')} severity {worst.get('severity')}: {pct(worst['accuracy'])}"}
    head = kv_table({k: v for k, v in s.items()})
    pivot = table(["corruption", *[f"severity {v}" for v in sevs], "mean"],
                  [["<i>clean</i>", *[pct(clean)] * len(sevs), pct(clean)]] + body if _finite(clean) else body,
                  cls="heat")
    torch = f"<h4>deployed vs torch</h4>{kv_table(o['torch'])}" if isinstance(o.get("torch"), dict) else ""
    return head + torch, pivot, ""


def systematic_html(o: dict) -> tuple[str, str, str]:
    s = o.get("summary") or {}
    rows = [r for r in o.get("rows", []) if isinstance(r, dict)]
    ref = s.get("reference_accuracy")
    tbl = table(["variation", "accuracy", "Δ vs reference", "mean |Δ pixel|"],
                [[_e(r.get("variation")), pct(r.get("accuracy")),
                  (f"{100 * (r['accuracy'] - ref):+.1f} pt" if _finite(ref) and _finite(r.get("accuracy")) else "–"),
                  num(r["mean_abs_diff"]) if _finite(r.get("mean_abs_diff")) else "–"] for r in rows])
    parts = [kv_table(s)]
    dec = o.get("decoders")
    if isinstance(dec, dict) and dec:
        pairs = list(dict.fromkeys(k for v in dec.values() if isinstance(v, dict) for k in v))
        drows = [[_e(q), *[(f"{pct((v.get(pr) or {}).get('frac_differ'))} differ"
                            f"<div class='sub'>max {num((v.get(pr) or {}).get('max_abs', '–'))}</div>")
                           for pr in pairs]] for q, v in dec.items() if isinstance(v, dict)]
        parts.append("<h4>JPEG decoders compared (pixels that differ)</h4>" + table(["quality", *map(_e, pairs)],
                                                                                    drows, cls="small"))
    if isinstance(o.get("torch"), dict):
        parts.append(f"<h4>deployed vs torch</h4>{kv_table(o['torch'])}")
    return "".join(parts), tbl, ""


def attacks_html(o: dict) -> tuple[str, str, str]:
    s = o.get("summary") or {}
    clean = s.get("clean") or {}
    parts, detail, after = [], [], []
    head = {"clean accuracy (deployed)": clean.get("runner_accuracy"), "clean accuracy (torch)":
            clean.get("torch_accuracy"), "clean agreement": clean.get("agreement"),
            "max transfer gap": s.get("max_transfer_gap"), "trusted (gradient-masking check passed)": s.get("trusted")}
    parts.append(kv_table({k: (pct(v) if _finite(v) and not isinstance(v, bool) else v) for k, v in head.items()}))
    masking = s.get("masking") or {}
    if masking.get("reasons"):
        parts.append("<p class='warn'>gradient masking: " + _e("; ".join(map(str, masking["reasons"]))) + "</p>")
    wc = s.get("wcar") or {}
    if wc:
        detail.append("<h4>worst-case accuracy over attacks (WCAR)</h4>" + table(
            ["ε", "deployed", "torch", "per-image union<div class='sub'>deployed</div>",
             "per-image union<div class='sub'>torch</div>", "attacks"],
            [[_e(k), pct(v.get("runner")), pct(v.get("torch")), pct(v.get("union_runner")), pct(v.get("union_torch")),
              _e(", ".join(map(str, v.get("attacks", []))))] for k, v in wc.items() if isinstance(v, dict)],
            text_cols={5}))
    rows = [r for r in o.get("rows", []) if isinstance(r, dict)]
    if rows:
        after.append("<h4>each attack</h4>" + table(
            ["attack", "ε", "norm", "crafted on", "accuracy<div class='sub'>torch</div>",
             "accuracy<div class='sub'>deployed</div>", "agreement", "time"],
            [[_e(r.get("attack")), _e(r.get("eps_label", num(r.get("eps")))), _e(r.get("norm", "–")),
              _e(r.get("crafted_on", "–")), pct(r.get("torch_accuracy")), pct(r.get("runner_accuracy")),
              pct(r.get("agreement")), f"{sig(r['seconds'])} s" if _finite(r.get("seconds")) else "–"]
             for r in rows], numeric_from=4))
    return "".join(parts), "".join(detail), "".join(after)


CHECK_TITLES = {"corruptions": "Natural corruptions", "systematic": "Systematic noise (RobustMQ)",
                "attacks": "Adversarial attacks"}
# each returns (summary HTML, the tables shown beside its plot, tables below both)
CHECK_HTML = {"corruptions": corruptions_html, "systematic": systematic_html, "attacks": attacks_html}


def robustness_section(run: Run) -> str:
    parts = []
    for kind in CHECKS:
        for p, o in run.checks[kind]:
            parts.append(f"<h3>{CHECK_TITLES[kind]} <span class='path'>{_e(run.rel(p))}</span></h3>")
            parts.append(_meta_line(o.get("meta") or {}))
            head, detail, after = CHECK_HTML[kind](o)
            figs = [q for q in run.pngs if q.parent == p.parent and q.stem.split("-")[0] == p.stem.split(".")[0]]
            parts.append(head + f"<div class='split'><div>{detail}</div><div>"
                         + "".join(img_file(run, q, "half") for q in figs) + "</div></div>" + after)
    return "".join(parts)


# --------------------------------------------------------------------------------------------------- the page
CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;padding:1.5em 2em 3em;
max-width:1240px;color:#1d2330;background:#fff;line-height:1.4}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.3em;border-bottom:2px solid #3b5b92;padding-bottom:.15em;
margin-top:1.8em;color:#23395d}h3{font-size:1.05em;margin:1.3em 0 .3em}h4{font-size:.95em;margin:1em 0 .3em;color:#444}
.path{font:normal .8em ui-monospace,monospace;color:#667}
p.lead{color:#556;margin:.2em 0 1em;font-size:.9em}p.note{color:#667;font-size:.82em;margin:.2em 0 .6em}
nav{font-size:.88em;margin:.6em 0 0}nav a{margin-right:1.1em;color:#3b5b92;text-decoration:none}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:10px;margin:.8em 0 1.2em}
.card{border:1px solid #d5dbe6;border-radius:8px;padding:.55em .8em;background:#f6f8fc}
.ct{font-size:.78em;font-weight:600;letter-spacing:.02em;color:#5b6578}
.cv{font-size:1.4em;font-weight:600;margin:.1em 0;color:#1d2330}
.cc{font-size:.76em;color:#5b6578}
table{border-collapse:collapse;margin:.4em 0 1em;font-size:.85em}
th,td{border:1px solid #d5dbe6;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef2f8;font-weight:600}tr:nth-child(even) td{background:#fafbfd}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.summary{width:100%}table.summary th{vertical-align:bottom}
table.kv th{background:#f3f5f9;font-weight:500;white-space:nowrap}table.kv td{min-width:6em}
table.small{font-size:.92em;margin:.1em 0}table.small td,table.small th{padding:2px 6px}
.sub{font-size:.78em;color:#6b7385;font-weight:normal;white-space:normal}
.warn{color:#a0311d}table.wide{width:100%}
.chip{display:inline-block;white-space:nowrap;font:.78em ui-monospace,monospace;background:#eef2f8;border-radius:3px;
padding:0 4px;margin:1px 2px}
.split{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:16px;align-items:start}
.split figure{margin:0 0 8px}
figure{margin:.4em .4em .8em 0;display:inline-block;vertical-align:top}
figure img{max-width:100%;border:1px solid #e3e7ee;border-radius:4px}
figcaption{font-size:.75em;color:#667;font-family:ui-monospace,monospace}
figure.wide img{width:680px}
.grid{display:grid;grid-template-columns:repeat(3,1fr);gap:8px}.grid figure{margin:0}
.grid2{display:grid;grid-template-columns:repeat(2,1fr);gap:10px}.grid2 figure{margin:0}
.img-error{color:#a0311d;font-weight:600}
details{font-size:.85em;color:#556}
"""

# marks images that did not load and records script errors and console.error calls, for people and for the browser
# test (tests/test_report.py)
SCRIPT = """<script>
(function(){var errs=[],ce=console.error;
function note(m){errs.push(m);document.documentElement.setAttribute('data-page-errors',errs.join(' | '));}
window.addEventListener('error',function(e){var t=e.target;
note(t&&t.tagName==='IMG'?'image failed: '+t.alt:String(e.message));},true);
console.error=function(){note('console.error: '+Array.prototype.join.call(arguments,' '));
return ce.apply(console,arguments);};
window.addEventListener('load',function(){var imgs=document.images,bad=0;
for(var i=0;i<imgs.length;i++){var im=imgs[i];im.setAttribute('data-natural-width',im.naturalWidth);
if(!im.complete||im.naturalWidth===0){bad++;var p=document.createElement('p');p.className='img-error';
p.textContent='image did not load: '+im.alt;im.parentNode.insertBefore(p,im);}}
document.body.setAttribute('data-images-failed',bad);document.body.setAttribute('data-images-checked',imgs.length);});
})();
</script>"""


def build_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write RUN/report.html (or `out`) atomically; returns its path."""
    from arq_deploy.core.fileio import write_text

    root = Path(run)
    if not root.is_dir():
        raise ArqError(f"{root} is not a run directory")
    out = Path(out) if out else root / "report.html"
    r = collect(root)
    if r.empty():
        raise ArqError(f"{root} holds no results of arq-deploy (search, export, certify, check or bench output)")
    models = Models(r)
    deps = deployments(r, models)
    robust = robustness_rows(r)
    sections: list[tuple[str, str, str]] = []  # (id, title, html)
    if r.certs:
        sections.append(("certification", "Certified accuracy (randomized smoothing)", certification_section(r)))
    if r.searches:
        sections.append(("search", "Mixed-precision search", search_section(r)))
    bops_plot = plot_bops_latency(deps)
    if r.benches or bops_plot:
        body = img_data(bops_plot, "BOPs against latency", "BOPs of each policy against its measured latency",
                        "wide") if bops_plot else ""
        sections.append(("cost", "BOPs, latency and throughput", body + (bench_section(r, models) if r.benches
                                                                          else "")))
    if any(r.checks.values()):
        sections.append(("robustness", "Robustness checks", robustness_section(r)))
    if r.exports:
        sections.append(("export", "Export (QDQ ONNX against torch)", export_section(r)))
    rest = [q for q in r.pngs if q not in r.used_pngs]
    if rest:
        sections.append(("plots", "Other plots", "<div class='grid2'>" + "".join(img_file(r, q, "half")
                                                                              for q in rest) + "</div>"))
    written = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    summary = ["<h2 id='summary'>Summary</h2>", cards(r, deps, robust)]
    if deps:
        summary.append(summary_table(deps))
    for p, demo in r.demos:
        summary.append("<p class='note'>" + _e(
            f"demo ({r.rel(p)}): σ = {demo.get('sigma')}, {demo.get('certified_inputs')} certified test inputs, "
            f"N0 = {demo.get('n0')}, N = {demo.get('n')}, {demo.get('epochs')} training epochs, "
            f"{demo.get('seconds')} s in all") + "</p>")
    if robust:
        summary.append("<h3>Robustness</h3>" + robustness_table(robust))
    nav = "<nav>" + "".join(f"<a href='#{i}'>{_e(t)}</a>" for i, t, _ in sections) + "</nav>"
    head = ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>arq-deploy report: {_e(root.name)}</title><style>{CSS}</style>{SCRIPT}</head><body>")
    parts = [head,
             f"<h1>arq-deploy report: {_e(root.name)}</h1>",
             f"<p class='lead'>{_e(str(root.resolve()))} · written {written}</p>", nav, *summary]
    for i, title, body in sections:
        parts.append(f"<h2 id='{i}'>{_e(title)}</h2>{body}")
    if r.unused:
        parts.append(f"<details><summary>{len(r.unused)} other files (configs, manifests, logs) not shown</summary>"
                     "<ul>" + "".join(f"<li>{_e(r.rel(p))}</li>" for p in r.unused) + "</ul></details>")
    parts.append("</body></html>")
    write_text(out, "\n".join(parts))
    return out
