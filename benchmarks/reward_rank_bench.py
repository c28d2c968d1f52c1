"""How well cheap search rewards rank mixed-precision policies, and what each costs in model evaluations.

ResNet-20 gauss0.25 on the lossless CIFAR-10 training images (the search's validation subset), `--policies` random
mixed policies (seeded: per policy a floor b ~ U{2..6}, then each layer's weight and activation bits ~ U{b..8}, so the
policies range from near-float to broken). For every policy one calibrated QDQ ONNX graph is built and scored, in
onnxruntime, by each reward kind of `arq_deploy.search.reward`, interleaved policy by policy:

  full       ACR of CERTIFY(f_q) with n0 + N samples per image (the reference ranking)
  irs        today's ARQ reward: IRS with n_p disagreement samples per image the float model certified correctly
  irs-small  the IRS reward with a small n_p (`--small-n-p`): the obvious cheap control
  adaptive-T the adaptive reward (anytime-valid confidence sequences, cap n_p, first look --first-n), tolerance T
  adaptive-float-T  the same with stop = "float": an image also stops once its radius is within T of f's radius
  adaptive-capC-T   the adaptive reward with a lower cap C (`--low-cap`, first look --low-cap-first-n)
  full-retest       with `--retest-seed S`: the full reward again on the same images and quantized models, with the
                    noise of seed S: how well the reference ranking reproduces itself (its test-retest ρ bounds what
                    any reward can reach against it), and a second reference (ρ against the mean of both)

The IRS, small-n_p IRS and adaptive rewards all run f_q on prefixes of the same noise stream (seed, "irs"): a
`SharedRows` runner computes each row once per policy and the others replay it, while each reward is still charged
every row it asks for (`counted`, its cost alone; `computed` holds the rows actually run, so the seconds of a reward
that replayed rows are not its cost alone). Reported per kind: Spearman ρ (scipy) of its rewards against the full-N
rewards over the policies, mean f_q model evaluations per reward (counted at the runner, and as each reward records
them in `samples`), seconds per reward. The float model's one-off cost (CERTIFY with n0 + N per image, and its labels
on the IRS noise) is recorded apart: it is paid once per search, not per reward. Goals (issue item 4): a reward >= 3x
cheaper in samples than the IRS reward with ρ >= 0.9 against the full-N reward.

    python benchmarks/reward_rank_bench.py [--images 12] [--policies 12] [--n 500] [--n-p 200]
        [--tolerances 0.05,0.15] [--float-tolerances 0.1,0.15,0.2] [--first-n 25] [--small-n-p 64]
        [--low-cap 64] [--low-cap-first-n 16] [--low-cap-tolerances 0.05,0.1,0.15]
        [--out benchmarks/results/reward_rank_bench.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


class SharedRows:
    """A runner that runs each distinct input row once per policy and answers repeats from memory (keyed by the
    row's bytes): the IRS, small-n_p IRS and adaptive rewards all draw f_q's samples from the same noise stream (seed,
    "irs"), so after the IRS reward the others replay prefixes of what it computed. Wrapped in a `CountingRunner`, each
    reward is still charged every row it asks for (its cost as the only reward of a search); `computed` counts the
    rows actually run. `counts` (CERTIFY's own sampling, the full reward) passes through uncached."""

    def __init__(self, runner):
        self.runner, self.memory, self.computed = runner, {}, 0
        self.name, self.input_shape, self.num_classes = runner.name, runner.input_shape, runner.num_classes
        if callable(getattr(runner, "counts", None)):
            self.counts = self._counts

    def __call__(self, x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in x]
        missing: dict[bytes, int] = {}  # first row of each key not in memory
        for i, key in enumerate(keys):
            if key not in self.memory:
                missing.setdefault(key, i)
        if missing:
            logits = np.asarray(self.runner(x[list(missing.values())]))
            self.computed += len(missing)
            self.memory.update(zip(missing, logits))
        return np.stack([self.memory[key] for key in keys])

    def _counts(self, x, num, sigma, seed, purpose="estimation"):
        self.computed += int(num)
        return self.runner.counts(x, num, sigma, seed, purpose)


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
    ap.add_argument("--float-tolerances", default="0.1,0.15,0.2",
                    help="tolerances of adaptive rewards with stop = float (also stop near f's radius)")
    ap.add_argument("--low-cap", type=int, default=64, help="cap n_p of a second adaptive family (0: leave it out)")
    ap.add_argument("--low-cap-first-n", type=int, default=16, help="first look of the low-cap adaptive rewards")
    ap.add_argument("--low-cap-tolerances", default="0.05,0.1,0.15")
    ap.add_argument("--calib-images", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retest-seed", type=int, default=None,
                    help="also score the full reward with this noise seed (kind full-retest)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reward_rank_bench.json"))
    ap.add_argument("--cluster", type=float, default=0.02,
                    help="near-float policies: full-N reward within this of the best (ρ reported apart)")
    ap.add_argument("--rescore", default=None, help="recompute the summary of this finished JSON and exit")
    args = ap.parse_args(argv)
    if args.rescore:
        return rescore(args.rescore, args.cluster)

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
    for t in (float(v) for v in args.float_tolerances.split(",") if v):
        kinds[f"adaptive-float-{t:g}"] = RewardConfig(kind="adaptive", first_n=args.first_n, tolerance=t, stop="float",
                                                      **base)
    if args.low_cap:
        for t in (float(v) for v in args.low_cap_tolerances.split(",") if v):
            kinds[f"adaptive-cap{args.low_cap}-{t:g}"] = RewardConfig(
                kind="adaptive", first_n=args.low_cap_first_n, tolerance=t, **(base | {"n_p": args.low_cap}))
    if args.retest_seed is not None:
        if args.retest_seed == args.seed:
            ap.error("--retest-seed must differ from --seed")
        kinds["full-retest"] = RewardConfig(kind="full", **(base | {"seed": args.retest_seed}))
    settings = {key: {"kind": c.kind, "n_p": c.n_p} | ({"seed": c.seed} if key == "full-retest" else {})
                | ({"first_n": c.first_n, "tolerance": c.tolerance, "stop": c.stop} if c.kind == "adaptive" else {})
                for key, c in kinds.items()}
    work = Path(tempfile.mkdtemp(prefix="reward-rank-"))
    evs, float_info = {}, {}
    t0 = time.perf_counter()
    for key, cfg in kinds.items():
        if key == "full-retest":  # the same images and calibration set, other noise; the full reward needs nothing
            # of f prepared (the float model is the first full reward's)
            evs[key] = RewardEvaluator(lm, train, cfg, indices=(evs["full"].val_idx, evs["full"].calib_idx))
            continue
        ev = RewardEvaluator(lm, train, cfg)
        cache = work / f"n_p{cfg.n_p}"  # f's IRS labels per n_p; f's certificates are the same for all
        cache.mkdir(exist_ok=True)
        if cfg.n_p != args.n_p and (work / f"n_p{args.n_p}" / "float-cert.tsv").exists():
            shutil.copy(work / f"n_p{args.n_p}" / "float-cert.tsv", cache / "float-cert.tsv")
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
        shared = SharedRows(first.quantized_runner(policy))
        counted = CountingRunner(shared)
        build_seconds.append(time.perf_counter() - t)
        for key, ev in evs.items():
            before, ran, t = counted.evaluations, shared.computed, time.perf_counter()
            reward, info = ev.score(counted)
            rows[key].append({"reward": reward, "samples": int(info["samples"]),
                              "counted": counted.evaluations - before, "computed": shared.computed - ran,
                              "seconds": time.perf_counter() - t}
                             | {k: info[k] for k in ("samples_per_input", "early_stops", "irs_bound_inputs")
                                if k in info})
        print(f"policy {p + 1}/{len(policies)} ({time.perf_counter() - t0:.0f} s): "
              + ", ".join(f"{k} {r[-1]['reward']:.3f}/{r[-1]['counted']}" for k, r in rows.items()),
              file=sys.stderr, flush=True)
        if p >= 2:  # the results so far, rewritten after every policy (a run cut short still leaves its numbers)
            write_json(args.out, results(args, rows, policies[: p + 1], first.names, float_info, host, build_seconds,
                                         time.perf_counter() - t0, settings))
    result = results(args, rows, policies, first.names, float_info, host, build_seconds, time.perf_counter() - t0,
                     settings)
    result["host"]["load_average_at_end"] = host_info()["load_average"]
    write_json(args.out, result)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"kinds": result["kinds"], "goals": result["goals"]}, indent=1))
    print(f"wrote {args.out} in {result['wall_seconds']:.0f} s")


