"""`arq-deploy report`: the HTML page of a run directory, built from real stage outputs and opened in a real headless
browser (Debian's chromium: `apt-get install -y chromium`; the browser tests skip without it).

The browser checks read chromium's dumped DOM after the page's load event: the page's inline script writes each image's
naturalWidth into data-natural-width, puts a visible .img-error note before any image that did not load, and records
script errors and console.error calls in data-page-errors on <html>; chromium's stderr (--enable-logging=stderr) must
hold no console message at all. Each browser test keeps a 1280×2400 screenshot in its tmp dir and copies it to
$ARQ_REPORT_SCREENSHOTS (default: <tmp>/arq-deploy-report-screenshots/), printing the path.
"""

import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
SCREENSHOTS = Path(os.environ.get("ARQ_REPORT_SCREENSHOTS",
                                  Path(tempfile.gettempdir()) / "arq-deploy-report-screenshots"))
DECIMAL = re.compile(r"\d+\.\d+")


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed: apt-get install -y chromium")
    return exe


class Dom(HTMLParser):
    """What the checks need of a (dumped) page: visible text (all, and per h2 section), h2 headings, images, error
    markers, <html>/<body> data attributes."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.h2, self.imgs, self.img_errors, self.attrs = [], [], [], 0, {}
        self._skip, self._in_h2, self._sections = 0, False, {"": []}
        self.feed(text)
        self.visible = " ".join(" ".join(self.text).split())
        self.sections = {k: " ".join(" ".join(v).split()) for k, v in self._sections.items()}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in ("html", "body"):
            self.attrs.update({k: v for k, v in a.items() if k.startswith("data-")})
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "h2":
            self._in_h2 = True
            self.h2.append("")
        if "img-error" in (a.get("class") or "").split():
            self.img_errors += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip -= 1
        elif tag == "h2":
            self._in_h2 = False
            self._sections[self.h2[-1]] = []

    def handle_data(self, data):
        if self._skip:
            return
        self.text.append(data)
        if self._in_h2:
            self.h2[-1] += data
        elif self.h2:
            self._sections[self.h2[-1]].append(data)


def open_in_browser(page: Path, work: Path, name: str, capsys=None) -> tuple[Dom, str, Path]:
    """(the DOM chromium dumps after the load event, chromium's stderr, a 1280×2400 screenshot) of `page`."""
    exe = chromium()
    work.mkdir(parents=True, exist_ok=True)
    url = page.resolve().as_uri()
    dump = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={work / 'profile-dom'}", "--enable-logging=stderr",
                           "--v=0", "--dump-dom", url], capture_output=True, text=True, timeout=180,
                          check=False)
    assert dump.returncode == 0, dump.stderr[-3000:]
    shot = work / f"{name}.png"
    run = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={work / 'profile-shot'}", f"--screenshot={shot}",
                          "--window-size=1280,2400", url], capture_output=True, text=True, timeout=180,
                          check=False)
    assert run.returncode == 0 and shot.exists(), run.stderr[-3000:]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    kept = SCREENSHOTS / shot.name
    shutil.copyfile(shot, kept)
    if capsys is not None:
        with capsys.disabled():
            print(f"\n[report screenshot] {kept}")
    return Dom(dump.stdout), dump.stderr, shot


