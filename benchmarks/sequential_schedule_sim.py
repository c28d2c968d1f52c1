"""Which look schedule should sequential certification use? A simulation on measured success rates.

`adaptive_bench.py --modes sequential` records, per input, c_A's hits among the estimation samples it drew. Here each
input's rate p̂ = hits / samples is taken as its p_A, and `certify.sequential.decide_at_radii` (the code the CLI runs)
is replayed on binomial draws at that rate under several look schedules (first look, look ratio, the share of α on
the cap, the futility level β), beside fixed-N CERTIFY drawn the same way (k ~ Bin(N, p̂), certified at r when the
one-sided Clopper-Pearson bound at α reaches Φ(r/σ)). Per schedule: mean model evaluations per input (n0 + samples;
fixed N costs n0 + N), and the expected certified accuracy at each radius against fixed N's, over `--replicates`
draws per input.

This is a simulation around measured rates, not a certification run: inputs that stopped at the first look have a
rough p̂, but they are far from every threshold (that is why they stopped), and the inputs that decide the cost ran
long enough for p̂ to be sharp. Every schedule keeps the guarantee (any stopping rule does; β only sets abstentions).

    python benchmarks/sequential_schedule_sim.py [--bench benchmarks/results/adaptive_bench_sequential_100img.json]
        [--replicates 200] [--out benchmarks/results/sequential_schedule_sim.json]

With `--adaptive`, the same replay for adaptive radius estimation (`certify --adaptive`): each input's rate is fixed
N's (hits / 100,000 in a run that holds fixed N, e.g. the merged 100-image JSON), `certify.sequential.estimate_radius`
runs on binomial draws at that rate for each (look schedule, tolerance) in ADAPTIVE_CONFIGS, and fixed-N CERTIFY is
drawn beside it: the expected ACR gap and the evaluation ratio per configuration, which is how the default
`--tolerance` was chosen (a 100,000-sample run per σ and tolerance costs 20 to 80 minutes here; the replay, seconds).

    python benchmarks/sequential_schedule_sim.py --adaptive
        [--bench benchmarks/results/adaptive_bench_sequential_vs_fixed_100img.json]
        [--out benchmarks/results/adaptive_tolerance_sim.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
# (first_n, ratio, final_share, futility β, looks near the cap): the old default first, one change at a time, what
# `certify --radii` runs now (radii_schedule with FUTILITY_BETA), and two more aggressive ones
SCHEDULES = [(500, 2.0, 0.5, 0.01, True), (500, 2.0, 0.5, 0.05, True), (500, 1.5, 0.5, 0.01, False),
             (500, 1.5, 0.25, 0.05, False), (500, 2.0, 0.5, 0.1, True), (250, 1.5, 0.25, 0.1, False)]


def simulate(p: np.ndarray, correct: np.ndarray, sigma: float, radii, n: int, n0: int, alpha: float, sched,
             replicates: int, seed: int) -> dict:
    from scipy.stats import norm

    from arq_deploy.certify.sequential import FUTILITY_BETA, ROBUST, decide_at_radii, look_schedule, radii_schedule
    from arq_deploy.certify.stats import cp_lower

    first_n, ratio, share, beta, near_cap = sched
    schedule = look_schedule(alpha, n, first_n, ratio, share, near_cap)
    rng = np.random.default_rng(seed)
    thresholds = norm.cdf(np.asarray(radii) / sigma)
    evals = np.zeros((replicates, len(p)))
    seq_cert = np.zeros((replicates, len(radii)))
    fix_cert = np.zeros((replicates, len(radii)))
    for rep in range(replicates):
        for i, (pi, ok) in enumerate(zip(p, correct)):
            d = decide_at_radii(lambda num, pi=pi: int(rng.binomial(num, pi)), sigma, radii, schedule, futility=beta)
            evals[rep, i] = n0 + d.samples
            if ok:
                seq_cert[rep] += [x == ROBUST for x in d.decisions]
                fix_cert[rep] += cp_lower(int(rng.binomial(n, pi)), n, alpha) >= thresholds
    per_rep = evals.mean(axis=1)
    gap = 100.0 * (seq_cert - fix_cert) / len(p)
    shipped = schedule == radii_schedule(alpha, n, first_n) and beta == FUTILITY_BETA
    return {"first_n": first_n, "ratio": ratio, "final_share": share, "futility_beta": beta,
            "looks_near_cap": near_cap, "certify_radii_default": shipped,
            "looks": list(schedule.looks), "evaluations_mean": float(per_rep.mean()),
            "evaluations_mean_sd_over_replicates": float(per_rep.std()),
            "fewer_than_fixed": (n0 + n) / float(per_rep.mean()),
            "certified_accuracy_gap_pp_mean": {format(r, "g"): float(g) for r, g in zip(radii, gap.mean(axis=0))},
            "certified_accuracy_gap_pp_worst_radius_mean": float(np.abs(gap.mean(axis=0)).max()),
            "share_of_replicates_within_1pp_at_every_radius": float((np.abs(gap) <= 1.0).all(axis=1).mean())}


# (first_n, ratio, final_share, tolerance): the adaptive default (doubling looks, half of α on the cap) at four
# tolerances, then finer looks, more of α on the cap, and a smaller first look
ADAPTIVE_CONFIGS = [(500, 2.0, 0.5, t) for t in (0.02, 0.015, 0.0125, 0.01)] \
    + [(500, 1.5, 0.5, t) for t in (0.015, 0.0125, 0.01)] + [(500, 2.0, 0.75, t) for t in (0.015, 0.0125)] \
    + [(250, 1.5, 0.5, t) for t in (0.0125, 0.01)]


def simulate_adaptive(p: np.ndarray, correct: np.ndarray, sigma: float, n: int, n0: int, alpha: float, config,
                      replicates: int, seed: int) -> dict:
    """Expected ACR of `estimate_radius` under one (schedule, tolerance) against fixed-N CERTIFY, both drawn at the
    rates p, and the mean evaluations per input (n0 + samples; fixed N costs n0 + N)."""
    from arq_deploy.certify.sequential import estimate_radius, look_schedule
    from arq_deploy.certify.stats import cp_lower, radius
    from arq_deploy.core.config import CertifyConfig

    first_n, ratio, share, tol = config
    schedule = look_schedule(alpha, n, first_n, ratio, share)
    rng = np.random.default_rng(seed)
    evals, acr_a, acr_f, at_cap = (np.zeros(replicates) for _ in range(4))
    for rep in range(replicates):
        for pi, ok in zip(p, correct):
            e = estimate_radius(lambda num, pi=pi: int(rng.binomial(num, pi)), sigma, schedule, tol)
            evals[rep] += n0 + e.samples
            at_cap[rep] += not e.early
            if ok:
                acr_a[rep] += e.radius
                lo = cp_lower(int(rng.binomial(n, pi)), n, alpha)
                acr_f[rep] += radius(sigma, lo) if lo > 0.5 else 0.0
    evals, gap = evals / len(p), (acr_a - acr_f) / len(p)
    return {"first_n": first_n, "ratio": ratio, "final_share": share, "tolerance": tol,
            "certify_adaptive_default": config == (500, 2.0, 0.5, CertifyConfig.DEFAULT_TOLERANCE),
            "looks": list(schedule.looks), "evaluations_mean": float(evals.mean()),
            "fewer_than_fixed": (n0 + n) / float(evals.mean()), "inputs_at_cap_mean": float(at_cap.mean()),
            "acr_gap_mean": float(gap.mean()), "acr_gap_sd_over_replicates": float(gap.std()),
            "share_of_replicates_meeting_goal": float(((np.abs(gap) <= 0.01) & ((n0 + n) / evals >= 3)).mean())}


def _start(args, what: str) -> tuple[dict, dict]:
    """The benchmark JSON to replay, and the output's head (what, source, scale, replicates)."""
    bench = json.loads(Path(args.bench).read_text())
    sc = bench["scale"]
    return bench, {"what": what, "source": Path(args.bench).name, "n": sc["n"], "n0": sc["n0"], "alpha": sc["alpha"],
                   "replicates": args.replicates, "sigmas": {}}