def summarize(rows: dict, settings: dict, cluster: float) -> dict:
    """Per kind: ρ against full, samples and seconds per reward; the goals; and how each kind ranks the near-float
    policies (full-N reward within `cluster` of the best one) and the others, with Pearson's r over all."""
    from scipy.stats import pearsonr, spearmanr

    def rho(fn, a, b):
        return float(fn(a, b).statistic) if len(a) > 2 and np.std(a) > 0 and np.std(b) > 0 else float("nan")

    full = np.array([r["reward"] for r in rows["full"]])
    near = full >= full.max() - cluster
    summary = {}
    for key, rs in rows.items():
        rs = rs[: len(full)]
        rewards = np.array([r["reward"] for r in rs])
        summary[key] = {"settings": settings[key], "spearman_vs_full": rho(spearmanr, rewards, full),
                        "spearman_near_float": rho(spearmanr, rewards[near], full[near]),
                        "spearman_others": rho(spearmanr, rewards[~near], full[~near]),
                        "pearson_vs_full": rho(pearsonr, rewards, full),
                        "samples_per_reward": float(np.mean([r["counted"] for r in rs])),
                        "recorded_samples_per_reward": float(np.mean([r["samples"] for r in rs])),
                        "computed_per_reward": float(np.mean([r["computed"] for r in rs])),
                        "seconds_per_reward": float(np.mean([r["seconds"] for r in rs])),
                        "mean_reward": float(np.mean(rewards))}
    if "full-retest" in rows:  # a second reference: how well the full ranking reproduces itself, and the mean of both
        retest = np.array([r["reward"] for r in rows["full-retest"]][: len(full)])
        both = (full + retest) / 2
        for key, s in summary.items():
            rewards = np.array([r["reward"] for r in rows[key][: len(full)]])
            s["spearman_vs_retest"] = rho(spearmanr, rewards, retest)
            s["spearman_vs_both"] = rho(spearmanr, rewards, both)
    irs_samples = summary["irs"]["samples_per_reward"]
    for s in summary.values():
        s["cheaper_than_irs"] = irs_samples / s["samples_per_reward"] if s["samples_per_reward"] else None
    goals = {k: {"cheaper_than_irs_x": s["cheaper_than_irs"], "spearman": s["spearman_vs_full"],
                 "met": bool(s["cheaper_than_irs"] >= 3 and s["spearman_vs_full"] >= 0.9)}
             for k, s in summary.items() if k not in ("full", "irs", "full-retest")}
    reference = ({"test_retest_spearman": summary["full-retest"]["spearman_vs_full"],
                  "test_retest_spearman_near_float": summary["full-retest"]["spearman_near_float"]}
                 if "full-retest" in summary else {})
    return {"kinds": summary, "goals": goals, **({"reference": reference} if reference else {}),
            "near_float": {"cluster": cluster, "policies": int(near.sum()),
                           "full_reward_range": [float(full[near].min()), float(full[near].max())]}}


