"""Noisy-sample throughput of ResNet-20 (the certification workload) per runtime, measured in one run.

Baseline: a torch eager loop in the style of Cohen et al.'s `Smooth` (fp32, batch 400, noise added per batch).
Peers: onnxruntime fp32, and onnxruntime's own `quantize_static` int8 QDQ (per-channel, calibrated on noisy images),
beside arq-deploy's W8A8 and mixed QDQ exports run by onnxruntime and by the TVM x86 build.
Each figure is the best of `--repeats` timed passes over `--samples` noisy samples; ratios are against the baseline.

    python benchmarks/runtime_bench.py [--shared ../shared/data] [--out benchmarks/results/runtime_bench.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

MIXED = {"conv1": [8, 8], "layer1.0.conv1": [4, 4], "layer1.1.conv2": [2, 8], "layer2.0.conv1": [4, 6],
         "layer2.2.conv2": [2, 6], "layer3.0.conv1": [4, 8], "layer3.1.conv1": [6, 4], "linear": [8, 8]}


def rate(fn, x: np.ndarray, sigma: float, batch: int, samples: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    noisy = [(x[i % len(x)][None] + sigma * rng.standard_normal((batch, *x.shape[1:]), dtype=np.float32))
             for i in range(max(1, samples // batch))]
    fn(noisy[0])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for xb in noisy:
            fn(xb)
        best = min(best, time.perf_counter() - t)
    return len(noisy) * batch / best


def ort_quantize_static(float_onnx: Path, calib: np.ndarray, out: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib[i : i + 64]} for i in range(0, len(calib), 64)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(float_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=400)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "runtime_bench.json"))
    args = ap.parse_args()

    import torch

    from arq_deploy.core.data import load_dataset
    from arq_deploy.core.policy import QuantPolicy
    from arq_deploy.export.pipeline import export_and_validate, load, pick
    from arq_deploy.export.qdq import float_onnx, save_onnx
    from arq_deploy.runtime.runners import OrtRunner
    from arq_deploy.runtime.tvm_runner import TvmRunner
    from arq_deploy.targets.backends import compile_onnx

    shared = Path(args.shared)
    cifar = str(shared / "cifar10" / "cifar-10-batches-py")
    lm = load("resnet20", str(shared / "models" / "resnet20-gauss0.25.pt"))
    train, test = load_dataset(cifar, "train"), load_dataset(cifar, "test")
    x = test.x(np.arange(0, 1000, 100))
    tmp = Path(tempfile.mkdtemp(prefix="arq-bench-"))
    save_onnx(float_onnx(lm.model, lm.input_shape), tmp / "float.onnx")
    calib = train.x(pick(len(train), 512, 0))
    calib = calib + args.sigma * np.random.default_rng(1).standard_normal(calib.shape, dtype=np.float32)
    ort_quantize_static(tmp / "float.onnx", calib, tmp / "ort_int8.onnx")
    policies = {"W8A8": QuantPolicy.uniform(8),
                "mixed": QuantPolicy.from_dict({"format": "arq-deploy/policy", "version": 1, "default": [6, 6],
                                                "layers": MIXED})}
    exports = {}
    for name, pol in policies.items():
        exports[name] = export_and_validate(lm, pol, train, test, tmp / f"{name}.onnx", sigma=args.sigma,
                                            validate_images=200)
    torch.set_num_threads(torch.get_num_threads())

    def torch_eager(xb):  # Cohen et al.'s Smooth: a torch eager forward per noisy batch, argmax counted
        with torch.inference_mode():
            return lm.model(torch.from_numpy(xb)).argmax(1)

    paths = {"torch eager fp32 (baseline)": torch_eager,
             "onnxruntime fp32": OrtRunner(tmp / "float.onnx", batch_size=args.batch),
             "onnxruntime quantize_static int8 (peer)": OrtRunner(tmp / "ort_int8.onnx", batch_size=args.batch),
             "TVM x86 fp32": TvmRunner(compile_onnx(tmp / "float.onnx", "x86", tmp / "tvm-float", batch_size=100))}
    for name in policies:
        paths[f"arq {name} ({exports[name]['bops_fraction'] * 100:.2f}% BOPs) onnxruntime"] = \
            OrtRunner(tmp / f"{name}.onnx", batch_size=args.batch)
        paths[f"arq {name} ({exports[name]['bops_fraction'] * 100:.2f}% BOPs) TVM x86"] = \
            TvmRunner(compile_onnx(tmp / f"{name}.onnx", "x86", tmp / f"tvm-{name}", batch_size=100))
        paths[f"arq {name} ({exports[name]['bops_fraction'] * 100:.2f}% BOPs) TVM x86 integer"] = \
            TvmRunner(compile_onnx(tmp / f"{name}.onnx", "x86", tmp / f"tvm-int-{name}", batch_size=args.batch,
                                   integer=True))
    results = {}
    for label, fn in paths.items():
        results[label] = rate(fn, x, args.sigma, args.batch, args.samples, args.repeats)
    base = results["torch eager fp32 (baseline)"]
    print(f"{'path':58s} {'samples/s':>10s} {'vs baseline':>12s}")
    for label, r in results.items():
        print(f"{label:58s} {r:10,.0f} {r / base:11.2f}x")
    out = {"model": "resnet20-gauss0.25", "sigma": args.sigma, "batch": args.batch, "samples": args.samples,
           "repeats": args.repeats, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "cores": __import__("os").cpu_count(), "samples_per_s": results,
           "ratio_vs_torch_eager": {k: v / base for k, v in results.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
