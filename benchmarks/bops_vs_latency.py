"""Do BOPs predict latency? ResNet-20 (gauss0.25) over uniform and mixed policies, on onnxruntime and TVM integer
builds for this host's x86 target and for the AVX2 target.

Each policy is written as policy JSON, exported as QDQ ONNX (calibrated on noisy images, σ = 0.25), and run three
ways: onnxruntime on the QDQ graph, the TVM integer build (`compile --integer`, kernel `auto`) for `x86` (this
host's ISA: vpdpbusd where it has AVX-512 VNNI) and for `x86-avx2` (x86-64-v3, run on this CPU: vpmaddubsw for the
layers whose (w, a) pair keeps its int16 sums exact, vpmaddwd for the rest). Beside them, in the same run: the float
model (onnxruntime, and TVM float builds for both targets) and the strongest peer, onnxruntime's `quantize_static`
int8 model of the same network (QDQ, per channel, calibrated on the same noisy images). Latency p50 at batch 1 and
throughput at `--batch` are measured in `--rounds` interleaved rounds (every model and backend once per round, so
that load on the machine spreads over all of them; per model the median p50 and the best throughput are kept),
each in a fresh process (`arq_deploy.targets.isolated`): onnxruntime's worker threads spin after a run and can
slow whatever is timed next in the same process (benchmarks/spin_interference.py).
BOPs = Σ MACs·w·a. For each backend: Spearman's rank correlation between BOPs and batch-1 latency and between BOPs
and time per image at the large batch (quantized policies only, and with fp32), a scatter plot, every ratio against
fp32 and against the peer, and each integer artifact's size (the manifest's `storage`, where the build records it).

    python benchmarks/bops_vs_latency.py [--quick] [--shared ../shared/data] [--out benchmarks/results/...json]

`--quick` measures 3 uniform policies and 1 mixed one with fewer repeats and writes *-quick.json/png, to check
that the study runs; the full study (7 uniform policies, 8..2 bits, and 5 mixed ones) is meant for a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("onnxruntime", "tvm-int", "tvm-int-avx2")
TVM_TARGETS = {"tvm-int": "x86", "tvm-int-avx2": "x86-avx2"}
PEER = "ort-int8-quantize_static"
UNIFORM = {f"W{b}A{b}": b for b in range(8, 1, -1)}
QUICK_UNIFORM = ("W8A8", "W4A4", "W2A2")
# ARQ-style mixed policies: sensitive first/last layers kept wide, cheap bits where the MACs are
RUNTIME_MIXED = {"conv1": [8, 8], "layer1.0.conv1": [4, 4], "layer1.1.conv2": [2, 8], "layer2.0.conv1": [4, 6],
                 "layer2.2.conv2": [2, 6], "layer3.0.conv1": [4, 8], "layer3.1.conv1": [6, 4], "linear": [8, 8]}


def mixed_policies(specs) -> dict[str, dict]:
    """Policy dicts (arq-deploy/policy JSON) of the mixed policies, keyed by a short name."""
    names = [s.name for s in specs]

    def policy(default, layers):
        return {"format": "arq-deploy/policy", "version": 1, "default": default, "layers": layers}

    edges = {"conv1": [8, 8], "linear": [8, 8]}
    deep2 = {n: [2, 4] for n in names if n.startswith("layer3.")}
    rng = np.random.default_rng(0)
    randoms = {}
    for floor in (3, 5):  # seeded random mixed policies: every layer's w and a ~ U{floor..8}
        randoms[f"mixed-random-floor{floor}"] = policy(
            [8, 8], {n: [int(rng.integers(floor, 9)), int(rng.integers(floor, 9))] for n in names})
    return {"mixed-runtime": policy([6, 6], RUNTIME_MIXED),
            "mixed-edges8-rest4": policy([4, 4], edges),
            "mixed-layer3-W2A4": policy([4, 6], {**deep2, **edges}), **randoms}


def build_models(args, tmp: Path) -> tuple[list[dict], dict]:
    """Export float + every policy (policy JSON -> QDQ ONNX), compile each for TVM x86 and x86-avx2 (integer builds;
    float for fp32), and quantize the float model with onnxruntime's quantize_static (the peer): (models, peer)."""
    from arq_deploy.core.data import load_dataset
    from arq_deploy.core.policy import QuantPolicy
    from arq_deploy.export.pipeline import export_and_validate, load
    from arq_deploy.export.qdq import float_onnx, save_onnx
    from arq_deploy.export.quantize.layers import extract_layer_specs
    from arq_deploy.targets.backends import compile_onnx

    shared = Path(args.shared)
    cifar = str(shared / "cifar10" / "cifar-10-batches-py")
    lm = load("resnet20", str(shared / "models" / "resnet20-gauss0.25.pt"))
    specs = extract_layer_specs(lm.model, lm.input_shape)
    train, test = load_dataset(cifar, "train"), load_dataset(cifar, "test")
    policies = {k: QuantPolicy.uniform(b).to_dict() for k, b in UNIFORM.items()
                if not args.quick or k in QUICK_UNIFORM}
    mixed = mixed_policies(specs)
    policies.update(list(mixed.items())[:1] if args.quick else mixed)
    full_bops = sum(s.macs for s in specs) * 32 * 32
    models = [{"name": "fp32", "policy": None, "bops": full_bops, "bops_fraction": 1.0, "onnx": tmp / "fp32.onnx"}]
    save_onnx(float_onnx(lm.model, lm.input_shape), models[0]["onnx"])
    for name, pdict in policies.items():
        path = tmp / f"{name}.policy.json"
        QuantPolicy.from_dict(pdict).save(path)
        pol = QuantPolicy.load(path)
        t = time.perf_counter()
        res = export_and_validate(lm, pol, train, test, tmp / f"{name}.onnx", sigma=0.25,
                                  calib_images=args.calib_images, validate_images=args.validate_images,
                                  min_agreement=0.0)  # latency study: a low-bit model's accuracy is not the point
        print(f"exported {name:22s} BOPs {100 * res['bops_fraction']:6.3f}%  ORT/torch agreement "
              f"{res['validation']['top1_agreement']:.3f}  ({time.perf_counter() - t:.0f} s)", flush=True)
        models.append({"name": name, "policy": pol.to_dict(), "policy_summary": res["policy_summary"],
                       "bops": res["bops"], "bops_fraction": res["bops_fraction"], "onnx": tmp / f"{name}.onnx",
                       "ort_torch_agreement": res["validation"]["top1_agreement"]})
    for m in models:
        t = time.perf_counter()
        for backend, target in TVM_TARGETS.items():
            # the integer build (QDQ -> int32-accumulating ops); for fp32 there is nothing to lower: a float build
            m[backend] = compile_onnx(m["onnx"], target, tmp / f"{backend}-{m['name']}", batch_size=args.batch,
                                      integer=m["policy"] is not None)
            m[f"{backend}-storage"] = storage(m[backend])
        print(f"compiled {m['name']:22s} for TVM {' and '.join(TVM_TARGETS.values())} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    from runtime_bench import ort_quantize_static

    calib = calibration_images(train, args.calib_images)
    ort_quantize_static(models[0]["onnx"], calib, tmp / "ort-int8.onnx")
    peer = {"name": PEER, "policy": "onnxruntime quantize_static int8 (QDQ, per channel, noisy calibration)",
            "onnx": tmp / "ort-int8.onnx", "bops": sum(s.macs for s in specs) * 8 * 8}
    peer["bops_fraction"] = peer["bops"] / full_bops
    return models, peer


def calibration_images(train, count: int, sigma: float = 0.25, seed: int = 0) -> np.ndarray:
    """`count` seeded training images plus σ-noise (the inputs a smoothed model sees), float32 N×C×H×W."""
    rng = np.random.default_rng(seed)
    x = train.x(np.sort(rng.choice(len(train), size=count, replace=False)))
    return (x + sigma * rng.standard_normal(x.shape, dtype=np.float32)).astype(np.float32)


def storage(artifact) -> dict:
    """The artifact's recorded sizes (manifest `storage`, written by every CPU build)."""
    from arq_deploy.core.artifact import load_artifact

    return load_artifact(artifact).manifest["storage"]


def runs(models: list[dict], peer: dict) -> dict[tuple[str, str], tuple[str, str]]:
    """(model, backend) -> (ONNX file or artifact directory, target) to time."""
    out = {}
    for m in models:
        out[(m["name"], "onnxruntime")] = (str(m["onnx"]), "x86")
        for backend, target in TVM_TARGETS.items():
            out[(m["name"], backend)] = (str(m[backend]), target)
    out[(PEER, "onnxruntime")] = (str(peer["onnx"]), "x86")
    return out


def measure_all(runs: dict, args) -> dict[tuple[str, str], dict]:
    """Interleaved rounds: per (model, backend) and round, batch-1 latency and large-batch throughput timed in a
    fresh process (`targets.isolated`: onnxruntime's spinning worker threads would otherwise slow whatever runs
    next); per (model, backend) the median batch-1 p50 and the best throughput."""
    from arq_deploy.targets.isolated import measure_isolated

    plan = [(1, args.repeats, args.warmup), (args.batch, args.large_repeats, 1)]
    lat: dict = {k: [] for k in runs}
    thr: dict = {k: [] for k in runs}
    for r in range(args.rounds):
        for key, (path, target) in runs.items():
            t1, tb = measure_isolated(path, target, plan, seed=r)
            lat[key].append(t1)
            thr[key].append(tb)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    out = {}
    for key in runs:
        p50s = [t.p50_ms for t in lat[key]]
        best = max(thr[key], key=lambda t: t.images_per_s)
        out[key] = {"latency_p50_ms": statistics.median(p50s), "latency_p50_ms_rounds": p50s,
                    "latency_p99_ms": statistics.median(t.p99_ms for t in lat[key]),
                    "latency_min_ms": min(t.min_ms for t in lat[key]),
                    "images_per_s": best.images_per_s,
                    "images_per_s_rounds": [t.images_per_s for t in thr[key]],
                    "ms_per_image_large_batch": 1e3 / best.images_per_s}
    return out


def spearman(models: list[dict], res: dict, backend: str, metric: str, with_fp32: bool) -> dict:
    from scipy.stats import spearmanr

    pts = [(m["bops"], res[(m["name"], backend)][metric]) for m in models if with_fp32 or m["name"] != "fp32"]
    rho, p = spearmanr([b for b, _ in pts], [v for _, v in pts])
    return {"rho": None if np.isnan(rho) else float(rho), "p_value": None if np.isnan(p) else float(p),
            "n": len(pts)}


def plot(models: list[dict], res: dict, path: Path, batch: int, peer: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = (("latency_p50_ms", "latency p50 at batch 1 (ms)"), ("ms_per_image_large_batch", "ms per image"))
    for ax, (metric, label) in zip(axes, panels):
        for backend, marker in (("onnxruntime", "o"), ("tvm-int", "^"), ("tvm-int-avx2", "s")):
            xs = [100 * m["bops_fraction"] for m in models]
            ys = [res[(m["name"], backend)][metric] for m in models]
            ax.scatter(xs, ys, marker=marker, label=backend, s=40)
            for m, x, y in zip(models, xs, ys):
                ax.annotate(m["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if peer is not None:
            ax.axhline(peer[metric], color="grey", ls="--", lw=1, label="onnxruntime quantize_static int8")
        ax.set_xscale("log")
        ax.set_xlabel("BOPs (% of W32A32, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1].set_title(f"batch {batch}", fontsize=9)
    axes[0].set_title("batch 1", fontsize=9)
    fig.suptitle("ResNet-20: BOPs vs measured latency (same run, this machine)")
    fig.tight_layout()
    from arq_deploy.core.fileio import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def report(models, res, corr) -> None:
    """The table of every model and backend against fp32, the peer, and the Spearman correlations."""
    print(f"\n{'model':22s} {'BOPs %':>8s} | {'backend':11s} {'p50 ms b=1':>10s} {'vs fp32':>8s} "
          f"{'img/s':>9s} {'vs fp32':>8s}")
    for m in models:
        for backend in BACKENDS:
            r, base = res[(m["name"], backend)], res[("fp32", backend)]
            print(f"{m['name']:22s} {100 * m['bops_fraction']:8.3f} | {backend:11s} {r['latency_p50_ms']:10.3f} "
                  f"{base['latency_p50_ms'] / r['latency_p50_ms']:7.2f}x {r['images_per_s']:9,.0f} "
                  f"{r['images_per_s'] / base['images_per_s']:7.2f}x")
    peer = res[(PEER, "onnxruntime")]
    print(f"{PEER:22s} {'':8s} | {'onnxruntime':11s} {peer['latency_p50_ms']:10.3f} {'':8s} "
          f"{peer['images_per_s']:9,.0f}")
    print("\nSpearman rho (BOPs vs time; +1 = fewer BOPs always faster), quantized policies [with fp32]:")
    for backend, c in corr.items():
        print(f"  {backend:11s} batch 1: {_rho(c['latency_quantized'])} [{_rho(c['latency_with_fp32'])}]   "
              f"large batch: {_rho(c['per_image_quantized'])} [{_rho(c['per_image_with_fp32'])}]")


def goal_checks(models, res, corr) -> dict:
    """The kernel goals this study can check, per integer backend: W4A4 and W2A2 throughput over W8A8's, W8A8 against
    the peer, every sub-8-bit policy ahead of the peer, and Spearman ρ ≥ 0.8 over the quantized policies."""
    peer = res[(PEER, "onnxruntime")]
    out = {}
    for backend in TVM_TARGETS:
        def thr(name, b=backend):
            return res[(name, b)]["images_per_s"]

        names = [m["name"] for m in models if m["policy"] is not None]
        sub8 = [n for n in names if n != "W8A8"]
        out[backend] = {
            "W4A4_over_W8A8_throughput": thr("W4A4") / thr("W8A8") if "W4A4" in names else None,
            "W2A2_over_W8A8_throughput": thr("W2A2") / thr("W8A8") if "W2A2" in names else None,
            "W8A8_over_peer_throughput": thr("W8A8") / peer["images_per_s"],
            "W8A8_over_peer_batch1_speedup": peer["latency_p50_ms"] / res[("W8A8", backend)]["latency_p50_ms"],
            "sub8_ahead_of_peer_throughput": [n for n in sub8 if thr(n) > peer["images_per_s"]],
            "sub8_behind_peer_throughput": [n for n in sub8 if thr(n) <= peer["images_per_s"]],
            "spearman_per_image_quantized": corr[backend]["per_image_quantized"]["rho"],
            "spearman_batch1_quantized": corr[backend]["latency_quantized"]["rho"],
        }
        rho = out[backend]["spearman_per_image_quantized"]
        out[backend]["spearman_goal_met"] = rho is not None and rho >= 0.8
    return out


def _rho(c: dict) -> str:
    return "  n/a" if c["rho"] is None else f"{c['rho']:+.2f} (p={c['p_value']:.2f}, n={c['n']})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 policies, fewer repeats (a check that the study runs)")
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--batch", type=int, default=256, help="large batch (also TVM's compiled batch)")
    ap.add_argument("--repeats", type=int, default=None, help="batch-1 calls per round [100; quick 30]")
    ap.add_argument("--large-repeats", type=int, default=None, help="large-batch calls per round [10; quick 3]")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds [3; quick 2]")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--validate-images", type=int, default=200)
    ap.add_argument("--out", default=None, help="JSON path [results/bops_vs_latency(-quick).json]; PNG beside it")
    args = ap.parse_args(argv)
    q = args.quick
    args.repeats = args.repeats or (30 if q else 100)
    args.large_repeats = args.large_repeats or (3 if q else 10)
    args.rounds = args.rounds or (2 if q else 3)
    out = Path(args.out or RESULTS / f"bops_vs_latency{'-quick' if q else ''}.json")
    if not (Path(args.shared) / "models" / "resnet20-gauss0.25.pt").is_file():
        sys.exit(f"error: {args.shared}/models/resnet20-gauss0.25.pt not found (give --shared DIR)")

    from arq_deploy.core.fileio import write_json
    from arq_deploy.core.host import host_info

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="arq-bops-") as d:
        models, peer = build_models(args, Path(d))
        res = measure_all(runs(models, peer), args)
    corr = {b: {"latency_quantized": spearman(models, res, b, "latency_p50_ms", False),
                "latency_with_fp32": spearman(models, res, b, "latency_p50_ms", True),
                "per_image_quantized": spearman(models, res, b, "ms_per_image_large_batch", False),
                "per_image_with_fp32": spearman(models, res, b, "ms_per_image_large_batch", True)}
            for b in BACKENDS}
    report(models, res, corr)
    png = out.with_suffix(".png")
    plot(models, res, png, args.batch, res[(PEER, "onnxruntime")])
    peer_res = res[(PEER, "onnxruntime")]
    rows = []
    for m in models:
        row = {k: v for k, v in m.items() if k not in ("onnx", *TVM_TARGETS)}
        for backend in BACKENDS:
            r, base = res[(m["name"], backend)], res[("fp32", backend)]
            row[backend] = {**r, "latency_speedup_vs_fp32": base["latency_p50_ms"] / r["latency_p50_ms"],
                            "throughput_ratio_vs_fp32": r["images_per_s"] / base["images_per_s"],
                            "latency_speedup_vs_peer": peer_res["latency_p50_ms"] / r["latency_p50_ms"],
                            "throughput_ratio_vs_peer": r["images_per_s"] / peer_res["images_per_s"]}
        rows.append(row)
    goals = goal_checks(models, res, corr)
    print("\ngoals:", json.dumps(goals, indent=1))
    write_json(out, {
        "study": "BOPs vs latency, ResNet-20 gauss0.25: onnxruntime on the QDQ graphs and TVM integer builds for x86 "
                 "(this host's ISA) and x86-avx2 (arq schedules, untuned), beside onnxruntime quantize_static int8",
        "quick": q, "batch_large": args.batch, "repeats": args.repeats, "large_repeats": args.large_repeats,
        "rounds": args.rounds, "warmup": args.warmup, "calib_images": args.calib_images, "sigma": 0.25,
        "isolation": "every (model, backend, round) timed in a fresh process (arq_deploy.targets.isolated)",
        "aggregation": "per model: median over rounds of the batch-1 p50 (and the fastest call, latency_min_ms); "
                       "best throughput over rounds",
        "models": rows, "peer": {"name": PEER, "policy": peer["policy"], "bops_fraction": peer["bops_fraction"],
                                 "onnxruntime": peer_res},
        "spearman": corr, "goals": goals, "plot": png.name, "host": host_info(),
        "seconds": round(time.perf_counter() - t0, 1)})
    print(f"\nwrote {out} and {png} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
