"""ResNet-20 W8A8 throughput: TVM float build vs TVM integer build vs onnxruntime (same model) vs onnxruntime fp32,
beside the strongest peer, onnxruntime's own `quantize_static` int8 model (QDQ, per channel, u8 × s8) of the network.

All four run in one process, interleaved round by round (best round per path), at one batch size, on random
pixel batches; agreement is top-1 against onnxruntime's W8A8 run on the lossless CIFAR-10 test images. With
`--tune-trials N`, the float and integer builds are also MetaSchedule-tuned (N trials each, own databases under
the work directory) and measured beside the untuned ones.

    python benchmarks/tvm_int8_bench.py [--batch 256] [--rounds 5] [--tune-trials 0] [--shared ../shared/data]
                                        [--out benchmarks/results/tvm_int8_bench.json]

The machine's load average is recorded before and after: this 2-core machine is shared, so read ratios, which
are measured in the same rounds, rather than absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def export_models(shared: Path, work: Path) -> tuple[Path, Path, object]:
    """ResNet-20 (pretrained) as a W8A8 QDQ export and as a float ONNX; returns (w8a8, float, test set)."""
    from arq_deploy.core.data import load_dataset
    from arq_deploy.core.policy import QuantPolicy
    from arq_deploy.export.pipeline import export_and_validate, load
    from arq_deploy.export.qdq import float_onnx, save_onnx

    cifar = shared / "cifar10" / "cifar-10-batches-py"
    lm = load("resnet20", str(shared / "models" / "resnet20-12fca82f.th"))
    train, test = load_dataset(str(cifar), "train"), load_dataset(str(cifar), "test")
    w8a8, fp32 = work / "r20_w8a8.onnx", work / "r20_float.onnx"
    pol = QuantPolicy.from_dict({"format": "arq-deploy/policy", "version": 1, "default": [8, 8], "layers": {}})
    export_and_validate(lm, pol, train, test, w8a8, validate_images=200)
    save_onnx(float_onnx(load("resnet20", str(shared / "models" / "resnet20-12fca82f.th")).model, lm.input_shape),
              fp32)
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from runtime_bench import ort_quantize_static

    from arq_deploy.export.pipeline import pick

    ort_quantize_static(fp32, train.x(pick(len(train), 512, 0)), work / "r20_ort_int8.onnx")  # the strongest peer
    return w8a8, fp32, test


def build_all(w8a8: Path, work: Path, batch: int, trials: int) -> dict[str, tuple[Path, float]]:
    """{name: (artifact dir, compile seconds)} for the TVM builds."""
    from arq_deploy.targets.backends import compile_onnx

    variants = {"tvm_float": {}, "tvm_int": {"integer": True}}
    if host_kernel() == "vpdpbusd":  # the AVX2-era kernel beside it, on the same machine
        variants["tvm_int_vpmaddwd"] = {"integer": True, "int_kernel": "vpmaddwd"}
    if trials:
        variants["tvm_float_tuned"] = {"tune_trials": trials, "tuning_db": work / "db_float"}
        variants["tvm_int_tuned"] = {"integer": True, "tune_trials": trials, "tuning_db": work / "db_int"}
    out = {}
    for name, kw in variants.items():
        t = time.perf_counter()
        out[name] = (compile_onnx(w8a8, "x86", work / name, batch_size=batch, single=False, **kw),
                     time.perf_counter() - t)
    return out


def machine_info() -> dict:
    """CPU model name, cores and the SIMD features that decide the kernels (from /proc/cpuinfo where it exists)."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() == "model name":
            info["cpu"] = val.strip()
        elif key.strip() == "flags":
            flags = set(val.split())
            info["simd"] = sorted(flags & {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni"})
            break
    return info


def host_kernel() -> str | None:
    """The integer conv kernel `compile --integer` picks on this machine (vpdpbusd with VNNI, else vpmaddwd)."""
    import tvm

    from arq_deploy.targets import int_kernels
    from arq_deploy.targets.registry import get_target, resolve_tvm_target

    k = int_kernels.select(tvm.target.Target(resolve_tvm_target(get_target("x86"))))
    return k.name if k is not None else None


def measure(runners: dict, batch: int, batches: int, rounds: int) -> dict[str, float]:
    """Best images/s of each runner over `rounds` interleaved rounds of `batches` batches."""
    rng = np.random.default_rng(0)
    xs = [rng.random((batch, 3, 32, 32), dtype=np.float32) for _ in range(batches)]
    for r in runners.values():
        r(xs[0])  # warm-up
    best = {k: 0.0 for k in runners}
    for _ in range(rounds):
        for k, r in runners.items():
            t = time.perf_counter()
            for x in xs:
                r(x)
            best[k] = max(best[k], batch * batches / (time.perf_counter() - t))
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=4, help="batches per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tune-trials", type=int, default=0)
    ap.add_argument("--work", default=None, help="keep exports, artifacts and tuning databases here")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "tvm_int8_bench.json"))
    args = ap.parse_args()

    from arq_deploy.core.fileio import write_json
    from arq_deploy.runtime.runners import OrtRunner
    from arq_deploy.runtime.tvm_runner import TvmRunner

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        w8a8, fp32, test = export_models(Path(args.shared), work)
        arts = build_all(w8a8, work, args.batch, args.tune_trials)
        runners = {"ort_w8a8": OrtRunner(w8a8, batch_size=args.batch),
                   "ort_fp32": OrtRunner(fp32, batch_size=args.batch),
                   "ort_quantize_static_int8": OrtRunner(work / "r20_ort_int8.onnx", batch_size=args.batch)}
        runners.update({k: TvmRunner(a) for k, (a, _) in arts.items()})
        x = test.x()
        ref = runners["ort_w8a8"](x).argmax(1)
        agreement = {k: float((r(x).argmax(1) == ref).mean()) for k, r in runners.items() if k != "ort_w8a8"}
        rate = measure(runners, args.batch, args.batches, args.rounds)
        manifests = {k: json.loads((a / "manifest.json").read_text())["compile"] for k, (a, _) in arts.items()}
    load_after = os.getloadavg()
    ratios = {"tvm_int / tvm_float": rate["tvm_int"] / rate["tvm_float"],
              "tvm_int / ort_w8a8": rate["tvm_int"] / rate["ort_w8a8"],
              "tvm_float / ort_w8a8": rate["tvm_float"] / rate["ort_w8a8"],
              "ort_w8a8 / ort_fp32": rate["ort_w8a8"] / rate["ort_fp32"],
              "tvm_int / ort_fp32": rate["tvm_int"] / rate["ort_fp32"],
              "tvm_int / ort_quantize_static_int8": rate["tvm_int"] / rate["ort_quantize_static_int8"]}
    if "tvm_int_vpmaddwd" in rate:
        ratios["tvm_int_vpmaddwd / tvm_float"] = rate["tvm_int_vpmaddwd"] / rate["tvm_float"]
        ratios["tvm_int / tvm_int_vpmaddwd"] = rate["tvm_int"] / rate["tvm_int_vpmaddwd"]
    for k in ("tvm_float_tuned", "tvm_int_tuned"):
        if k in rate:
            ratios[f"{k} / ort_w8a8"] = rate[k] / rate["ort_w8a8"]
    res = {
        "model": "resnet20 W8A8 (arq-deploy QDQ export; weights uint8 zp 128, activations uint8)",
        "batch": args.batch, "batches_per_round": args.batches, "rounds": args.rounds,
        "tune_trials": args.tune_trials,
        "images_per_s": {k: round(v, 1) for k, v in rate.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "top1_agreement_with_ort_w8a8": {k: round(v, 4) for k, v in agreement.items()},
        "agreement_images": int(len(x)),
        "compile_s": {k: round(s, 1) for k, (_, s) in arts.items()},
        "int_kernel": host_kernel(),
        "compile": {k: {"integer_lowering": m["schedule"].get("integer_lowering"),
                        "int_kernel": m["schedule"].get("int_kernel"), "tuning": m["schedule"].get(
            "tuning"), "funcs_tuned": m["schedule"].get("funcs_tuned")} for k, m in manifests.items()},
        "load_average": {"before": [round(v, 2) for v in load_before], "after": [round(v, 2) for v in load_after]},
        "machine": machine_info(),
    }
    write_json(args.out, res)
    width = max(map(len, rate))
    for k, v in rate.items():
        print(f"{k:<{width}}  {v:9.1f} img/s  agreement {agreement.get(k, 1.0):.4f}")
    for k, v in ratios.items():
        print(f"{k:<28} {v:.2f}x")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}; wrote {args.out}")


if __name__ == "__main__":
    main()
