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
"""

from __future__ import annotations

import argparse
import json
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", default=str(RESULTS / "adaptive_bench_sequential_100img.json"))
    ap.add_argument("--replicates", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "sequential_schedule_sim.json"))
    args = ap.parse_args(argv)

    from arq_deploy.core.fileio import write_json
    from arq_deploy.core.host import host_info

    t0 = time.perf_counter()
    bench = json.loads(Path(args.bench).read_text())
    sc = bench["scale"]
    out = {"what": "sequential certification schedules replayed on binomial draws at each input's measured rate "
                   "(a simulation, not a certification run), against fixed-N CERTIFY drawn the same way",
           "source": Path(args.bench).name, "n": sc["n"], "n0": sc["n0"], "alpha": sc["alpha"],
           "replicates": args.replicates, "sigmas": {}}
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
    out["host"] = host_info()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(Path(args.out), out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
