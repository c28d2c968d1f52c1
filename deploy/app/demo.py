"""`make demo` / `arq-deploy demo`: the whole pipeline on scikit-learn's digits, in a few minutes on 2 cores.

train (Gaussian noise σ) -> quantize (W8A8 and a mixed 2..8-bit policy, noisy calibration) -> QDQ ONNX export with
validation -> TVM compile for the host -> run with onnxruntime and TVM -> certify test inputs -> a table.
"""

from __future__ import annotations

import time
from pathlib import Path

SIGMA = 0.25
RADII = (0.0, 0.25, 0.5)  # N=2,000 at α=0.001 caps the radius at σ·Φ⁻¹(0.001^(1/N)) ≈ 0.67


def _mixed_policy(specs):
    from arq_deploy.core.policy import QuantPolicy

    bits = [(8, 8), (4, 6), (2, 8), (6, 4), (8, 8)]
    return QuantPolicy.for_layers([s.name for s in specs], bits[: len(specs)])


def run_demo(out: Path, fast: bool = False) -> dict:
    from rich.console import Console
    from rich.table import Table

    from arq_deploy.certify.results import CertifyLog, certify_dataset, plot_curve
    from arq_deploy.certify.smooth import Smooth
    from arq_deploy.certify.stats import summarize
    from arq_deploy.core.data import load_dataset
    from arq_deploy.core.fileio import write_json
    from arq_deploy.core.policy import QuantPolicy
    from arq_deploy.export.pipeline import export_and_validate, load, save_checkpoint, train
    from arq_deploy.export.qdq import float_onnx, save_onnx, set_metadata
    from arq_deploy.export.quantize.layers import extract_layer_specs
    from arq_deploy.runtime.runners import OrtRunner, TorchRunner
    from arq_deploy.runtime.tvm_runner import TvmRunner
    from arq_deploy.targets.backends import compile_onnx
    from arq_deploy.targets.bench import measure

    console = Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    train_ds, test_ds = load_dataset("digits", "train"), load_dataset("digits", "test")
    epochs, n0, n, n_cert = (8, 50, 500, 12) if fast else (40, 100, 2000, 36)

    console.rule(f"1. train digits_cnn with Gaussian noise σ={SIGMA} ({epochs} epochs, {len(train_ds)} images)")
    lm = load("digits_cnn", None)
    model, history = train(lm, train_ds, SIGMA, epochs, lr=0.05, batch_size=64)
    lm.model = model
    save_checkpoint(out / "digits_cnn.pt", model, lm, SIGMA, epochs, history=history)
    specs = extract_layer_specs(model, lm.input_shape)

    console.rule("2. quantize + export QDQ ONNX (noisy calibration), validate against torch")
    float_path = out / "digits_cnn.float.onnx"
    fproto = float_onnx(model, lm.input_shape)
    set_metadata(fproto, {"model": "digits_cnn", "sigma": SIGMA})
    save_onnx(fproto, float_path)
    policies = {"W8A8": QuantPolicy.uniform(8), "mixed": _mixed_policy(specs)}
    exports = {}
    for name, pol in policies.items():
        exports[name] = export_and_validate(lm, pol, train_ds, test_ds, out / f"digits_cnn.{name}.onnx", sigma=SIGMA,
                                            calib_images=512, validate_images=len(test_ds))
        v = exports[name]["validation"]
        console.print(f"  {name}: {exports[name]['policy_summary']}, agreement with torch {v['top1_agreement']:.4f} "
                      f"(noisy {v['noisy_top1_agreement']:.4f}), max logit diff {v['max_abs_logit_diff']:.2e}")

    console.rule("3. compile with TVM for this x86 CPU")
    artifacts = {}
    for name in policies:
        t = time.perf_counter()
        artifacts[name] = compile_onnx(out / f"digits_cnn.{name}.onnx", target="x86",
                                       out_dir=out / "targets" / f"x86-{name}", batch_size=100)
        console.print(f"  {name}: {artifacts[name]} in {time.perf_counter() - t:.1f} s")

    console.rule("4. run and certify")
    runners = {("float", "torch"): TorchRunner(model, lm.input_shape, lm.num_classes),
               ("float", "onnxruntime"): OrtRunner(float_path)}
    for name in policies:
        runners[(name, "onnxruntime")] = OrtRunner(out / f"digits_cnn.{name}.onnx")
        runners[(name, "tvm")] = TvmRunner(artifacts[name])
    x_test, y_test = test_ds.x(), test_ds.labels
    cert_idx = list(range(0, len(test_ds), len(test_ds) // n_cert))[:n_cert]
    rows = []
    for (pname, backend), runner in runners.items():
        clean = float((runner(x_test).argmax(1) == y_test).mean())
        lat = measure(runner, batch=1, repeats=30)
        thr = measure(runner, batch=100, repeats=5, warmup=2)
        meta = {"model": f"{pname}/{backend}", "sigma": SIGMA, "n0": n0, "n": n, "alpha": 0.001, "seed": 0}
        log_path = out / f"certify-{pname}-{backend}.tsv"
        with CertifyLog(log_path, meta) as log:
            certs = certify_dataset(Smooth(runner, lm.num_classes, SIGMA, batch_size=500), x_test, y_test, cert_idx,
                                    n0, n, 0.001, 0, log, progress=True)
        plot_curve(certs, log_path.with_suffix(".png"), SIGMA)
        s = summarize(certs, RADII)
        bops = 1.0 if pname == "float" else exports[pname]["bops_fraction"]
        rows.append({"policy": pname, "backend": backend, "clean_acc": clean,
                     "certified_acc": dict(zip(map(str, RADII), s.certified_accuracy)), "acr": s.acr,
                     "bops_pct": 100 * bops, "latency_ms_b1": lat.p50_ms, "images_per_s_b100": thr.images_per_s,
                     "certify_s_per_image": s.seconds_per_input})

    table = Table(title=f"arq-deploy demo: digits, σ={SIGMA}, {len(cert_idx)} certified test inputs, N0={n0}, N={n}, "
                        f"α=0.001")
    for col in ("policy", "backend", "BOPs %", "clean acc", *[f"cert@{r}" for r in RADII], "ACR", "ms b=1",
                "img/s b=100", "s/cert"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["policy"], r["backend"], f"{r['bops_pct']:.2f}", f"{r['clean_acc']:.3f}",
                      *[f"{v:.3f}" for v in r["certified_acc"].values()], f"{r['acr']:.3f}",
                      f"{r['latency_ms_b1']:.3f}", f"{r['images_per_s_b100']:,.0f}", f"{r['certify_s_per_image']:.2f}")
    stdout = Console()
    (stdout if stdout.is_terminal else Console(width=150)).print(table)
    result = {"sigma": SIGMA, "n0": n0, "n": n, "certified_inputs": len(cert_idx), "epochs": epochs, "rows": rows,
              "seconds": round(time.perf_counter() - t_start, 1)}
    write_json(out / "demo.json", result)
    from arq_deploy.app.report import build_report

    report = build_report(out)
    console.print(f"done in {result['seconds']} s; results in {out}/demo.json")
    console.print(f"report: {report}")
    return result