def rescore(path: str, cluster: float) -> None:
    """Recompute the summary of a finished run's JSON from its per-policy rows (no model is run)."""
    from arq_deploy.core.fileio import write_json

    d = json.loads(Path(path).read_text())
    rows = {k: [p[k] for p in d["per_policy"]] for k in d["kinds"]}
    d |= summarize(rows, {k: v["settings"] for k, v in d["kinds"].items()}, cluster)
    write_json(path, d)


def results(args, rows, policies, names, float_info, host, build_seconds, wall, settings) -> dict:
    """The JSON of the policies scored so far: the summary (`summarize`), the scale, the host, the per-policy rows."""
    import torch

    return {
        "host": dict(host), "torch_threads": torch.get_num_threads(), "runtime": "onnxruntime (QDQ graph of each policy)",
        "model": f"resnet20-gauss{args.sigma:.2f}",
        "scale": {"images": args.images, "policies": len(policies), "policies_planned": args.policies, "n0": args.n0,
                  "n": args.n, "n_p": args.n_p,
                  "small_n_p": args.small_n_p, "first_n": args.first_n, "low_cap": args.low_cap,
                  "low_cap_first_n": args.low_cap_first_n, "calib_images": args.calib_images,
                  "alpha": 0.001, "alpha_zeta": 0.001, "seed": args.seed, "retest_seed": args.retest_seed,
                  "policy_sampling": "per policy floor b ~ U{2..6}; each layer's w and a bits ~ U{b..8}"},
        "float_model": {"acr": float_info["full"]["acr"], "clean_accuracy": float_info["full"]["clean_accuracy"],
                        "one_off_evaluations": {"certify": args.images * (args.n0 + args.n),
                                                "irs_labels": args.images * args.n_p}},
        **summarize(rows, settings, args.cluster),
        "per_policy": [{"bits": [[b.w_bits, b.a_bits] for b in (pol.bits(n) for n in names)],
                        **{k: rows[k][i] for k in rows}} for i, pol in enumerate(policies)],
        "policy_build_seconds_mean": float(np.mean(build_seconds)), "wall_seconds": wall,
    }


if __name__ == "__main__":
    main()