def browser_problems(dom: Dom, stderr: str, source: str) -> list[str]:
    """Everything the browser says is wrong with a page (empty: it rendered, every image loaded, no console errors)."""
    problems = []
    n_src = source.count("<img ")
    if dom.attrs.get("data-images-checked") != str(n_src):
        problems.append(f"the load check saw {dom.attrs.get('data-images-checked')} images, the page has {n_src}")
    if dom.attrs.get("data-images-failed") not in ("0", None):
        problems.append(f"{dom.attrs['data-images-failed']} images failed to load")
    if dom.img_errors:
        problems.append(f"{dom.img_errors} .img-error markers")
    bad = [i.get("alt") for i in dom.imgs if int(i.get("data-natural-width") or 0) <= 0]
    if bad:
        problems.append(f"images with no natural width: {bad}")
    if dom.attrs.get("data-page-errors"):
        problems.append(f"page errors: {dom.attrs['data-page-errors']}")
    console = [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    if console:
        problems.append(f"console: {console}")
    return problems


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def assert_screenshot(shot: Path) -> None:
    from PIL import Image

    assert png_size(shot) == (1280, 2400)
    im = Image.open(shot).convert("L")
    lo, hi = im.getextrema()
    assert hi - lo > 100, "the screenshot is blank"
    # the page is not one big empty area: its top half has text and tables (many distinct grey levels)
    assert len(im.crop((0, 0, 1280, 1200)).getcolors(maxcolors=256) or range(257)) > 20


def assert_readable(dom: Dom) -> None:
    """No raw JSON and no 17-digit floats in what a reader sees."""
    assert '{"' not in dom.visible and "': " not in dom.visible
    long = [m for m in DECIMAL.findall(dom.visible) if len(m.replace(".", "").lstrip("0")) > 5]
    assert not long, long  # an unformatted float such as 0.23333333333333334 has more than 5 significant digits


def pct(v: float) -> str:
    return f"{100 * v:.1f}%"


# -------------------------------------------------------------------------------------------------------- fast
def _png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(3, 2))
    plt.plot([0, 1], [1, 0])
    fig.savefig(path)
    plt.close(fig)


