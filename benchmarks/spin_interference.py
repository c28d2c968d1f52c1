"""Do runtimes in one process disturb each other's timings? ResNet-20 W8A8 on its TVM integer build (x86), timed at
batch 1 in one process: alone, right after an onnxruntime session of the QDQ graph ran batch 256 with its worker
threads left spinning (onnxruntime's default), and right after the same session built with
`session.force_spinning_stop`; beside it, the peer (onnxruntime `quantize_static` int8) at batch 1 with and without
spinning. Rounds interleave the conditions; per condition the median over rounds of the per-round p50 is kept.

This is why `bops_vs_latency.py` times every (model, backend) in a fresh process (`arq_deploy.targets.isolated`).

    python benchmarks/spin_interference.py [--rounds 10] [--out benchmarks/results/spin_interference.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONDITIONS = ("tvm W8A8 alone", "tvm W8A8 after a spinning onnxruntime session",
              "tvm W8A8 after an onnxruntime session with force_spinning_stop",
              "peer, spinning (default)", "peer, force_spinning_stop")


def p50_ms(fn, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=100, help="batch-1 calls per condition and round")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "spin_interference.json"))
    args = ap.parse_args(argv)
    if not (Path(args.shared) / "models" / "resnet20-gauss0.25.pt").is_file():
        sys.exit(f"error: {args.shared}/models/resnet20-gauss0.25.pt not found (give --shared DIR)")

    import onnxruntime as ort

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bops_vs_latency import calibration_images
    from runtime_bench import ort_quantize_static

    from arq_deploy.core.data import load_dataset
    from arq_deploy.core.fileio import write_json
    from arq_deploy.core.host import host_info
    from arq_deploy.core.policy import QuantPolicy
    from arq_deploy.export.pipeline import export_and_validate, load
    from arq_deploy.export.qdq import float_onnx, save_onnx
    from arq_deploy.runtime.tvm_runner import TvmRunner
    from arq_deploy.targets.backends import compile_onnx

    t0 = time.perf_counter()
    shared = Path(args.shared)
    cifar = str(shared / "cifar10" / "cifar-10-batches-py")
    lm = load("resnet20", str(shared / "models" / "resnet20-gauss0.25.pt"))
    train, test = load_dataset(cifar, "train"), load_dataset(cifar, "test")
    with tempfile.TemporaryDirectory(prefix="arq-spin-") as d:
        d = Path(d)
        export_and_validate(lm, QuantPolicy.uniform(8), train, test, d / "w8a8.onnx", sigma=0.25, calib_images=256,
                            validate_images=64, min_agreement=0.0)
        art = compile_onnx(d / "w8a8.onnx", "x86", d / "x86", batch_size=256, integer=True)
        save_onnx(float_onnx(lm.model, lm.input_shape), d / "fp32.onnx")
        ort_quantize_static(d / "fp32.onnx", calibration_images(train, 256), d / "peer.onnx")

        def session(path, stop: bool):
            so = ort.SessionOptions()
            so.log_severity_level = 3
            if stop:
                so.add_session_config_entry("session.force_spinning_stop", "1")
            s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            return s, s.get_inputs()[0].name

        qdq_spin, qdq_stop = session(d / "w8a8.onnx", False), session(d / "w8a8.onnx", True)
        peer_spin, peer_stop = session(d / "peer.onnx", False), session(d / "peer.onnx", True)
        tvm = TvmRunner(art)
        rng = np.random.default_rng(0)
        xb = rng.random((256, *lm.input_shape), dtype=np.float32)
        x1 = xb[:1]

        def after(sess):
            s, name = sess
            for _ in range(3):
                s.run(None, {name: xb})
            return p50_ms(lambda: tvm(x1), args.repeats)

        def alone(sess):
            s, name = sess
            return p50_ms(lambda: s.run(None, {name: x1}), args.repeats)

        runs = {c: [] for c in CONDITIONS}
        for r in range(args.rounds):
            runs[CONDITIONS[0]].append(p50_ms(lambda: tvm(x1), args.repeats))
            runs[CONDITIONS[1]].append(after(qdq_spin))
            runs[CONDITIONS[2]].append(after(qdq_stop))
            runs[CONDITIONS[3]].append(alone(peer_spin))
            runs[CONDITIONS[4]].append(alone(peer_stop))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v[-1]:.3f}" for v in runs.values()), flush=True)
    res = {c: {"p50_ms": statistics.median(v), "p50_ms_rounds": v} for c, v in runs.items()}
    base = res[CONDITIONS[0]]["p50_ms"]
    for c in CONDITIONS[:3]:
        res[c]["slowdown_vs_alone"] = res[c]["p50_ms"] / base
    for c, v in res.items():
        print(f"{c:64s} {v['p50_ms']:.3f} ms" + (f"  ({v['slowdown_vs_alone']:.2f}x alone)"
                                                  if "slowdown_vs_alone" in v else ""))
    write_json(Path(args.out), {
        "study": "batch-1 timing interference between runtimes in one process: ResNet-20 gauss0.25 W8A8, TVM integer "
                 "build for x86, onnxruntime QDQ session of the same graph, onnxruntime quantize_static int8 peer",
        "rounds": args.rounds, "repeats": args.repeats,
        "aggregation": "per condition: median over rounds of the per-round p50 of batch-1 calls",
        "conditions": res, "host": host_info(), "seconds": round(time.perf_counter() - t0, 1)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
