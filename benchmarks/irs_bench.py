"""Incremental randomized smoothing (IRS) vs full certification of quantized ResNet-20s, measured in one run.

For σ in (0.25, 0.5): the float gauss-σ ResNet-20 is certified once (the cache); then each quantized model (W8A8 and
a mixed 2..8-bit policy, calibrated on noisy training images) is certified (a) fully, (b) incrementally from the float
log with n_p samples (each n_p of a list). f's labels on the ζ samples are computed once with the cache (a
`FloatLabelStore`, as `certify --incremental-from` keeps them), so IRS runs only f_q. Reported: seconds per image of
(a) and (b) and their ratio (also counting f's labels), certified accuracy at r = 0, 0.25, 0.5 and ACR of each, the
IRS-path fraction, and the float model's one-off certification and labelling time. All on onnxruntime. The runs of
f_q are interleaved image by image (each image goes through every run in turn, the first run rotating), so drift in
the machine's speed hits every run alike.

The IRS paper's comparison (Ugare et al. 2024) is at equal ACR, not at equal N: the float model is certified once at a
large N (10^5 there; `--float-n`), IRS spends n_p samples of f_q, and the baseline certifies f_q from scratch. With
`--baseline-n` the baseline is run at each of those N too; the seconds it needs to reach IRS's ACR are interpolated
between the two bracketing runs (`cost_to_match`), and their ratio to IRS's seconds is the equal-ACR speed-up.
`--fallback-n n_p` makes IRS's fallback CERTIFY spend n_p estimation samples as well, `--fallback-n 0` turns the
fallback off (abstain where the bound fails); a list (n_p,0) runs IRS with each (default: the float log's N).
`--work-dir DIR` keeps the logs there: a rerun with the same DIR reuses the float certificates and f's labels (with
their seconds as first measured, from DIR/float-σ.timing.json) and redoes every quantized run.

    python benchmarks/irs_bench.py [--images 20] [--n 10000] [--n-p 1000[,3000]] [--sigmas 0.25,0.5] [--models W8A8,mixed]
        [--float-n N] [--baseline-n 1000,2000,5000] [--fallback-n N|n_p|0[,...]] [--work-dir DIR]
        [--shared ../shared/data] [--out JSON]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

MIXED = {"conv1": [8, 8], "layer1.0.conv1": [4, 4], "layer1.1.conv2": [2, 8], "layer2.0.conv1": [4, 6],
         "layer2.2.conv2": [2, 6], "layer3.0.conv1": [4, 8], "layer3.1.conv1": [6, 4], "linear": [8, 8]}


def summary_row(certs, seconds):
    from arq_deploy.certify.stats import summarize

    s = summarize(certs, (0.0, 0.25, 0.5))
    return {"seconds": seconds, "s_per_image": seconds / len(certs),
            "certified_accuracy": dict(zip(("0", "0.25", "0.5"), s.certified_accuracy)), "acr": s.acr}


def max_diff_pp(a, b):
    return max(100 * abs(a["certified_accuracy"][r] - b["certified_accuracy"][r]) for r in b["certified_accuracy"])


def equal_acr(baseline, irs_row, labels_s):
    """The baseline (full CERTIFY of f_q at each N) at IRS's ACR: its seconds and N interpolated between the two
    bracketing runs, its certified accuracy likewise, and the speed-up (also counting f's labels at this n_p)."""
    import numpy as np

    from arq_deploy.certify.stats import cost_to_match

    runs = sorted(baseline.items())
    secs, kind = cost_to_match([(r["seconds"], r["acr"]) for _, r in runs], irs_row["acr"])
    ts = [r["seconds"] for _, r in runs]

    def at(values):  # piecewise-linear in seconds, as the cost (clamped at the ends)
        return float(np.interp(secs, ts, values))

    cert = {r: at([run["certified_accuracy"][r] for _, run in runs]) for r in irs_row["certified_accuracy"]}
    return {"kind": kind, "baseline_seconds": secs, "baseline_n": at([n for n, _ in runs]),
            "speedup": secs / irs_row["seconds"], "speedup_with_float_labels": secs / (irs_row["seconds"] + labels_s),
            "certified_accuracy": cert,
            "certified_accuracy_max_abs_diff_pp": max_diff_pp(irs_row, {"certified_accuracy": cert})}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--n-p", default="1000", help="IRS disagreement samples; a list (1000,3000) runs IRS at each")
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--sigmas", default="0.25,0.5")
    ap.add_argument("--models", default="W8A8,mixed", help="quantized models to certify: W8A8, mixed")
    ap.add_argument("--float-n", type=int, default=None, help="N of the float model's certificates [--n]")
    ap.add_argument("--baseline-n", default="", help="also certify f_q fully at each of these N (equal-ACR speed-up)")
    ap.add_argument("--fallback-n", default=None,
                    help="N of IRS's fallback CERTIFY: a number, n_p, or 0 (abstain); a list runs each [float N]")
    ap.add_argument("--work-dir", default=None, help="where the logs go; reused by a rerun [a fresh temp dir]")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "irs_bench.json"))
    args = ap.parse_args()

    from arq_deploy.certify.incremental import (
        DISPARITY,
        FloatCache,
        FloatLabelStore,
        IncrementalLog,
        certify_incremental_dataset,
        cost_summary,
        fill_label_store,
        incremental_meta,
    )
    from arq_deploy.certify.results import CertifyLog, certify_dataset
    from arq_deploy.certify.smooth import Smooth
    from arq_deploy.core.data import load_dataset
    from arq_deploy.core.fileio import sha256_file, write_json
    from arq_deploy.core.policy import QuantPolicy
    from arq_deploy.export.pipeline import export_and_validate, load
    from arq_deploy.export.qdq import float_onnx, save_onnx
    from arq_deploy.runtime.runners import OrtRunner

    policies = {"W8A8": QuantPolicy.uniform(8),
                "mixed": QuantPolicy.from_dict({"format": "arq-deploy/policy", "version": 1, "default": [6, 6],
                                                "layers": MIXED})}
    unknown = set(args.models.split(",")) - set(policies)
    if unknown:
        ap.error(f"unknown --models {', '.join(sorted(unknown))}: choose from {', '.join(policies)}")
    shared = Path(args.shared)
    cifar = str(shared / "cifar10" / "cifar-10-batches-py")
    train, test = load_dataset(cifar, "train"), load_dataset(cifar, "test")
    x_test = test.x()  # once: x() converts every image afresh, and the runs below take them one by one
    idx = list(range(0, 1000, 1000 // args.images))[: args.images]
    n_ps = [int(v) for v in args.n_p.split(",")]
    float_n = args.float_n or args.n
    grid = sorted({args.n, *(int(v) for v in args.baseline_n.split(",") if v)})
    fallbacks = args.fallback_n.split(",") if args.fallback_n else [str(float_n)]
    if any(v != "n_p" and not v.isdigit() for v in fallbacks):
        ap.error(f"--fallback-n must be numbers or n_p, got {args.fallback_n!r}")
    tmp = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="arq-irs-"))
    tmp.mkdir(parents=True, exist_ok=True)
    results = {"images": len(idx), "n0": args.n0, "n": args.n, "float_n": float_n, "baseline_n": grid, "n_p": n_ps,
               "fallback_n": fallbacks, "work_dir": str(tmp), "alpha": args.alpha, "alpha_zeta": args.alpha,
               "disparity": DISPARITY, "runtime": "onnxruntime CPU", "sigmas": {}}
    for sigma in (float(s) for s in args.sigmas.split(",")):
        lm = load("resnet20", str(shared / "models" / f"resnet20-gauss{sigma:.2f}.pt"))
        f_path = tmp / f"float-{sigma}.onnx"
        if not f_path.exists():  # a reused directory keeps the model its float log names (by sha256)
            save_onnx(float_onnx(lm.model, lm.input_shape), f_path)
        f_runner = OrtRunner(f_path, batch_size=400)
        meta = {"model": str(f_path), "model_sha256": sha256_file(f_path), "backend": "onnxruntime",
                "data": test.name, "sigma": sigma, "n0": args.n0, "n": float_n, "alpha": args.alpha, "seed": 0}
        t = time.perf_counter()
        with CertifyLog(tmp / f"float-{sigma}.tsv", meta) as log:
            fc = certify_dataset(Smooth(f_runner, 10, sigma, 400), x_test, test.labels, idx, args.n0, float_n,
                                 args.alpha, 0, log)
        row = {"float": {**summary_row(fc, time.perf_counter() - t), "n": float_n}}
        cache = FloatCache(tmp / f"float-{sigma}.tsv")
        # f's labels on the ζ samples: paid once with the cache, like the float certificates (FloatLabelStore);
        # every IRS run below runs only f_q
        store = FloatLabelStore(tmp / f"float-{sigma}.labels", cache, "onnxruntime")
        t = time.perf_counter()
        drawn = fill_label_store(store, f_runner, cache, x_test, idx, max(n_ps), 10, batch_size=400)
        row["float_labels"] = {"seconds": time.perf_counter() - t, "samples": drawn, "n_p": max(n_ps)}
        timing = tmp / f"float-{sigma}.timing.json"
        if timing.exists():  # the float work was done by an earlier run: report the seconds it took then
            prior = json.loads(timing.read_text())
            if prior["n_p"] >= max(n_ps):
                row["float"]["seconds"] = prior["float_seconds"]
                row["float"]["s_per_image"] = prior["float_seconds"] / len(idx)
                row["float_labels"] |= {"seconds": prior["labels_seconds"] * max(n_ps) / prior["n_p"],
                                        "reused": True}
        else:
            write_json(timing, {"float_seconds": row["float"]["seconds"], "n_p": max(n_ps), "images": len(idx),
                                "labels_seconds": row["float_labels"]["seconds"]})
        for name in args.models.split(","):
            pol = policies[name]
            q_path = tmp / f"{name}-{sigma}.onnx"
            exp = export_and_validate(lm, pol, train, test, q_path, sigma=sigma, validate_images=200)
            q_runner = OrtRunner(q_path, batch_size=400)
            qmeta = {**meta, "model": str(q_path), "model_sha256": sha256_file(q_path)}
            smooth_q = Smooth(q_runner, 10, sigma, 400)
            # every run of f_q (the baseline at each N, IRS at each n_p and fallback N) is opened at once and fed
            # image by image in turn, so that drift in the machine's speed hits every run alike
            keys = [("full", n) for n in grid]
            irs_keys = list(dict.fromkeys(("irs", n_p, n_p if spec == "n_p" else int(spec))
                                          for n_p in n_ps for spec in fallbacks))
            runs, certs, seconds = {}, {k: [] for k in keys + irs_keys}, dict.fromkeys(keys + irs_keys, 0.0)
            with contextlib.ExitStack() as stack:
                for kind, n, *fb in keys + irs_keys:
                    if kind == "full":
                        path, lmeta, cls = tmp / f"{name}-{sigma}-full-{n}.tsv", {**qmeta, "n": n}, CertifyLog
                    else:
                        path, cls = tmp / f"{name}-{sigma}-irs-{n}-fb{fb[0]}.tsv", IncrementalLog
                        lmeta = incremental_meta(cache, n, args.alpha, fb[0], model=qmeta["model"],
                                                 model_sha256=qmeta["model_sha256"], backend="onnxruntime")
                    path.unlink(missing_ok=True)  # timed afresh, never resumed
                    runs[(kind, n, *fb)] = stack.enter_context(cls(path, lmeta))
                order = list(runs)
                for j, i in enumerate(idx):
                    for key in order[j % len(order):] + order[: j % len(order)]:  # rotate who goes first
                        t = time.perf_counter()
                        if key[0] == "full":
                            got = certify_dataset(smooth_q, x_test, test.labels, [i], args.n0, key[1], args.alpha, 0,
                                                  runs[key], progress=False)
                        else:
                            got = certify_incremental_dataset(
                                f_runner, q_runner, cache, x_test, test.labels, [i], key[1], args.alpha, runs[key],
                                num_classes=10, batch_size=400, label_store=store, progress=False, fallback_n=key[2])
                        seconds[key] += time.perf_counter() - t
                        certs[key] += got
                    print(f"  image {j + 1}/{len(idx)}", end="\r" if j + 1 < len(idx) else "\n", flush=True)
            baseline = {n: summary_row(certs["full", n], seconds["full", n]) for n in grid}
            full_row = baseline[args.n]
            row[name] = {"bops_fraction": exp["bops_fraction"], "full": full_row,
                         "baseline": {str(n): r for n, r in baseline.items()}}
            for key in irs_keys:
                _, n_p, fb = key
                inc = certs[key]
                irs_row = {**summary_row(inc, seconds[key]), "n_p": n_p, "fallback_n": fb, "cost": cost_summary(inc)}
                labels_s = row["float_labels"]["seconds"] * n_p / max(n_ps)  # f's share at this n_p
                irs_row |= {"speedup": full_row["seconds"] / irs_row["seconds"],
                            "speedup_with_float_labels": full_row["seconds"] / (irs_row["seconds"] + labels_s),
                            "certified_accuracy_r0_diff_pp": 100 * (irs_row["certified_accuracy"]["0"]
                                                                    - full_row["certified_accuracy"]["0"]),
                            "certified_accuracy_max_abs_diff_pp": max_diff_pp(irs_row, full_row)}
                if len(grid) > 1:
                    irs_row["equal_acr"] = equal_acr(baseline, irs_row, labels_s)
                first = key == irs_keys[0]
                row[name]["irs" if first else f"irs_n_p_{n_p}" + (f"_fallback_{fb}" if len(fallbacks) > 1 else "")] = \
                    irs_row
                print(f"σ={sigma} {name}: full {full_row['s_per_image']:.2f} s/img ACR {full_row['acr']:.3f} "
                      f"cert {list(full_row['certified_accuracy'].values())} | IRS n_p={n_p} fallback N={fb} "
                      f"{irs_row['s_per_image']:.2f} s/img ACR {irs_row['acr']:.3f} "
                      f"cert {list(irs_row['certified_accuracy'].values())} (irs path "
                      f"{irs_row['cost']['irs_fraction']:.0%}) | speed-up {irs_row['speedup']:.2f}x "
                      f"({irs_row['speedup_with_float_labels']:.2f}x counting f's labels)", flush=True)
                if "equal_acr" in irs_row:
                    e = irs_row["equal_acr"]
                    print(f"    equal ACR: the baseline needs {e['kind']} {e['baseline_seconds']:.1f} s (N ≈ "
                          f"{e['baseline_n']:.0f}): {e['speedup']:.2f}x ({e['speedup_with_float_labels']:.2f}x "
                          f"counting f's labels); certified accuracy there {list(e['certified_accuracy'].values())}",
                          flush=True)
        results["sigmas"][str(sigma)] = row
        write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