def _synthetic_run(run: Path) -> None:
    """A run directory in the shapes the stages write (as read from a real `demo --fast`, check and search run)."""
    run.mkdir(parents=True)
    for name, bits, frac, lat in (("w8a8", "W8A8", 0.0625, 0.10230650013909326),
                                  ("w4a8", "W4A8", 0.03125, 0.13712345678901234)):
        (run / f"{name}.export.json").write_text(json.dumps({
            "onnx": str(run / f"{name}.onnx"), "model": "digits_cnn", "policy_summary": bits, "bops": 1,
            "bops_fraction": frac, "sigma": 0.25, "quantizer": "percentile",
            "calibration": {"images": 128, "noise_sigma": 0.25, "percentile": 99.99, "seed": 0, "tie_nudges": {}},
            "validation": {"data": "digits", "images": 100, "top1_agreement": 1.0, "max_abs_logit_diff": 0.0049131,
                           "accuracy_reference": 0.97, "accuracy_candidate": 0.9700000000000001,
                           "noisy_top1_agreement": 1.0},
            "layers": [{"name": "conv1", "macs": 9216, "bits": bits}]}))
        (run / f"{name}.bench.json").write_text(json.dumps({
            "model": str(run / f"{name}.onnx"), "target": "x86", "format": "arq-deploy/bench", "runner": "onnxruntime",
            "latency": {"batch": 1, "p50_ms": lat, "p90_ms": 0.154, "p99_ms": 0.166, "images_per_s": 9774.5499},
            "throughput": {"batch": 32, "p50_ms": 1.7697, "images_per_s": 18081.711254888913},
            "memory": {"peak_increase_mb": 2.07}, "energy_j_per_inference": "not available: no powercap (a VM)",
            "host": {"machine": "x86_64", "cpus": 2}}))
    meta = {"alpha": 0.001, "backend": "onnxruntime", "data": "digits", "model": str(run / "w8a8.onnx"),
            "model_sha256": "1c75787ed4643a8d48b17d19fe4d54b77ce9baf2a7ede243417578598ec86820", "n": 200, "n0": 20,
            "seed": 0, "sigma": 0.25, "target": "x86"}
    (run / "w8a8.certify.summary.json").write_text(json.dumps({"meta": meta, "summary": {
        "radii": [0.0, 0.25, 0.5], "certified_accuracy": {"0": 0.875, "0.25": 0.23333333333333334, "0.5": 0.0},
        "acr": 0.3432793122065737, "abstain_rate": 0.125, "clean_accuracy": 0.875,
        "seconds_per_input": 0.02001110912499371, "count": 8}}))
    rows = "".join(f"{i}\t{i % 10}\t{i % 10}\t{r}\t1\t0.02\t0.9\t190\t20\t200\n"
                   for i, r in enumerate([0.1, 0.2, 0.3, 0.41]))
    (run / "w4a8.certify.tsv").write_text("# " + json.dumps({**meta, "model": str(run / "w4a8.onnx")}) + "\n"
                                          "idx\tlabel\tpredict\tradius\tcorrect\ttime\tpa_lower\tcount_a\tn0\tn\n"
                                          + rows)
    checks = run / "checks"
    checks.mkdir()
    cmeta = {"artifact": str(run / "w8a8.onnx"), "backend": "onnxruntime", "target": "x86", "policy": "W8A8",
             "images": 64, "seed": 0}
    (checks / "corruptions.json").write_text(json.dumps({
        "check": "corruptions", "meta": cmeta, "clean": {"accuracy": 1.0},
        "summary": {"clean_accuracy": 1.0, "mean_corruption_accuracy": 0.5885416666666666,
                    "mnr": 0.4114583333333333, "worst": "contrast s5: 0.094"},
        "rows": [{"corruption": c, "severity": s, "accuracy": a, "key": f"{c}/s{s}"}
                 for c, s, a in (("fog", 1, 0.640625), ("fog", 5, 0.25), ("contrast", 1, 0.75),
                                 ("contrast", 5, 0.09375))]}))
    (checks / "systematic.json").write_text(json.dumps({
        "check": "systematic", "meta": cmeta,
        "summary": {"acc_s": 0.9600694444444444, "reference_accuracy": 1.0, "acc_drop": 0.03993055555555558,
                    "worst": "resize-cv2-nearest", "worst_accuracy": 0.546875, "worst_drop": 0.453125},
        "rows": [{"variation": "reference", "accuracy": 1.0, "mean_abs_diff": 0.0},
                 {"variation": "resize-cv2-nearest", "accuracy": 0.546875, "mean_abs_diff": 0.18671234}],
        "decoders": {"q95": {"pil-cv2": {"max_abs": 0, "frac_differ": 0.0}}}}))
    (checks / "attacks.json").write_text(json.dumps({
        "check": "attacks", "meta": cmeta,
        "summary": {"clean": {"torch_accuracy": 0.9375, "runner_accuracy": 0.9375, "agreement": 1.0},
                    "wcar": {"8/255": {"eps": 0.03137254901960784, "attacks": ["fgsm", "pgd"], "runner": 0.90625,
                                       "torch": 0.90625, "union_runner": 0.875, "union_torch": 0.875}},
                    "max_transfer_gap": 0.0, "trusted": True, "masking": {"passed": True, "reasons": []}},
        "rows": [{"attack": "pgd", "eps": 0.03137254901960784, "eps_label": "8/255", "norm": "Linf",
                  "crafted_on": "torch", "torch_accuracy": 0.90625, "runner_accuracy": 0.90625, "agreement": 1.0,
                  "seconds": 0.5261234}]}))
    for f in ("corruptions.png", "systematic.png", "attacks.png"):
        _png(checks / f)
    search = run / "search"
    search.mkdir()
    episodes = [{"episode": i, "policy": {"conv1": [8, 8], "linear": [b, b]}, "bops_fraction": 0.01 * b,
                 "cost": 1.0, "cost_unit": "BOPs", "reward": 0.5 + 0.01 * i, "reward_info": {}, "cached": False}
                for i, b in enumerate([2, 4, 6, 8])]
    (search / "search.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))
    (search / "summary.json").write_text(json.dumps({
        "episodes": 4, "best_episode": 3, "best_reward": 0.53, "best_policy": {"conv1": [8, 8], "linear": [8, 8]},
        "best_bops_fraction": 0.08, "best_reward_info": {}, "evaluations": 4, "reward_seconds": 6.441170367999803}))
    (search / "manifest.json").write_text(json.dumps({
        "format": "arq-deploy/search", "model": "digits_cnn", "budget": {"unit": "BOPs", "value": 6.09e7},
        "reward": {"kind": "accuracy"}, "search": {"budget": 0.05, "method": "ddpg", "episodes": 4}}))
    (run / "w8a8.certify.config.json").write_text(json.dumps({"sigma": 0.25}))


def test_report_opens_with_a_summary_and_formats_numbers(tmp_path):
    """Every kind of result in the shapes the stages write: the page opens with the summary (model, policy, BOPs,
    target/backend, certified accuracy per radius, ACR, latency, throughput, robustness headline), numbers are
    formatted, dicts are tables, and it draws the plots a run lacks (all certification runs, BOPs against latency,
    reward per episode)."""
    from arq_deploy.app.report import build_report

    run = tmp_path / "run"
    _synthetic_run(run)
    out = build_report(run)
    text = out.read_text()
    dom = Dom(text)
    assert dom.h2[0] == "Summary"
    assert {"Certified accuracy (randomized smoothing)", "Mixed-precision search", "BOPs, latency and throughput",
            "Robustness checks", "Export (QDQ ONNX against torch)"} <= set(dom.h2)
    summary = dom.sections["Summary"]
    for want in ("digits_cnn", "W8A8", "W4A8", "6.25%", "3.12%", "x86 / onnxruntime", "87.5%", "23.3%", "0.343",
                 "0.102 ms", "0.137 ms", "18,082/s", "97.0%",  # the summary table
                 "100.0% → 9.4%", "contrast s5", "96.0%", "90.6%", "resize-cv2-nearest",  # robustness headline
                 "0.530"):  # the search's best reward
        assert want in summary, want
    # the TSV without a summary is summarised (4 inputs, all correct, ACR = mean radius)
    assert "w4a8.onnx · onnxruntime" in dom.visible and f"{(0.1 + 0.2 + 0.3 + 0.41) / 4:.3f}" in dom.visible
    assert_readable(dom)
    alts = [i.get("alt") for i in dom.imgs]
    # 3 check PNGs + the plots the report draws: all certification runs, BOPs against latency, reward per episode
    assert text.count("data:image/png;base64,") == 6
    assert {"certified accuracy of every run", "BOPs against latency", "reward per episode"} <= set(alts)
    assert "w8a8.certify.config.json" in dom.visible  # unused files are listed, not dropped


def test_browser_check_catches_a_broken_image_and_a_script_error(tmp_path, capsys):
    """The browser check itself: a page with a corrupt image and a throwing script fails every check it should."""
    from arq_deploy.app.report import build_report

    run = tmp_path / "run"
    _synthetic_run(run)
    good = build_report(run).read_text()
    payload = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", good).group(1)
    bad_page = tmp_path / "broken.html"
    bad_page.write_text(good.replace(payload, "AAAA", 1).replace("</body>", "<script>noSuchFunction()</script>"
                                                                           "</body>"))
    dom, stderr, shot = open_in_browser(bad_page, tmp_path / "browser", "report-broken-control")
    problems = " ".join(browser_problems(dom, stderr, bad_page.read_text()))
    assert "1 images failed to load" in problems and "1 .img-error markers" in problems
    assert "noSuchFunction" in problems and "Uncaught" in problems
    dom, stderr, shot = open_in_browser(run / "report.html", tmp_path / "browser-good", "report-synthetic", capsys)
    assert browser_problems(dom, stderr, good) == []
    assert_screenshot(shot)


def test_report_of_a_real_export_certify_bench_run_in_chromium(digits_model, cli, tmp_path, capsys):
    """A real run directory (the CLI's export W8A8, certify and bench of the digits model) reports, and the page
    renders in chromium with its summary numbers, every image loaded and no console errors."""
    _, ckpt = digits_model
    run = tmp_path / "run"
    run.mkdir()
    onnx = run / "w8a8.onnx"
    for args in (("export", "--weights", ckpt, "--bits", "8", "--calib-images", "128", "--validate-images", "100",
                  "--out", onnx),
                 ("certify", onnx, "--sigma", "0.25", "--n0", "20", "--n", "200", "--skip", "30", "--max", "6",
                  "--out", run / "w8a8.certify.tsv"),
                 ("bench", onnx, "--repeats", "10", "--batch", "32", "--out", run / "w8a8.bench.json"),
                 ("report", run)):
        rc, out, err = cli(*args)
        assert rc == 0, err[-3000:]
    page = run / "report.html"
    assert f"wrote {page}" in out
    dom, stderr, shot = open_in_browser(page, tmp_path / "browser", "report-export-certify-bench", capsys)
    assert browser_problems(dom, stderr, page.read_text()) == []
    assert_screenshot(shot)
    assert dom.h2[0] == "Summary"
    cert = json.loads((run / "w8a8.certify.summary.json").read_text())["summary"]
    bench = json.loads((run / "w8a8.bench.json").read_text())
    summary = dom.sections["Summary"]
    from arq_deploy.app.report import sig

    for want in ("digits_cnn", "W8A8", "6.25%", "x86 / onnxruntime", f"{cert['acr']:.3f}",
                 *[pct(v) for v in cert["certified_accuracy"].values()],
                 f"{sig(bench['latency']['p50_ms'])} ms", f"{bench['throughput']['images_per_s']:,.0f}/s"):
        assert want in summary, want
    assert_readable(dom)
    assert len(dom.imgs) == 1 and dom.imgs[0]["alt"] == "w8a8.certify.png"


# -------------------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_demo_writes_a_report_and_a_full_run_renders_in_chromium(cli, tmp_path, capsys):
    """`arq-deploy demo --fast` writes report.html; with robustness checks, a TVM bench and a short search added to
    its run directory, the report has every section and renders in chromium."""
    run = tmp_path / "demo"
    rc, _, err = cli("demo", "--fast", "--out", run)
    assert rc == 0, err[-3000:]
    assert f"report:{run / 'report.html'}" in "".join(err.split())  # rich may fold the long path
    dom, stderr, _ = open_in_browser(run / "report.html", tmp_path / "browser-demo", "report-demo", capsys)
    assert browser_problems(dom, stderr, (run / "report.html").read_text()) == []
    assert "BOPs against latency" in [i.get("alt") for i in dom.imgs]  # six policy × backend rows of the demo
    onnx = run / "digits_cnn.W8A8.onnx"
    for args in (("check", "corruptions", onnx, "--max", "64", "--corruptions", "gaussian_noise,fog,contrast",
                  "--severities", "1,3,5", "--out", run / "checks"),
                 ("check", "systematic", onnx, "--max", "64", "--out", run / "checks"),
                 ("bench", run / "targets" / "x86-W8A8", "--repeats", "10", "--batch", "32",
                  "--out", run / "bench-W8A8-tvm.json"),
                 ("search", "--weights", run / "digits_cnn.pt", "--reward", "accuracy", "--episodes", "6", "--warmup",
                  "3", "--val-images", "30", "--calib-images", "64", "--budget", "0.05", "--out", run / "search"),
                 ("report", run)):
        rc, _, err = cli(*args)
        assert rc == 0, err[-3000:]
    page = run / "report.html"
    dom, stderr, shot = open_in_browser(page, tmp_path / "browser-full", "report-full-run", capsys)
    assert browser_problems(dom, stderr, page.read_text()) == []
    assert_screenshot(shot)
    assert dom.h2[0] == "Summary"
    assert {"Certified accuracy (randomized smoothing)", "Mixed-precision search", "BOPs, latency and throughput",
            "Robustness checks", "Export (QDQ ONNX against torch)"} <= set(dom.h2)
    corr = json.loads((run / "checks" / "corruptions.json").read_text())
    worst = min(corr["rows"], key=lambda r: r["accuracy"])
    summary = dom.sections["Summary"]
    assert f"{pct(corr['summary']['clean_accuracy'])} → {pct(worst['accuracy'])}" in summary
    sysm = json.loads((run / "checks" / "systematic.json").read_text())["summary"]
    assert pct(sysm["acc_s"]) in summary and "x86 / tvm" in summary
    alts = {i.get("alt") for i in dom.imgs}
    assert {"reward_curve.png", "best_policy.png", "corruptions.png", "systematic.png",
            "certified accuracy of every run", "BOPs against latency"} <= alts
    assert_readable(dom)
