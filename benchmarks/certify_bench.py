"""Certification throughput: noisy samples/s of each sampling path, and the time to certify K test images.

Reference: a Cohen-et-al.-style loop (their `Smooth._sample_noise`): torch eager fp32, the image repeated to a batch of
400, `torch.randn_like` noise, argmax counted per batch. Every other row is a path of this toolkit on the same model
(ResNet-20 gauss0.25), sampling the seeded Philox stream of `runtime.noise.noise_batches` (so its counts are
reproducible), except the row marked "RandomNormal in graph" (measured only: its noise cannot be replayed):
  loop    `Smooth.sample_counts` over a Runner (noise made in the main thread, then the forward pass)
  counts  `runner.counts` (noise made one or two batches ahead in a background thread: `runtime.noise`)
  graph   the smoothing graph (`export.smoothing_graph`): x, noise, σ in; counts out, one call per batch
  parallel  `runtime.sampling.ParallelOrtSampler`: one onnxruntime session with 1 intra-op thread, called from 2
          threads at once, each drawing its own batches' noise (batch-level instead of intra-op parallelism);
          `ParallelTvmSampler` likewise with 2 TVM VMs on 1-thread pools
The onnxruntime runners load a float graph with its option-A shortcuts as 1×1 convolutions (`runtime.graph_opt`,
exact); rows marked "no shortcut rewrite" load the exported graph as it is. Paths exist
for onnxruntime fp32, onnxruntime int8 (`quantize_static`, QDQ per channel, calibrated on noisy images), TVM x86 fp32
and the toolkit's W8A8 export (noisy-calibrated) in a TVM integer build (`compile --integer`), plus onnxruntime session
knobs. All paths are timed interleaved, `--repeats` rounds, best round kept, so that other
load on the machine hits every row alike; ratios are against the reference measured in the same run.

Two more rows frame the ratios. "bound: ... forward pass only" runs the fp32 onnxruntime session on one noisy batch
made once: no sampler of that session can beat it, so its ratio is the ceiling for fp32 on this machine.
"reference on the W8A8 model" is the same Cohen-style loop on the fake-quant torch model that the W8A8 export was made
from: the rows that sample that W8A8 model (TVM integer builds) are also given as ratios against it ("vs W8A8
ref"), a comparison on the same model.

Then CERTIFY (N0 = 100, N = 10,000, α = 0.001) of every (1000 / images)-th lossless test image with the fastest
reproducible path (or `--cert-path`): seconds, certified accuracy at r = 0, 0.25, 0.5, ACR.

    python benchmarks/certify_bench.py [--images 100] [--samples 4000] [--repeats 3] [--shared ../shared/data]
        [--cert-path NAME]
Incremental smoothing is measured by benchmarks/irs_bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIGMA = 0.25
REF = "reference: torch eager fp32 randn_like (Cohen et al.), b400"
# the same loop on the toolkit's W8A8 model (fake-quant torch, the model the search and fine-tuning produce): the
# baseline for the rows that sample that model (with TVM only)
REF_W8A8 = "reference on the W8A8 model: torch eager fake-quant randn_like (Cohen et al.), b400"
BOUND = "bound: ORT fp32 forward pass only (no noise, no counting) b100"


def cohen_reference(model, sigma: float, batch: int = 400):
    """Cohen et al.'s `_sample_noise` in torch eager fp32: counts of argmax f(x + σ·randn) over num samples."""
    import torch

    def sample(x: np.ndarray, num: int, sigma_: float, seed: int, purpose: str = "estimation") -> np.ndarray:
        torch.manual_seed(seed)
        xt = torch.from_numpy(x)
        counts = np.zeros(10, dtype=np.int64)
        with torch.no_grad():
            remaining = num
            while remaining > 0:
                this_batch = min(batch, remaining)
                remaining -= this_batch
                b = xt.repeat((this_batch, 1, 1, 1))
                noise = torch.randn_like(b) * sigma
                predictions = model(b + noise).argmax(1)
                counts += np.bincount(predictions.numpy(), minlength=10)
        return counts

    return sample


