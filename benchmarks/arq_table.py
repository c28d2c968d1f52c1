"""The ARQ table: ResNet-20 on CIFAR-10, mixed-precision search with a certified-robustness reward vs baselines.

For each σ: the float gauss-σ ResNet-20 (../shared/data/models) is searched under a BOPs budget on a validation subset
of *training* images, by
  ARQ      DDPG + IRS reward (ACR by incremental smoothing against the float model's certificates)
  HAQ      the same agent with HAQ's reward (clean top-1 of the quantized base model)
  random   random actions through the same environment and action wall, same number of episodes
  greedy   per-layer sensitivity (IRS reward) + greedy bit lowering (mixed precision without RL)
and compared with FP32, W8A8, W4A4 and the best uniform width that fits the budget. Every quantized policy is
fine-tuned the same way (`--finetune-epochs` of Gaussian-noise QAT, 0 for none), calibrated on noisy training
images, exported to QDQ ONNX and certified on lossless test images (CERTIFY, N0 = 100, N, α = 0.001): by its TVM x86
integer build (`--certify-backend tvm`, the deployed artifact; its top-1 agreement with onnxruntime on the 1,000 test
images is recorded) or by onnxruntime on the QDQ graph. The float row runs in onnxruntime fp32.
A second DDPG search whose reward is *full* certification (same inputs, n0/n of the float cache) runs for a few
episodes to measure what incremental smoothing saves per reward (seconds and network evaluations).

    python benchmarks/arq_table.py                  # the defaults: sized for this 2-core CPU (under an hour)
    python benchmarks/arq_table.py --episodes 200 --warmup 40 --val-images 100 --test-images 500  # GPU-size

Writes benchmarks/results/arq_table.json and prints a Markdown table. Resumable: every search and certification keeps
its files under --work, so a rerun continues where it stopped. Each row keeps its per-test-image certified radii
(0 where wrong or abstaining). Every row certifies image i with the same seed, so ARQ is also compared with each
other row image by image ("paired_vs_arq": mean ACR difference, 95% t-interval, one-sided p-value of the
baseline being higher). `--rows` builds only the named rows and runs only their searches, e.g. a larger test set for
the searched rows alone:

    python benchmarks/arq_table.py --sigmas 0.25 --rows FP32,ARQ,HAQ,random,greedy --test-images 200 --full-episodes 0

`--search-reward adaptive` gives ARQ, random and greedy the adaptive reward instead of IRS (anytime-valid certification
with at most --n-p samples per image, `--first-n`, `--tolerance`; `arq_deploy.search.reward`); their searches then run
in `<label>-adaptive` work directories, and the per-reward comparison with full certification measures that reward.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def args_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--sigmas", default="0.25,0.5")
    ap.add_argument("--budget", type=float, default=0.015)
    ap.add_argument("--episodes", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--val-images", type=int, default=40)
    ap.add_argument("--n", type=int, default=2000, help="float-cache CERTIFY samples (search reward)")
    ap.add_argument("--n-p", type=int, default=200)
    ap.add_argument("--search-reward", choices=("irs", "adaptive"), default="irs",
                    help="the certified reward of ARQ, random and greedy (HAQ keeps clean accuracy)")
    ap.add_argument("--first-n", type=int, default=25, help="--search-reward adaptive: first look per image")
    ap.add_argument("--tolerance", type=float, default=0.05, help="--search-reward adaptive: radius tolerance")
    ap.add_argument("--greedy-grid", default="2,4,8")
    ap.add_argument("--full-episodes", type=int, default=3, help="episodes of the full-certification-reward search")
    ap.add_argument("--test-images", type=int, default=50)
    ap.add_argument("--test-n", type=int, default=10000)
    ap.add_argument("--finetune-epochs", type=int, default=2,
                    help="Gaussian-noise QAT epochs on the 4,000 lossless training images for every quantized row")
    ap.add_argument("--finetune-lr", type=float, default=0.001)
    ap.add_argument("--certify-backend", choices=("tvm", "onnxruntime"), default="tvm",
                    help="tvm: quantized rows certified by their TVM x86 integer build; onnxruntime: the QDQ graph")
    ap.add_argument("--rerank-top", type=int, default=5,
                    help="ARQ, HAQ and random search: re-score the K best distinct policies on fresh training images "
                    "(0: keep the best search reward)")
    ap.add_argument("--rerank-images", type=int, default=100)
    ap.add_argument("--rows", default=None,
                    help="comma list of table rows to build (FP32, W8A8, W4A4, best_uniform, HAQ, random, greedy, "
                    "ARQ; default all): only their searches run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "runs" / "arq-table"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "arq_table.json"))
    return ap


def search(method, reward, args, sigma, weights, out, episodes=None, rerank=True):
    from arq_deploy.core.config import ModelSource, SearchRunConfig
    from arq_deploy.search.driver import run_search

    if method == "greedy" and (Path(out) / "summary.json").exists():  # greedy has no episode log to resume from
        return json.loads((Path(out) / "summary.json").read_text()), [], 0.0

    t0 = time.perf_counter()
    cfg = SearchRunConfig(
        model=ModelSource("resnet20", weights), out=str(out), data=args.cifar, sigma=sigma, budget=args.budget,
        episodes=episodes or args.episodes, method=method, reward_kind=reward, val_images=args.val_images,
        calib_images=256, n0=100, n=args.n, n_p=args.n_p, warmup=args.warmup, seed=args.seed,
        greedy_grid=tuple(int(b) for b in args.greedy_grid.split(",")), cache_dir=str(Path(out).parent / "float-cache"),
        rerank_top=args.rerank_top if rerank and method != "greedy" else 0, rerank_images=args.rerank_images,
        first_n=args.first_n, tolerance=args.tolerance)
    summary = run_search(cfg, progress=True)
    rows = [json.loads(x) for x in (Path(out) / "search.jsonl").read_text().splitlines()] \
        if (Path(out) / "search.jsonl").exists() else []
    return summary, rows, time.perf_counter() - t0


def certify_runner(name, onnx_path: Path, quantized: bool, args, work: Path, test):
    """The runtime that certifies a row: with --certify-backend tvm, a quantized policy runs as a TVM integer build
    (`compile --integer`, ParallelTvmSampler: one 1-thread VM per core), about 3x onnxruntime on the same QDQ graph
    here; the float model stays in onnxruntime fp32 (faster than TVM fp32 on this CPU). Returns (runner, info)."""
    from arq_deploy.runtime.runners import OrtRunner

    ort_runner = OrtRunner(str(onnx_path), batch_size=500)
    if args.certify_backend == "onnxruntime" or not quantized:
        return ort_runner, {"certify_runtime": "onnxruntime"}
    from arq_deploy.runtime.sampling import ParallelTvmSampler
    from arq_deploy.runtime.tvm_runner import TvmRunner
    from arq_deploy.targets.backends import compile_onnx

    t0 = time.perf_counter()
    art = compile_onnx(onnx_path, "x86", work / f"{name}-tvm-int", batch_size=100, single=False, integer=True)
    compile_s = time.perf_counter() - t0
    x = test.x()  # the deployed build must answer like the exported graph: top-1 agreement on the clean test split
    agree = float(np.mean(np.asarray(TvmRunner(art)(x)).argmax(1) == np.asarray(ort_runner(x)).argmax(1)))
    return ParallelTvmSampler(art, workers=2), {"certify_runtime": "tvm-x86-integer", "tvm_compile_seconds": compile_s,
                                                "tvm_ort_agreement": agree}


def certify_policy(name, policy, lm, train, test, sigma, args, work: Path) -> dict:
    """Export (fine-tuned with Gaussian-noise QAT when --finetune-epochs > 0) and certify on every k-th lossless
    test image."""
    from arq_deploy.certify.results import CertifyLog, certify_dataset
    from arq_deploy.certify.smooth import Smooth
    from arq_deploy.certify.stats import summarize
    from arq_deploy.export.pipeline import export_and_validate
    from arq_deploy.export.pipeline import train as run_train
    from arq_deploy.export.qdq import float_onnx, save_onnx
    from arq_deploy.export.quantize.layers import extract_layer_specs

    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / f"{name}.onnx"
    specs = extract_layer_specs(lm.model, lm.input_shape)
    bops = 1.0 if policy is None else policy.resolve(specs).bops_fraction(specs)
    info: dict = {}
    if not onnx_path.exists():
        if policy is None:
            save_onnx(float_onnx(lm.model, lm.input_shape), onnx_path)
        else:
            src = lm
            if args.finetune_epochs > 0:
                import copy

                t0 = time.perf_counter()
                model, hist = run_train(copy.deepcopy(lm), train, sigma, args.finetune_epochs, lr=args.finetune_lr,
                                        batch_size=128, seed=args.seed, policy=policy, progress=True)
                src = copy.copy(lm)
                src.model, src.meta = model, lm.meta | {"policy": policy.resolve(specs).to_dict()}
                info |= {"finetune_seconds": time.perf_counter() - t0, "finetune_history": hist}
            # min_agreement 0: the table records onnxruntime-vs-torch agreement instead of refusing the export
            export_and_validate(src, policy, train, test, onnx_path, sigma=sigma, calib_images=256,
                                validate_images=200, seed=args.seed, min_agreement=0.0)
            if info:
                onnx_path.with_suffix(".finetune.json").write_text(json.dumps(info))
    elif onnx_path.with_suffix(".finetune.json").exists():
        info = json.loads(onnx_path.with_suffix(".finetune.json").read_text())
    runner, rinfo = certify_runner(name, onnx_path, policy is not None, args, work, test)
    idx = list(range(0, len(test), max(1, len(test) // args.test_images)))[: args.test_images]
    meta = {"model": name, "sigma": sigma, "n0": 100, "n": args.test_n, "alpha": 0.001, "seed": args.seed,
            "data": "cifar10-test", "runtime": rinfo["certify_runtime"]}
    t0 = time.perf_counter()
    with CertifyLog(work / f"{name}.tsv", meta) as log:
        certs = certify_dataset(Smooth(runner, 10, sigma, batch_size=500), test.x(), test.labels, idx, 100,
                                args.test_n, 0.001, args.seed, log)
    s = summarize(certs, (0.0, 0.25, 0.5, 0.75))
    report = onnx_path.with_suffix(".export.json")
    agreement = json.loads(report.read_text())["validation"]["top1_agreement"] if report.exists() else None
    certs = sorted(certs, key=lambda c: c.idx)
    return {"ort_torch_agreement": agreement, "clean": s.clean_accuracy, "cert_0.25": s.at(0.25),
            "cert_0.5": s.at(0.5), "cert_0.75": s.at(0.75), "acr": s.acr, "bops_percent": 100 * bops,
            # the certificates' own times, so that a resumed run reports the work, not the resume
            "certify_seconds": sum(c.seconds for c in certs), "certify_seconds_this_run": time.perf_counter() - t0,
            "images": len(certs),
            # per test image (in index order): its certified radius when correct, else 0 (their mean is the ACR)
            "test_indices": [c.idx for c in certs],
            "certified_radius": [c.radius if c.correct else 0.0 for c in certs]} | rinfo | info


def paired_vs(table: dict, ours: str = "ARQ") -> dict:
    """ACR of `ours` minus each other row's (the float model's too), paired by test image (the same images and,
    through the per-input seeds, the same noise in every row): mean difference, its 95% t-interval, and the
    one-sided p-value of "ours is not below" (H1: the other row's ACR is higher). Rows without per-image radii are
    skipped."""
    from scipy import stats

    if ours not in table or "certified_radius" not in table[ours]:
        return {}
    a = np.asarray(table[ours]["certified_radius"])
    out = {}
    for label, row in table.items():
        if label == ours or row.get("test_indices") != table[ours]["test_indices"]:
            continue
        b = np.asarray(row["certified_radius"])
        t = stats.ttest_rel(a, b)
        lo, hi = t.confidence_interval(0.95)
        out[label] = {"acr_difference": float(np.mean(a - b)), "ci95": [float(lo), float(hi)],
                      "p_other_higher": float(stats.ttest_rel(a, b, alternative="less").pvalue),
                      "images": int(len(a)), "ours_ahead_on": int(np.sum(a > b)), "other_ahead_on": int(np.sum(b > a))}
    return out


def run_sigma(sigma, args, train, test) -> dict:
    from arq_deploy.core.policy import QuantPolicy
    from arq_deploy.export.pipeline import load
    from arq_deploy.export.quantize.layers import extract_layer_specs
    from arq_deploy.search.baselines import best_uniform
    from arq_deploy.search.env import BopsCost, QuantEnv

    weights = str(Path(args.shared) / "models" / f"resnet20-gauss{sigma:.2f}.pt")
    lm = load("resnet20", weights)
    specs = extract_layer_specs(lm.model, lm.input_shape)
    cost = BopsCost(specs)
    env = QuantEnv(specs, lambda p: 0.0, args.budget * cost.total_w32a32)
    work = Path(args.work) / f"sigma{sigma}"
    wanted = None if not args.rows else {r.strip() for r in args.rows.split(",")}
    searches = {}
    cert = args.search_reward
    for label, method, reward in (("ARQ", "ddpg", cert), ("HAQ", "ddpg", "accuracy"), ("random", "random", cert),
                                  ("greedy", "greedy", cert)):
        if wanted is not None and label not in wanted:
            continue
        summary, rows, wall = search(method, reward, args, sigma, weights, work / run_dir(label, reward))
        searches[label] = {"summary": summary, "wall_seconds_this_run": wall, "rows": len(rows),
                           "reward_seconds": summary.get("reward_seconds"), "evaluations": summary["evaluations"],
                           "policy": QuantPolicy.load(work / run_dir(label, reward) / "policy.json")}
        print(f"σ={sigma} {label}: best reward {summary['best_reward']:.4f} at "
              f"{100 * summary['best_bops_fraction']:.2f}% BOPs, {summary['evaluations']} evaluations", flush=True)
    per_reward = irs_vs_full(args, sigma, weights, work, searches) if "ARQ" in searches and args.full_episodes else {}

    b_uni = best_uniform(env)
    policies = {"FP32": None, "W8A8": QuantPolicy.uniform(8), "W4A4": QuantPolicy.uniform(4),
                f"best uniform (W{b_uni}A{b_uni})": QuantPolicy.uniform(b_uni)}
    for label in ("HAQ", "random", "greedy", "ARQ"):
        if label in searches:
            policies[label] = searches[label]["policy"]
    table = {}
    for label, pol in policies.items():
        key = label.split(" ")[0] if not label.startswith("best") else "best_uniform"
        if wanted is not None and key not in wanted:
            continue
        table[label] = certify_policy(key.replace("/", "_"), pol, lm, train, test, sigma, args, work / "certify")
        if label in searches:
            s = searches[label]
            table[label] |= {"search_seconds": s["summary"].get("episode_seconds", s["reward_seconds"]),
                             "evaluations": s["evaluations"], "search_reward": s["summary"]["best_reward"]}
            if "rerank" in s["summary"]:
                table[label]["rerank"] = s["summary"]["rerank"]
        print(f"σ={sigma} {label}: " + json.dumps({k: v for k, v in table[label].items()
                                                   if k not in ("test_indices", "certified_radius")}), flush=True)
    floats = [work / run_dir(label, args.search_reward) / "float.json" for label in searches
              if (work / run_dir(label, args.search_reward) / "float.json").exists()]
    return {"table": table, "irs_vs_full": per_reward,
            "float_cache": json.loads(floats[0].read_text()) if floats else None, "paired_vs_arq": paired_vs(table)}


def run_dir(label: str, reward: str) -> str:
    """A search's work directory: the row label, with `-adaptive` for the adaptive reward (not resumed as IRS)."""
    return f"{label}-adaptive" if reward == "adaptive" else label


def irs_vs_full(args, sigma, weights, work: Path, searches: dict) -> dict:
    """A few episodes of the same DDPG search with full certification per reward: seconds and network evaluations
    per reward against the IRS search's, and the ARQ search's wall time had every reward been full."""
    full_summary, full_rows, _ = search("ddpg", "full", args, sigma, weights, work / "ARQ-full-reward",
                                        episodes=args.full_episodes, rerank=False)
    arq_rows = [json.loads(x) for x in (work / run_dir("ARQ", args.search_reward) / "search.jsonl").read_text()
                .splitlines()]
    k = min(len(full_rows), len(arq_rows))
    per_reward = {
        "episodes_compared": k,
        "irs_seconds_per_reward": sum(r["reward_info"].get("seconds", 0) for r in arq_rows[:k]) / k,
        "full_seconds_per_reward": sum(r["reward_info"].get("seconds", 0) for r in full_rows[:k]) / k,
        "irs_samples_per_reward": sum(r["reward_info"].get("samples", 0) for r in arq_rows[:k]) / k,
        "full_samples_per_reward": sum(r["reward_info"].get("samples", 0) for r in full_rows[:k]) / k,
    }
    per_reward["time_ratio_full_over_irs"] = per_reward["full_seconds_per_reward"] / per_reward["irs_seconds_per_reward"]
    float_prep = json.loads((work / run_dir("ARQ", args.search_reward) / "float.json").read_text())
    arq_search_s = searches["ARQ"]["summary"]["episode_seconds"]
    per_reward["arq_search_seconds"] = arq_search_s
    per_reward["arq_search_seconds_with_full_reward_estimate"] = (
        arq_search_s - searches["ARQ"]["summary"]["reward_seconds"]
        + per_reward["full_seconds_per_reward"] * searches["ARQ"]["evaluations"])
    per_reward["float_cache_seconds"] = float_prep["seconds"]
    return per_reward


def markdown(results: dict) -> str:
    lines = []
    for sigma, res in results["sigmas"].items():
        lines += [f"\nσ = {sigma}\n", "| method | BOPs % | clean | r=0.25 | r=0.5 | r=0.75 | ACR | search s | evals |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label, r in res["table"].items():
            lines.append(f"| {label} | {r['bops_percent']:.2f} | {r['clean']:.3f} | {r['cert_0.25']:.3f} | "
                         f"{r['cert_0.5']:.3f} | {r['cert_0.75']:.3f} | {r['acr']:.3f} | "
                         f"{r.get('search_seconds', float('nan')):.0f} | {r.get('evaluations', '')} |")
        for label, p in res.get("paired_vs_arq", {}).items():
            lines.append(f"\nARQ − {label}: ACR {p['acr_difference']:+.4f} (95% CI {p['ci95'][0]:+.4f} … "
                         f"{p['ci95'][1]:+.4f}, paired over {p['images']} test images; ARQ ahead on "
                         f"{p['ours_ahead_on']}, behind on {p['other_ahead_on']}; one-sided p of {label} higher: "
                         f"{p['p_other_higher']:.2f})")
        c = res["irs_vs_full"]
        if not c:
            continue
        lines.append(f"\nper reward: IRS {c['irs_seconds_per_reward']:.1f} s ({c['irs_samples_per_reward']:.0f} "
                     f"network evaluations) vs full certification {c['full_seconds_per_reward']:.1f} s "
                     f"({c['full_samples_per_reward']:.0f}): {c['time_ratio_full_over_irs']:.2f}× ; ARQ search "
                     f"{c['arq_search_seconds']:.0f} s vs about {c['arq_search_seconds_with_full_reward_estimate']:.0f} "
                     f"s with full certification per reward")
    return "\n".join(lines)


def main(argv=None):
    args = args_parser().parse_args(argv)
    from arq_deploy.core.data import load_dataset
    from arq_deploy.core.fileio import write_json

    args.cifar = str(Path(args.shared) / "cifar10" / "cifar-10-batches-py")
    train, test = load_dataset(args.cifar, "train"), load_dataset(args.cifar, "test")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work", "shared")}
    results = {"settings": settings, "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores; search rewards "
               "in onnxruntime (QDQ graphs), fine-tuning in torch", "sigmas": {}}
    t0 = time.perf_counter()
    for sigma in (float(s) for s in args.sigmas.split(",")):
        results["sigmas"][str(sigma)] = run_sigma(sigma, args, train, test)
        results["wall_seconds"] = time.perf_counter() - t0
        write_json(args.out, results)
    print(markdown(results))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
