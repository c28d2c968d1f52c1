"""Fixed-N CERTIFY against anytime-valid sequential certification (--radii) and adaptive radius estimation
(--adaptive) on ResNet-20 gauss0.25 and gauss0.50: certified accuracy at r = 0.25 / 0.5 / 0.75 / 1.0, ACR, model
evaluations (n0 + estimation samples) per input, wall time.

All three run on the same model, the same images and the same onnxruntime fp32 runner (`OrtRunner.counts`, the seeded
Philox stream), interleaved image by image so that other load on the machine hits them alike. The sequential and
adaptive runs use `certify/sequential.py` with the fixed run's N as their cap (--max-n), so "fixed N" is what they are
compared with and what they can at most reach. Every model evaluation is counted by a wrapper around the runner.

Sequential decisions are asked only at the radii the cap can certify at all (σ·Φ⁻¹ of the cap's bound with every sample
on c_A; e.g. 0.79 at σ = 0.25 and N = 10,000): above that, fixed N certifies nothing either, and the JSON says which
radii were left out.

    python benchmarks/adaptive_bench.py [--images 40] [--n 10000] [--sigmas 0.25,0.5] [--alpha 0.001]
        [--first-n 500] [--tolerance 0.015] [--out benchmarks/results/adaptive_bench.json]

The issue's setting (N = 100,000 on 100 images) takes about 40 minutes per model for fixed N alone on a 2-core CPU;
--images and --n set the scale, and the JSON records the one used.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RADII = (0.25, 0.5, 0.75, 1.0)
MODES = ("fixed", "sequential", "adaptive")
EARLIER_BETA = 0.01  # the futility level sequential mode used with the doubling grid


def summary(certs, evaluations, seconds, sequential_radii=None) -> dict:
    from arq_deploy.certify.stats import summarize

    s = summarize(certs, (0.0, *RADII))
    ev = np.asarray(evaluations, dtype=np.float64)
    out = {"certified_accuracy": {format(r, "g"): a for r, a in zip(s.radii, s.certified_accuracy)}, "acr": s.acr,
           "abstain_rate": s.abstain_rate, "evaluations_mean": float(ev.mean()),
           "evaluations_median": float(np.median(ev)), "evaluations_max": int(ev.max()), "seconds": seconds,
           "seconds_per_image": seconds / len(certs)}
    if sequential_radii is not None:  # certified at r: correct and decided robust at r (abstain/not robust: not)
        out["certified_accuracy"] = {"0": s.certified_accuracy[0], **{
            format(r, "g"): (sum(c.correct and c.decision_at(r) == "robust" for c in certs) / len(certs)
                             if r in sequential_radii else None) for r in RADII}}
        out["decisions"] = {format(r, "g"): {d: sum(c.decision_at(r) == d for c in certs)
                                             for d in ("robust", "not-robust", "abstain")} for r in sequential_radii}
        out["decisions_per_input"] = [{format(r, "g"): c.decision_at(r) for r in sequential_radii} for c in certs]
        del out["acr"]  # a step function of the requested radii, not comparable with a radius estimate
    # per input, where the evaluations went: index, correct, evaluations, c_A's hits among the estimation samples,
    # estimation samples
    out["per_input"] = [[c.idx, int(c.correct), int(e), c.count_a, c.n] for c, e in zip(certs, evaluations)]
    return out


def run_sigma(args, shared: Path, sigma: float, test, tmp: Path) -> dict:
    from arq_deploy.certify.sequential import (
        FUTILITY_BETA,
        certify_adaptive,
        certify_sequential,
        look_schedule,
        max_radius,
        radii_schedule,
    )
    from arq_deploy.certify.smooth import Smooth
    from arq_deploy.export.pipeline import load
    from arq_deploy.export.qdq import float_onnx, save_onnx
    from arq_deploy.runtime.noise import input_seed
    from arq_deploy.runtime.runners import CountingRunner, OrtRunner

    name = f"resnet20-gauss{sigma:.2f}"
    lm = load("resnet20", str(shared / "models" / f"{name}.pt"))
    lm.model.eval()
    onnx_path = tmp / f"{name}.onnx"
    save_onnx(float_onnx(lm.model, lm.input_shape), onnx_path)
    counted = CountingRunner(OrtRunner(onnx_path, batch_size=args.batch_size))
    smooth = Smooth(counted, 10, sigma, batch_size=args.batch_size)
    schedule = look_schedule(args.alpha, args.n, args.first_n)  # adaptive estimation
    # sequential at given radii: what certify --radii runs, or the doubling grid it ran before (with β = 0.01)
    seq_schedule = (radii_schedule(args.alpha, args.n, args.first_n) if args.sequential_grid == "radii"
                    else schedule)
    beta = FUTILITY_BETA if args.sequential_grid == "radii" else EARLIER_BETA
    top = max_radius(sigma, seq_schedule)
    radii = tuple(r for r in RADII if r <= top)
    step = 1000 // args.images
    idx = np.arange(args.offset, 1000, step)[: args.images]
    x_all, labels = test.x(idx), test.labels
    runs = {m: ([], [], 0.0) for m in MODES if m in args.modes}

    def timed(key, fn):
        certs, evals, secs = runs[key]
        before, t = counted.evaluations, time.perf_counter()
        certs.append(fn())
        runs[key] = (certs, evals + [counted.evaluations - before], secs + time.perf_counter() - t)
        if args.progress_log:  # one line per input as it finishes: a run cut short still leaves its inputs
            c = certs[-1]
            with open(args.progress_log, "a") as f:
                f.write(f"{sigma}\t{key}\t{c.idx}\t{int(c.correct)}\t{runs[key][1][-1]}\t"
                        f"{c.count_a}\t{c.n}\n")

    t0 = time.perf_counter()
    for k, i in enumerate(idx):
        x, seed, label = x_all[k], input_seed(args.seed, int(i)), int(labels[i])
        at = {"seed": seed, "label": label, "idx": int(i)}
        if "fixed" in runs:
            timed("fixed", lambda x=x, at=at: smooth.certify(x, args.n0, args.n, args.alpha, **at))
        if "sequential" in runs:
            timed("sequential", lambda x=x, at=at: certify_sequential(smooth, x, args.n0, radii, seq_schedule,
                                                                     futility=beta, **at))
        if "adaptive" in runs:
            timed("adaptive", lambda x=x, at=at: certify_adaptive(smooth, x, args.n0, schedule, args.tolerance, **at))
        if (k + 1) % 5 == 0:
            ev = {key: np.mean(v[1]) for key, v in runs.items()}
            print(f"  σ={sigma} {k + 1}/{len(idx)} images, {time.perf_counter() - t0:.0f} s, evaluations/input "
                  + ", ".join(f"{key} {e:,.0f}" for key, e in ev.items()), file=sys.stderr, flush=True)
    res = {"model": name, "radii_decided": list(radii), "radii_beyond_cap": [r for r in RADII if r > top],
           "max_certifiable_radius": top, "looks": list(schedule.looks), "look_alphas": list(schedule.alphas),
           "sequential_looks": list(seq_schedule.looks), "sequential_look_alphas": list(seq_schedule.alphas),
           "futility_beta": beta}
    for key, (certs, evals, secs) in runs.items():
        res[key] = summary(certs, evals, secs, radii if key == "sequential" else None)
    if "adaptive" in res:
        res["adaptive"]["tolerance"] = args.tolerance
    if "fixed" not in runs:  # no reference in this run: counts only
        return res
    res["goals"] = goals(res, sigma, args.alpha)
    return res


def goals(res: dict, sigma: float, alpha: float) -> dict:
    """The issue's goals for one σ's entry holding a fixed-N reference: the sequential mode's certified-accuracy gap
    per radius (pp) and evaluation ratio, the adaptive mode's ACR gap and ratio, and per radius the inputs on which
    the sequential decision and fixed N disagree (image index, fixed N's hit rate, the sequential run's)."""
    f, s, a = res["fixed"], res.get("sequential"), res.get("adaptive")
    out = {}
    if s is not None:
        asked = {format(r, "g") for r in res["radii_decided"]}  # the requested radii (not r = 0: never tested)
        gaps = {r: round(100 * (s["certified_accuracy"][r] - f["certified_accuracy"][r]), 6)
                for r in s["certified_accuracy"] if r in asked and s["certified_accuracy"][r] is not None}
        out.update({
            "sequential_certified_accuracy_gap_pp": gaps,
            "sequential_max_abs_gap_pp": max(abs(g) for g in gaps.values()),
            "sequential_evaluation_ratio": f["evaluations_mean"] / s["evaluations_mean"],
            "sequential_met": max(abs(g) for g in gaps.values()) <= 1.0
            and f["evaluations_mean"] / s["evaluations_mean"] >= 20})
        if "per_input" in f and "per_input" in s and "decisions_per_input" in s:
            out["sequential_disagreements"] = disagreements(res, sigma, alpha)
    if a is not None:
        out.update({
            "adaptive_acr_gap": a["acr"] - f["acr"],
            "adaptive_evaluation_ratio": f["evaluations_mean"] / a["evaluations_mean"],
            "adaptive_met": abs(a["acr"] - f["acr"]) <= 0.01 and f["evaluations_mean"] / a["evaluations_mean"] >= 3})
    return out


def disagreements(res: dict, sigma: float, alpha: float) -> dict:
    """Per decided radius r, the inputs fixed N certifies at r that the sequential run does not (lost) and the other
    way round (gained): [image index, fixed N's hit rate, sequential hit rate, sequential evaluations]. Fixed N's
    certificate is CERTIFY's, rebuilt from its recorded count (`stats.cp_lower`, `stats.radius`, abstain at
    p̲ ≤ 1/2) and counted at r as `stats.summarize` counts it (radius ≥ r)."""
    from arq_deploy.certify.stats import cp_lower, radius

    def certified(correct: int, k: int, n: int, r: float) -> bool:
        pa = cp_lower(k, n, alpha)
        return bool(correct) and pa > 0.5 and radius(sigma, pa) >= r

    fixed = {row[0]: row for row in res["fixed"]["per_input"]}
    s = res["sequential"]
    out = {}
    for r in res["radii_decided"]:
        key, lost, gained = format(r, "g"), [], []
        for row, dec in zip(s["per_input"], s["decisions_per_input"], strict=True):
            idx, correct, ev, k, n = row
            fk, fn = fixed[idx][3], fixed[idx][4]
            by_fixed = certified(fixed[idx][1], fk, fn, r)
            by_seq = bool(correct) and dec[key] == "robust"
            if by_fixed != by_seq:
                (lost if by_fixed else gained).append([idx, round(fk / fn, 5), round(k / max(n, 1), 5), ev])
        out[key] = {"lost": lost, "gained": gained}
    return out


def merge(paths: list[str], out: str) -> None:
    """One JSON from runs of the same images, σ and N in separate invocations (e.g. fixed N alone, sequential
    alone): per σ the modes of all of them, and the goals where one holds fixed N."""
    from arq_deploy.core.fileio import write_json

    runs = [json.loads(Path(p).read_text()) for p in paths]
    keys = ("images", "image_offset", "n", "n0", "alpha", "first_n", "seed")
    for r in runs:  # runs recorded before the seed was: the default, 0 (no recorded command set another)
        r["scale"].setdefault("seed", 0)
        r["scale"].setdefault("image_offset", 0)
    for p, r in zip(paths[1:], runs[1:]):
        differ = [k for k in keys if r["scale"].get(k) != runs[0]["scale"].get(k)]
        if differ:
            sys.exit(f"error: {p} differs from {paths[0]} in {', '.join(differ)}: not the same runs")
    merged = dict(runs[0]) | {"merged_from": [str(p) for p in paths],
                              "modes": sorted({m for r in runs for m in r["modes"]})}
    merged["sigmas"] = {}
    for r in runs:
        for sg, entry in r["sigmas"].items():
            into = merged["sigmas"].setdefault(sg, {})
            for k, v in entry.items():
                if k == "adaptive":  # runs recorded before the entry held its tolerance: the run's
                    v = {"tolerance": r["scale"]["tolerance"]} | v
                if k in MODES or k not in into:
                    into[k] = v
    # the tolerance belongs to each adaptive entry: the first run's scale need not be the adaptive run's
    merged["scale"] = {k: v for k, v in merged["scale"].items() if k != "tolerance"}
    for sg, entry in merged["sigmas"].items():
        if "fixed" in entry:
            entry["goals"] = goals(entry, float(sg), merged["scale"]["alpha"])
    merged["wall_seconds"] = sum(r.get("wall_seconds", 0.0) for r in runs)
    write_json(out, merged)  # temp file, then rename
    print(json.dumps({sg: e.get("goals") for sg, e in merged["sigmas"].items()}, indent=1))
    print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--sigmas", default="0.25,0.5")
    ap.add_argument("--images", type=int, default=40, help="every (1000/images)-th lossless test image")
    ap.add_argument("--offset", type=int, default=0, help="the first of them (0 .. 1000/images - 1)")
    ap.add_argument("--sequential-grid", choices=("radii", "doubling"), default="radii",
                    help="sequential mode's looks: certify --radii's (radii_schedule, β = FUTILITY_BETA) or the "
                         "doubling grid with half of α on the cap and β = 0.01 (its earlier default)")
    ap.add_argument("--n", type=int, default=10_000, help="fixed N, and the cap of the sequential runs")
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--first-n", type=int, default=500)
    ap.add_argument("--tolerance", type=float, default=None, help="adaptive mode's [certify --adaptive's default]")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default=",".join(MODES),
                    help="which of fixed, sequential, adaptive to run (without fixed: evaluation counts only)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "adaptive_bench.json"))
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="merge these runs' JSONs (same images, σ and N) into --out and score the goals; runs nothing")
    ap.add_argument("--progress-log", default=None, metavar="TSV",
                    help="append each input's result (σ, mode, image, correct, evaluations, hits, n) as it finishes")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    if args.tolerance is None:
        from arq_deploy.core.config import CertifyConfig

        args.tolerance = CertifyConfig.DEFAULT_TOLERANCE
    args.modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not args.modes or any(m not in MODES for m in args.modes):
        sys.exit(f"error: --modes takes a comma-separated subset of {', '.join(MODES)}, got {args.modes}")

    import torch

    from arq_deploy.core.data import load_dataset
    from arq_deploy.core.host import host_info

    shared = Path(args.shared)
    test = load_dataset(str(shared / "cifar10" / "cifar-10-batches-py"), "test")
    tmp = Path(tempfile.mkdtemp(prefix="arq-adaptive-bench-"))
    t0 = time.perf_counter()
    host = host_info()
    out = {"host": host, "torch_threads": torch.get_num_threads(), "runtime": "onnxruntime fp32 (OrtRunner.counts)",
           "modes": list(args.modes), "sequential_grid": args.sequential_grid,
           "scale": {"images": args.images, "image_step": 1000 // args.images, "image_offset": args.offset,
                     "n": args.n, "n0": args.n0, "seed": args.seed,
                     "alpha": args.alpha, "first_n": args.first_n, "tolerance": args.tolerance,
                     "issue_setting": "N = 100,000 on 100 images (not run: about 40 min per model per mode here)"},
           "sigmas": {}}
    for sg in (float(s) for s in args.sigmas.split(",")):
        out["sigmas"][format(sg, "g")] = run_sigma(args, shared, sg, test, tmp)
        out["wall_seconds"] = time.perf_counter() - t0  # written after each σ, so a cut-short run keeps what it has
        out["host"]["load_average_at_end"] = host_info()["load_average"]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for sg, r in out["sigmas"].items():
        print(f"σ = {sg}: " + json.dumps({k: r[k] for k in (*MODES, "goals") if k in r}, indent=1))
    print(f"wrote {args.out} ({out['wall_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
