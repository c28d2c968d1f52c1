"""Sub-8-bit integer kernels on x86: ResNet-20 W8A8 / W4A4 / W2A2 integer builds on this host's target (`x86`: its
own ISA, AVX-512 VNNI on a Zen 4) and on the AVX2 target (`x86-avx2`: x86-64-v3, no AVX-512, run on the same CPU),
beside onnxruntime's `quantize_static` int8 model of the same network.

Per target, the `auto` kernel choice (per layer: vpmaddubsw where the layer's (w, a) pair keeps its int16 sums exact,
on targets where it is chosen, else vpdpbusd / vpmaddwd), and the alternative for the narrow policies (the
`vpmaddubsw` family forced on the VNNI target; `vpmaddwd` alone on the AVX2 target), so that each kernel is compared
with the other in the same run. Policies are uniform (every layer at b bits, first and last included).

The pack stage's schedule is compared too: for W8A8 and W4A4 on both targets, a build with the pack as it was
scheduled before (`int_kernels.VECTORIZED_PACK = False`: computed inside the conv's parallel loop for any batch, its
rows scalarized by the padding test), marked "scalar-pack".

Measured in `--rounds` interleaved rounds (every build once per round: batch-1 latency over `--repeats` calls and
throughput at `--batch`), each timing in a process of its own (`targets.isolated.measure_isolated`: no runtime's
threads linger into the next one's timing), because the machine is noisy: per build the median batch-1 p50 and the
best throughput; ratios against the same target's W8A8 `auto` build are taken per round and their median kept.

    python benchmarks/x86_narrow_bench.py [--batch 256] [--rounds 5] [--out benchmarks/results/x86_narrow_bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

POLICIES = {"W8A8": 8, "W4A4": 4, "W2A2": 2}
# (target, policy, --int-kernel): `auto` everywhere, and the other kernel for the narrow policies
BUILDS = [(t, p, "auto") for t in ("x86", "x86-avx2") for p in POLICIES] + [
    ("x86", "W4A4", "vpmaddubsw"), ("x86", "W2A2", "vpmaddubsw"),
    ("x86-avx2", "W4A4", "vpmaddwd"), ("x86-avx2", "W2A2", "vpmaddwd")]
# the same `auto` builds with the pack scheduled as before (VECTORIZED_PACK = False)
SCALAR_PACK = [(t, p, "auto") for t in ("x86", "x86-avx2") for p in ("W8A8", "W4A4")]
PEER = "onnxruntime quantize_static int8"


def key(target: str, policy: str, kernel: str, scalar_pack: bool = False) -> str:
    return f"{target} {policy} {kernel}" + (" scalar-pack" if scalar_pack else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30, help="batch-1 calls per round")
    ap.add_argument("--large-repeats", type=int, default=3, help="batch calls per round")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "x86_narrow_bench.json"))
    args = ap.parse_args()

    from arq_deploy.core.data import load_dataset
    from arq_deploy.core.fileio import write_json
    from arq_deploy.core.host import host_info
    from arq_deploy.core.policy import QuantPolicy
    from arq_deploy.export.pipeline import export_and_validate, load
    from arq_deploy.export.qdq import float_onnx, save_onnx
    from arq_deploy.runtime.runners import OrtRunner
    from arq_deploy.runtime.tvm_runner import TvmRunner
    from arq_deploy.targets import int_kernels
    from arq_deploy.targets.backends import compile_onnx
    from arq_deploy.targets.isolated import measure_isolated

    sys.path.insert(0, str(Path(__file__).parent))
    from runtime_bench import ort_quantize_static

    shared = Path(args.shared)
    ckpt = str(shared / "models" / "resnet20-12fca82f.th")
    cifar = str(shared / "cifar10" / "cifar-10-batches-py")
    info_before = host_info()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lm = load("resnet20", ckpt)
        train, test = load_dataset(cifar, "train"), load_dataset(cifar, "test")
        onnx = {}
        for name, b in POLICIES.items():
            onnx[name] = work / f"{name}.onnx"
            export_and_validate(lm, QuantPolicy.uniform(b), train, test, onnx[name], validate_images=200,
                                min_agreement=0.0)  # a latency study: the low-bit models' accuracy is not the point
        save_onnx(float_onnx(load("resnet20", ckpt).model, lm.input_shape), work / "fp32.onnx")
        calib = train.x()[:512]
        ort_quantize_static(work / "fp32.onnx", calib, work / "ort_int8.onnx")
        runners, lowering, compile_s = {}, {}, {}  # runners: for the agreement check only, in this process
        models = {PEER: (work / "ort_int8.onnx", None)}  # what each timing process opens: (path, target)
        for (target, policy, kernel), scalar in [(b, False) for b in BUILDS] + [(b, True) for b in SCALAR_PACK]:
            k = key(target, policy, kernel, scalar)
            t = time.perf_counter()
            int_kernels.VECTORIZED_PACK = not scalar
            try:
                art = compile_onnx(onnx[policy], target, work / k.replace(" ", "_"), batch_size=args.batch,
                                   integer=True, int_kernel=kernel)
            finally:
                int_kernels.VECTORIZED_PACK = True
            compile_s[k] = round(time.perf_counter() - t, 1)
            models[k] = (art, target)
            sched = json.loads((art / "manifest.json").read_text())["compile"]["schedule"]
            low = sched["integer_lowering"]
            lowering[k] = {"conv2d_kernels": low["conv2d_kernels"], "conv2d": low["conv2d"],
                           "layers": [[ly["w_max"], ly["a_max"], ly["kernel"]] for ly in low["conv2d_layers"]],
                           "int_kernel": sched.get("int_kernel")}
            runners[k] = TvmRunner(art)
            print(f"built {k:32s} {low['conv2d_kernels']} ({compile_s[k]} s)", flush=True)
        x = test.x()[:500]
        agree = {}
        for policy in POLICIES:
            ref = OrtRunner(onnx[policy], batch_size=args.batch)(x).argmax(1)
            for k, r in runners.items():
                if f" {policy} " in k:
                    agree[k] = float((r(x).argmax(1) == ref).mean())
        keys = [PEER, *runners]
        runners.clear()  # no runtime stays open in this process while the timing processes run
        lat = {k: [] for k in keys}
        thr = {k: [] for k in keys}
        for rnd in range(args.rounds):
            for k in keys:
                b1, big = measure_isolated(models[k][0], models[k][1],
                                           plan=((1, args.repeats, 3), (args.batch, args.large_repeats, 1)), seed=rnd)
                lat[k].append(b1.p50_ms)
                thr[k].append(big.images_per_s)
            print(f"round {rnd + 1}/{args.rounds}", flush=True)
    info_after = host_info()

    def per_round_ratio(a: str, b: str, series: dict, inverse: bool = False) -> float:
        rs = [(y / x) if inverse else (x / y) for x, y in zip(series[a], series[b], strict=True)]
        return round(statistics.median(rs), 3)

    ratios = {}
    for target in ("x86", "x86-avx2"):
        base = key(target, "W8A8", "auto")
        for policy in ("W8A8", "W4A4"):  # the vectorized pack against the scalar one, same build otherwise
            vec, scalar = key(target, policy, "auto"), key(target, policy, "auto", True)
            ratios[f"{vec} / {scalar}"] = {"throughput": per_round_ratio(vec, scalar, thr),
                                           "batch1_speedup": per_round_ratio(vec, scalar, lat, inverse=True)}
        for k in keys:
            if k.startswith(target + " ") and k != base:
                ratios[f"{k} / {base}"] = {"throughput": per_round_ratio(k, base, thr),
                                           "batch1_speedup": per_round_ratio(k, base, lat, inverse=True)}
        for policy in POLICIES:  # every uniform policy's auto build against the peer
            k = key(target, policy, "auto")
            ratios[f"{k} / {PEER}"] = {"throughput": per_round_ratio(k, PEER, thr),
                                       "batch1_speedup": per_round_ratio(k, PEER, lat, inverse=True)}
    res = {
        "model": "resnet20-12fca82f (CIFAR-10), arq-deploy QDQ exports, uniform policies (every layer at b bits)",
        "batch": args.batch, "rounds": args.rounds, "batch1_repeats": args.repeats,
        "batch_repeats": args.large_repeats,
        "timing": "each runtime timed in a process of its own (targets.isolated.measure_isolated), interleaved "
                  "rounds; ratios are medians of per-round ratios from this one run",
        "scalar_pack_builds": [key(*b, True) for b in SCALAR_PACK],
        "throughput_img_s_best": {k: round(max(v), 1) for k, v in thr.items()},
        "batch1_p50_ms_median": {k: round(statistics.median(v), 3) for k, v in lat.items()},
        "throughput_img_s_rounds": {k: [round(v, 1) for v in vs] for k, vs in thr.items()},
        "ratios_vs_same_target_w8a8_auto": ratios,
        "top1_agreement_with_ort_same_policy": {k: round(v, 4) for k, v in agree.items()},
        "agreement_images": int(len(x)),
        "compile_s": compile_s, "integer_lowering": lowering,
        "host": info_before, "load_average": {"before": info_before["load_average"],
                                              "after": info_after["load_average"]},
        "pid": os.getpid(),
    }
    write_json(args.out, res)
    for k in keys:
        print(f"{k:34s} {max(thr[k]):9.1f} img/s   p50 {statistics.median(lat[k]):7.3f} ms   "
              f"agreement {agree.get(k, float('nan')):.3f}")
    for k, v in ratios.items():
        print(f"{k:60s} throughput {v['throughput']:.2f}x  batch-1 {v['batch1_speedup']:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