def forward_only(onnx_path, batch: int, sigma: float):
    """An upper bound for every fp32 onnxruntime sampler: the same session run on one noisy batch made once (no
    noise drawn, no argmax or counting per call). What a sampler loses against it is its sampling overhead."""
    from arq_deploy.runtime.runners import OrtRunner

    runner = OrtRunner(onnx_path, batch_size=batch)
    made: dict = {}

    def sample(x: np.ndarray, num: int, sigma_: float, seed: int, purpose: str = "estimation") -> None:
        if "xb" not in made:
            rng = np.random.default_rng(0)
            made["xb"] = (x[None] + np.float32(sigma) * rng.standard_normal((batch, *x.shape), dtype=np.float32))
        for _ in range(-(-num // batch)):
            runner.session.run(None, {runner.input_name: made["xb"]})

    return sample


def timed(fn, xs: list[np.ndarray], num: int, sigma: float) -> float:
    t = time.perf_counter()
    for i, x in enumerate(xs):
        fn(x, num, sigma, 1000 + i)
    return time.perf_counter() - t


def build_paths(lm, tmp: Path, train, sigma: float, batches: list[int], tvm: bool) -> dict:
    import onnx
    import torch

    from arq_deploy.certify.smooth import Smooth
    from arq_deploy.export.pipeline import load, pick
    from arq_deploy.export.qdq import float_onnx, save_onnx
    from arq_deploy.export.smoothing_graph import smoothing_graph
    from arq_deploy.runtime.runners import OrtRunner, TorchRunner
    from arq_deploy.runtime.sampling import (
        OrtInGraphNoise,
        OrtSmoothingGraph,
        ParallelOrtSampler,
        ParallelTvmSampler,
        TvmSmoothingGraph,
        ort_session_options,
    )

    sys.path.insert(0, str(Path(__file__).parent))
    from runtime_bench import ort_quantize_static

    fp32 = float_onnx(lm.model, lm.input_shape)
    save_onnx(fp32, tmp / "fp32.onnx")
    calib = train.x(pick(len(train), 512, 0))
    calib = calib + sigma * np.random.default_rng(1).standard_normal(calib.shape, dtype=np.float32)
    ort_quantize_static(tmp / "fp32.onnx", calib, tmp / "int8.onnx")
    models = {"fp32": fp32, "int8": onnx.load(str(tmp / "int8.onnx"))}
    threads = torch.get_num_threads()

    def loop(runner, b):
        return lambda x, n, sg, s, p="estimation": Smooth(runner, 10, sg, batch_size=b).sample_counts(x, n, s, p)

    def counts(runner):
        return runner.counts

    def with_options(path, b, **opts):
        import onnxruntime as ort

        from arq_deploy.runtime.graph_opt import ort_source

        r = OrtRunner(path, batch_size=b)
        r.session = ort.InferenceSession(ort_source(path)[0], sess_options=ort_session_options(**opts),
                                         providers=["CPUExecutionProvider"])
        return r

    paths = {REF: cohen_reference(lm.model, sigma),
             "torch eager fp32 runner.counts b400": counts(TorchRunner(lm.model, lm.input_shape, 10, batch_size=400))}
    paths[BOUND] = forward_only(tmp / "fp32.onnx", 100, sigma)
    for prec, model in models.items():
        onnx_path = tmp / f"{prec}.onnx"
        paths[f"ORT {prec} loop (Smooth.sample_counts) b400"] = loop(OrtRunner(onnx_path, batch_size=400), 400)
        for b in batches:
            paths[f"ORT {prec} runner.counts b{b}"] = counts(OrtRunner(onnx_path, batch_size=b))
        graph = smoothing_graph(model)
        for b in batches:
            paths[f"ORT {prec} smoothing graph b{b}"] = counts(OrtSmoothingGraph(graph, batch_size=b))
        if prec == "fp32":  # the same paths without runtime.graph_opt's shortcut rewrite (the runners' default)
            for b in batches:
                paths[f"ORT {prec} runner.counts b{b} no shortcut rewrite"] = counts(
                    OrtRunner(onnx_path, batch_size=b, rewrite=False))
                paths[f"ORT {prec} smoothing graph b{b} no shortcut rewrite"] = counts(
                    OrtSmoothingGraph(graph, batch_size=b, rewrite=False))
        paths[f"ORT {prec} counts b400 threads=1"] = counts(with_options(onnx_path, 400, threads=1))
        paths[f"ORT {prec} counts b400 opt=basic"] = counts(with_options(onnx_path, 400, threads=threads,
                                                                          opt_level="basic"))
        paths[f"ORT {prec} counts b400 no mem arena"] = counts(with_options(onnx_path, 400, threads=threads,
                                                                             mem_arena=False))
        for b in (100, 400):
            paths[f"ORT {prec} parallel 2 workers x 1 thread b{b}"] = counts(ParallelOrtSampler(onnx_path, 2, b))
        paths[f"ORT {prec} parallel smoothing graph 2x1 b400"] = counts(ParallelOrtSampler(graph, 2, 400))
        ing = OrtInGraphNoise(smoothing_graph(model, in_graph_noise=400, sigma=sigma))
        paths[f"ORT {prec} RandomNormal in graph b400 (not reproducible)"] = \
            lambda x, n, sg, s, p="estimation", g=ing: g.counts(x, n)
    if tvm:
        from arq_deploy.runtime.tvm_runner import TvmRunner
        from arq_deploy.targets.backends import compile_onnx

        tr = TvmRunner(compile_onnx(tmp / "fp32.onnx", "x86", tmp / "tvm-fp32", batch_size=100, single=False))
        paths["TVM x86 fp32 loop (Smooth.sample_counts) b100"] = loop(tr, 100)
        paths["TVM x86 fp32 runner.counts b100"] = counts(tr)
        save_onnx(smoothing_graph(fp32, packed=True, sigma=sigma), tmp / "sg-packed.onnx")
        tg = TvmSmoothingGraph(compile_onnx(tmp / "sg-packed.onnx", "x86", tmp / "tvm-sg", batch_size=101,
                                            single=False))
        paths["TVM x86 fp32 smoothing graph b100"] = counts(tg)
        # the toolkit's own W8A8 export of the same model (calibrated on noisy images), TVM integer build
        # (compile --integer: vpdpbusd with VNNI, else vpmaddwd)
        from arq_deploy.core.policy import QuantPolicy
        from arq_deploy.export.pipeline import export_and_validate

        report = export_and_validate(lm, QuantPolicy.uniform(8), train, train, tmp / "w8a8.onnx", sigma=sigma,
                                     validate_images=200)
        # the fake-quant torch model that export was made from, as export saved it beside the ONNX (NAME.qmodel.pt)
        paths[REF_W8A8] = cohen_reference(load("resnet20", report["torch_model"]).model.eval(), sigma)
        ti = TvmRunner(compile_onnx(tmp / "w8a8.onnx", "x86", tmp / "tvm-int", batch_size=400, single=False,
                                    integer=True))
        paths["TVM x86 arq W8A8 integer runner.counts b400"] = counts(ti)
        paths["TVM x86 arq W8A8 integer parallel 2 workers x 1 thread b400"] = counts(
            ParallelTvmSampler(ti.artifact, workers=2))
        paths["TVM x86 arq W8A8 integer parallel 2 workers x 1 thread b100"] = counts(ParallelTvmSampler(
            compile_onnx(tmp / "w8a8.onnx", "x86", tmp / "tvm-int-b100", batch_size=100, single=False, integer=True),
            workers=2))
        save_onnx(smoothing_graph(onnx.load(str(tmp / "w8a8.onnx")), packed=True, sigma=sigma),
                  tmp / "sg-int-packed.onnx")
        tgi = TvmSmoothingGraph(compile_onnx(tmp / "sg-int-packed.onnx", "x86", tmp / "tvm-sg-int", batch_size=401,
                                             single=False, integer=True))
        paths["TVM x86 arq W8A8 integer smoothing graph b400"] = counts(tgi)
    return paths


def certify_images(counter, x_all, labels, indices, sigma, n0, n, alpha):
    from arq_deploy.certify.smooth import Smooth
    from arq_deploy.certify.stats import summarize
    from arq_deploy.runtime.noise import input_seed

    smooth = Smooth(counter, 10, sigma, batch_size=400)
    certs = []
    t = time.perf_counter()
    for k, i in enumerate(indices):
        certs.append(smooth.certify(x_all[i], n0, n, alpha, seed=input_seed(0, int(i)), label=int(labels[i]),
                                    idx=int(i)))
        if (k + 1) % 10 == 0:
            s = summarize(certs, radii=(0.0, 0.25, 0.5))
            print(f"  {k + 1}/{len(indices)} images, {time.perf_counter() - t:.0f} s, r=0 {s.at(0.0):.2f} "
                  f"ACR {s.acr:.3f}", file=sys.stderr, flush=True)
    return certs, time.perf_counter() - t, summarize(certs, radii=(0.0, 0.25, 0.5, 0.75, 1.0))


class _CountsAdapter:
    """A counts-only object in the shape `Smooth` needs (name, input_shape, num_classes, counts)."""

    def __init__(self, fn, name):
        self.name, self.input_shape, self.num_classes, self._fn = name, (3, 32, 32), 10, fn

    def counts(self, x, n, sigma, seed, purpose="estimation"):
        return self._fn(x, n, sigma, seed, purpose)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--sigma", type=float, default=SIGMA)
    ap.add_argument("--samples", type=int, default=2000, help="noisy samples per image per timed round")
    ap.add_argument("--rate-images", type=int, default=1, help="images per timed round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="100,400,1000")
    ap.add_argument("--images", type=int, default=100, help="test images to certify (every 1000/K-th); 0: skip")
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--cert-path", default=None, help="row name to certify with (default: the fastest reproducible)")
    ap.add_argument("--no-tvm", action="store_true")
    ap.add_argument("--rows", default=None, help="regular expression: time only the rows it matches (and the reference)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "certify_bench.json"))
    args = ap.parse_args()

    import torch

    from arq_deploy.core.data import load_dataset
    from arq_deploy.export.pipeline import load

    shared = Path(args.shared)
    cifar = str(shared / "cifar10" / "cifar-10-batches-py")
    lm = load("resnet20", str(shared / "models" / "resnet20-gauss0.25.pt"))
    lm.model.eval()
    train, test = load_dataset(cifar, "train"), load_dataset(cifar, "test")
    tmp = Path(tempfile.mkdtemp(prefix="arq-certify-bench-"))
    t0 = time.perf_counter()
    paths = build_paths(lm, tmp, train, args.sigma, [int(b) for b in args.batches.split(",")], not args.no_tvm)
    if args.rows:
        keep = re.compile(args.rows)
        paths = {k: v for k, v in paths.items() if k == REF or keep.search(k)
                 or (k == REF_W8A8 and any("W8A8" in j and keep.search(j) for j in paths))}
    print(f"built {len(paths)} paths in {time.perf_counter() - t0:.0f} s; torch threads {torch.get_num_threads()}")

    xs = list(test.x(np.arange(0, 1000, 1000 // max(1, args.rate_images))[: args.rate_images]))
    for fn in paths.values():  # warm-up (first-call allocations, TVM thread pool)
        fn(xs[0], 400, args.sigma, 0)
    best = {k: float("inf") for k in paths}
    for _ in range(args.repeats):
        for k, fn in paths.items():
            best[k] = min(best[k], timed(fn, xs, args.samples, args.sigma))
    rates = {k: len(xs) * args.samples / s for k, s in best.items()}
    ref = rates[REF]
    same = {k: r / rates[REF_W8A8] for k, r in rates.items() if REF_W8A8 in rates and ("W8A8" in k)}
    print(f"\n{'path (σ = %.2f, ResNet-20 gauss0.25)' % args.sigma:62s} {'samples/s':>10s} {'vs ref':>7s} "
          f"{'vs W8A8 ref':>11s}")
    for k, r in rates.items():
        print(f"{k:62s} {r:10,.0f} {r / ref:6.2f}x" + (f" {same[k]:10.2f}x" if k in same else ""))

    out = {"model": "resnet20-gauss0.25", "sigma": args.sigma, "samples_per_round": args.samples * len(xs),
           "repeats": args.repeats, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_average_at_end": os.getloadavg(), "samples_per_s": rates,
           "ratio_vs_reference": {k: r / ref for k, r in rates.items()},
           "ratio_vs_w8a8_reference": same}

    if args.images > 0:
        reproducible = {k: r for k, r in rates.items()
                        if k not in (REF, REF_W8A8, BOUND) and "not reproducible" not in k}
        name = args.cert_path or max(reproducible, key=reproducible.get)
        counter = _CountsAdapter(paths[name], name)
        step = 1000 // args.images
        idx = np.arange(0, 1000, step)[: args.images]
        certs, secs, summ = certify_images(counter, test.x(np.arange(1000)), test.labels, idx, args.sigma,
                                           args.n0, args.n, args.alpha)
        acc = dict(zip(summ.radii, summ.certified_accuracy))
        print(f"\nCERTIFY {len(idx)} images (every {step}th lossless test image), N0={args.n0}, N={args.n}, "
              f"α={args.alpha}, path: {name}")
        print(f"  {secs:.1f} s ({secs / len(idx):.2f} s/image, {len(idx) * (args.n0 + args.n) / secs:,.0f} samples/s)")
        print("  certified accuracy r=0/0.25/0.5/0.75/1.0: " + " / ".join(f"{acc[r] * 100:.0f}%" for r in summ.radii)
              + f"   ACR {summ.acr:.3f}   abstain {summ.abstain_rate * 100:.0f}%")
        out["certify"] = {"path": name, "images": len(idx), "step": step, "n0": args.n0, "n": args.n,
                          "alpha": args.alpha, "seconds": secs, "seconds_per_image": secs / len(idx),
                          "certified_accuracy": {format(r, "g"): a for r, a in acc.items()}, "acr": summ.acr,
                          "abstain_rate": summ.abstain_rate,
                          "reference_seconds_estimate": len(idx) * (args.n0 + args.n) / ref}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
