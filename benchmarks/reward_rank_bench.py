"""How well cheap search rewards rank mixed-precision policies, and what each costs in model evaluations.

ResNet-20 gauss0.25 on the lossless CIFAR-10 training images (the search's validation subset), `--policies` random
mixed policies (seeded: per policy a floor b ~ U{2..6}, then each layer's weight and activation bits ~ U{b..8}, so the
policies range from near-float to broken). For every policy one calibrated QDQ ONNX graph is built and scored, in
onnxruntime, by each reward kind of `arq_deploy.search.reward`, interleaved policy by policy:

  full       ACR of CERTIFY(f_q) with n0 + N samples per image (the reference ranking)
  irs        today's ARQ reward: IRS with n_p disagreement samples per image the float model certified correctly
  irs-small  the IRS reward with a small n_p (`--small-n-p`): the obvious cheap control
  adaptive-T the adaptive reward (anytime-valid confidence sequences, cap n_p, first look --first-n), tolerance T

Reported per kind: Spearman ρ (scipy) of its rewards against the full-N rewards over the policies, mean f_q model
evaluations per reward (counted at the runner, and as each reward records them in `samples`), seconds per reward.
The float model's one-off cost (CERTIFY with n0 + N per image, and its labels on the IRS noise) is recorded apart: it
is paid once per search, not per reward. Goals (issue item 4): a reward >= 3x cheaper in samples than the IRS reward
with ρ >= 0.9 against the full-N reward.

    python benchmarks/reward_rank_bench.py [--images 12] [--policies 12] [--n 500] [--n-p 200]
        [--tolerances 0.05,0.15] [--first-n 25] [--small-n-p 64] [--out benchmarks/results/reward_rank_bench.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def random_policies(names, count: int, seed: int):
    from arq_deploy.core.policy import QuantPolicy

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        floor = int(rng.integers(2, 7))
        bits = [(int(rng.integers(floor, 9)), int(rng.integers(floor, 9))) for _ in names]
        out.append(QuantPolicy.for_layers(names, bits))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--policies", type=int, default=12)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=500, help="CERTIFY samples of the full reward (and the float model)")
    ap.add_argument("--n-p", type=int, default=200, help="IRS samples per image; the adaptive reward's cap")
    ap.add_argument("--small-n-p", type=int, default=64, help="n_p of the irs-small control (0: leave it out)")
    ap.add_argument("--tolerances", default="0.05,0.15", help="adaptive rewards' radius tolerances")
    ap.add_argument("--first-n", type=int, default=25)
    ap.add_argument("--calib-images", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reward_rank_bench.json"))
    args = ap.parse_args(argv)

    import torch

    from arq_deploy.core.data import load_dataset
    from arq_deploy.core.fileio import write_json
    from arq_deploy.core.host import host_info
    from arq_deploy.export.pipeline import load
    from arq_deploy.runtime.runners import CountingRunner
    from arq_deploy.search.reward import RewardConfig, RewardEvaluator

    torch.set_num_threads(2)
    host = host_info()
    shared = Path(args.shared)
    lm = load("resnet20", str(shared / "models" / f"resnet20-gauss{args.sigma:.2f}.pt"))
    lm.model.eval()
    train = load_dataset(str(shared / "cifar10" / "cifar-10-batches-py"), "train")
    base = {"sigma": args.sigma, "images": args.images, "calib_images": args.calib_images, "n0": args.n0, "n": args.n,
            "n_p": args.n_p, "seed": args.seed}
    kinds = {"full": RewardConfig(kind="full", **base), "irs": RewardConfig(kind="irs", **base)}
    if args.small_n_p:
        kinds["irs-small"] = RewardConfig(kind="irs", **(base | {"n_p": args.small_n_p}))
    for t in (float(v) for v in args.tolerances.split(",") if v):
        kinds[f"adaptive-{t:g}"] = RewardConfig(kind="adaptive", first_n=args.first_n, tolerance=t, **base)
    work = Path(tempfile.mkdtemp(prefix="reward-rank-"))
    evs, float_info = {}, {}
    t0 = time.perf_counter()
    for key, cfg in kinds.items():
        ev = RewardEvaluator(lm, train, cfg)
        cache = work / ("small" if cfg.n_p != args.n_p else "main")
        cache.mkdir(exist_ok=True)
        if cache.name == "small" and (work / "main" / "float-cert.tsv").exists():  # same float certificates
            shutil.copy(work / "main" / "float-cert.tsv", cache / "float-cert.tsv")
        t = time.perf_counter()
        float_info[key] = ev.prepare(cache) | {"seconds": time.perf_counter() - t}
        evs[key] = ev
    print(f"float model prepared in {time.perf_counter() - t0:.0f} s: ACR {float_info['full']['acr']:.3f}",
          file=sys.stderr, flush=True)
    first = next(iter(evs.values()))
    policies = random_policies(first.names, args.policies, args.seed)
    rows = {key: [] for key in kinds}
    build_seconds = []
    for p, policy in enumerate(policies):
        t = time.perf_counter()
        counted = CountingRunner(first.quantized_runner(policy))
        build_seconds.append(time.perf_counter() - t)
        for key, ev in evs.items():
            before, t = counted.evaluations, time.perf_counter()
            reward, info = ev.score(counted)
            rows[key].append({"reward": reward, "samples": int(info["samples"]),
                              "counted": counted.evaluations - before, "seconds": time.perf_counter() - t}
                             | {k: info[k] for k in ("samples_per_input", "early_stops", "irs_bound_inputs")
                                if k in info})
        print(f"policy {p + 1}/{len(policies)} ({time.perf_counter() - t0:.0f} s): "
              + ", ".join(f"{k} {r[-1]['reward']:.3f}/{r[-1]['counted']}" for k, r in rows.items()),
              file=sys.stderr, flush=True)
        if p >= 2:  # the results so far, rewritten after every policy (a run cut short still leaves its numbers)
            write_json(args.out, results(args, rows, policies[: p + 1], first.names, float_info, host, build_seconds,
                                         time.perf_counter() - t0))
    result = results(args, rows, policies, first.names, float_info, host, build_seconds, time.perf_counter() - t0)
    result["host"]["load_average_at_end"] = host_info()["load_average"]
    write_json(args.out, result)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"kinds": result["kinds"], "goals": result["goals"]}, indent=1))
    print(f"wrote {args.out} in {result['wall_seconds']:.0f} s")


def results(args, rows, policies, names, float_info, host, build_seconds, wall) -> dict:
    """The JSON of the policies scored so far: per kind ρ against full, samples and seconds per reward; goals."""
    import torch
    from scipy.stats import spearmanr

    full = [r["reward"] for r in rows["full"]]
    summary = {}
    for key, rs in rows.items():
        rs = rs[: len(full)]
        rewards = [r["reward"] for r in rs]
        rho = spearmanr(rewards, full).statistic if np.std(rewards) > 0 and np.std(full) > 0 else float("nan")
        summary[key] = {"spearman_vs_full": float(rho), "samples_per_reward": float(np.mean([r["counted"] for r in rs])),
                        "recorded_samples_per_reward": float(np.mean([r["samples"] for r in rs])),
                        "seconds_per_reward": float(np.mean([r["seconds"] for r in rs])),
                        "mean_reward": float(np.mean(rewards))}
    irs_samples = summary["irs"]["samples_per_reward"]
    for s in summary.values():
        s["cheaper_than_irs"] = irs_samples / s["samples_per_reward"] if s["samples_per_reward"] else None
    adaptive = {k: s for k, s in summary.items() if k.startswith("adaptive")}
    goals = {k: {"cheaper_than_irs_x": s["cheaper_than_irs"], "spearman": s["spearman_vs_full"],
                 "met": bool(s["cheaper_than_irs"] >= 3 and s["spearman_vs_full"] >= 0.9)} for k, s in adaptive.items()}
    return {
        "host": dict(host), "torch_threads": torch.get_num_threads(), "runtime": "onnxruntime (QDQ graph of each policy)",
        "model": f"resnet20-gauss{args.sigma:.2f}",
        "scale": {"images": args.images, "policies": len(policies), "policies_planned": args.policies, "n0": args.n0, "n": args.n, "n_p": args.n_p,
                  "small_n_p": args.small_n_p, "first_n": args.first_n, "calib_images": args.calib_images,
                  "alpha": 0.001, "alpha_zeta": 0.001, "seed": args.seed,
                  "policy_sampling": "per policy floor b ~ U{2..6}; each layer's w and a bits ~ U{b..8}"},
        "float_model": {"acr": float_info["full"]["acr"], "clean_accuracy": float_info["full"]["clean_accuracy"],
                        "one_off_evaluations": {"certify": args.images * (args.n0 + args.n),
                                                "irs_labels": args.images * args.n_p}},
        "kinds": summary, "goals": goals,
        "per_policy": [{"bits": [[b.w_bits, b.a_bits] for b in (pol.bits(n) for n in names)],
                        **{k: rows[k][i] for k in rows}} for i, pol in enumerate(policies)],
        "policy_build_seconds_mean": float(np.mean(build_seconds)), "wall_seconds": wall,
    }


if __name__ == "__main__":
    main()