def _finish(out: dict, path: str, t0: float) -> None:
    from arq_deploy.core.fileio import write_json
    from arq_deploy.core.host import host_info

    out["host"] = host_info()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(Path(path), out)
    print(f"wrote {path}")


def main_adaptive(args) -> None:
    t0 = time.perf_counter()
    bench, out = _start(args, "adaptive radius estimation (estimate_radius) replayed on binomial draws at each "
                              "input's fixed-N rate (a simulation, not a certification run), against fixed-N CERTIFY "
                              "drawn the same way")
    sc = bench["scale"]
    for sg, r in bench["sigmas"].items():
        if "fixed" not in r or "per_input" not in r["fixed"]:
            continue
        rows = np.asarray(r["fixed"]["per_input"], dtype=np.float64)
        correct, p = rows[:, 1].astype(bool), rows[:, 3] / rows[:, 4]
        res = []
        for config in ADAPTIVE_CONFIGS:
            s = simulate_adaptive(p, correct, float(sg), sc["n"], sc["n0"], sc["alpha"], config, args.replicates,
                                  args.seed)
            res.append(s)
            print(f"σ={sg} first {config[0]} ratio {config[1]} cap share {config[2]} tolerance {config[3]}"
                  + (" (certify --adaptive)" if s["certify_adaptive_default"] else "")
                  + f": ACR gap {s['acr_gap_mean']:+.4f} (sd {s['acr_gap_sd_over_replicates']:.4f}), "
                  f"{s['fewer_than_fixed']:.2f}x fewer evaluations", flush=True)
        measured = {m: {"acr": r[m]["acr"], "evaluations_mean": r[m]["evaluations_mean"]}
                    for m in ("fixed", "adaptive") if m in r}
        out["sigmas"][sg] = {"images": len(p), "measured": measured, "configs": res}
    if not out["sigmas"]:
        sys.exit(f"error: {args.bench} holds no fixed-N run with per-input counts to replay")
    _finish(out, args.out, t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", default=None, help="[adaptive_bench_sequential_100img.json; with --adaptive, "
                                                   "adaptive_bench_sequential_vs_fixed_100img.json]")
    ap.add_argument("--replicates", type=int, default=None, help="[200; with --adaptive, 40]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="[sequential_schedule_sim.json; adaptive_tolerance_sim.json]")
    ap.add_argument("--adaptive", action="store_true", help="replay adaptive radius estimation instead")
    args = ap.parse_args(argv)
    if args.adaptive:
        args.bench = args.bench or str(RESULTS / "adaptive_bench_sequential_vs_fixed_100img.json")
        args.out = args.out or str(RESULTS / "adaptive_tolerance_sim.json")
        args.replicates = args.replicates or 40
        return main_adaptive(args)
    args.bench = args.bench or str(RESULTS / "adaptive_bench_sequential_100img.json")
    args.out = args.out or str(RESULTS / "sequential_schedule_sim.json")
    args.replicates = args.replicates or 200
    t0 = time.perf_counter()
    bench, out = _start(args, "sequential certification schedules replayed on binomial draws at each input's "
                              "measured rate (a simulation, not a certification run), against fixed-N CERTIFY drawn "
                              "the same way")
    sc = bench["scale"]
    for sg, r in bench["sigmas"].items():
        rows = np.asarray(r["sequential"]["per_input"], dtype=np.float64)
        correct, hits, samples = rows[:, 1].astype(bool), rows[:, 3], rows[:, 4]
        p = np.where(samples > 0, hits / np.maximum(samples, 1), 0.0)
        radii = tuple(r["radii_decided"])
        res = []
        for sched in SCHEDULES:
            s = simulate(p, correct, float(sg), radii, sc["n"], sc["n0"], sc["alpha"], sched, args.replicates,
                         args.seed)
            res.append(s)
            print(f"σ={sg} first {sched[0]} ratio {sched[1]} cap share {sched[2]} β {sched[3]}"
                  + (" (certify --radii)" if s["certify_radii_default"] else "") + ": "
                  f"{s['evaluations_mean']:,.0f} evaluations/input ({s['fewer_than_fixed']:.1f}x fewer), gap "
                  + " / ".join(f"{g:+.2f}" for g in s["certified_accuracy_gap_pp_mean"].values())
                  + f" pp, within 1 pp in {100 * s['share_of_replicates_within_1pp_at_every_radius']:.0f}% of draws",
                  flush=True)
        out["sigmas"][sg] = {"images": len(p), "radii": list(radii),
                             "measured_evaluations_mean": r["sequential"]["evaluations_mean"], "schedules": res}
    _finish(out, args.out, t0)


if __name__ == "__main__":
    main()
