"""Fast sampling (deploy/runtime/sampling.py) and the smoothing graph (export/smoothing_graph.py) against Smooth.sample_counts.

A small fixed random CNN (3×8×8 -> 5 classes, last layer scaled so logits are well separated) exported to ONNX, run by
torch, onnxruntime and TVM: the same seed gives the same counts on every backend, batch size and path.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from arq_deploy.certify.smooth import Smooth
from arq_deploy.core.errors import ArqError, CertificationInputError
from arq_deploy.runtime.noise import counts_loop, noise_batches, noise_stream
from arq_deploy.runtime.sampling import OrtInGraphNoise, OrtSmoothingGraph, TvmSmoothingGraph

SHAPE, K, SIGMA = (3, 8, 8), 5, 0.5


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    import torch

    from arq_deploy.export.qdq import float_onnx, save_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(32, K)).eval()
    with torch.no_grad():
        net[-1].weight.mul_(20.0)
    d = tmp_path_factory.mktemp("sampling")
    model = float_onnx(net, SHAPE)
    save_onnx(model, d / "small.onnx")
    x = np.random.default_rng(3).random(SHAPE, dtype=np.float32)
    return net, model, d, x


@pytest.fixture(scope="module")
def runners(small):
    from arq_deploy.runtime.runners import OrtRunner, TorchRunner

    net, _, d, _ = small
    return {"torch": TorchRunner(net, SHAPE, K, batch_size=64), "ort": OrtRunner(d / "small.onnx", batch_size=64)}


@pytest.fixture(scope="module")
def tvm_runner(small):
    pytest.importorskip("tvm")
    from arq_deploy.runtime.tvm_runner import TvmRunner
    from arq_deploy.targets.backends import compile_onnx

    _, _, d, _ = small
    return TvmRunner(compile_onnx(d / "small.onnx", "x86", d / "tvm", batch_size=50, single=False))


def plain_loop(runner, x, n, seed, purpose="estimation", bs=100):
    """The counts written out: argmax of the runner's logits on x + σ·ε for the stream's ε (no Smooth, no threads)."""
    counts = np.zeros(K, np.int64)
    for eps in noise_batches(SHAPE, n, seed, purpose, bs):
        counts += np.bincount(runner(x[None] + np.float32(SIGMA) * eps).argmax(1), minlength=K)
    return counts


def test_counts_equal_smooth_on_every_backend_and_batch_size(small, runners, tvm_runner):
    x = small[3]
    ref = Smooth(runners["torch"], K, SIGMA, batch_size=1000).sample_counts(x, 250, seed=7)
    np.testing.assert_array_equal(plain_loop(runners["torch"], x, 250, 7), ref)
    assert ref.dtype == np.int64 and ref.sum() == 250 and (ref > 0).sum() >= 2  # not a trivial constant classifier
    for name, r in {**runners, "tvm": tvm_runner}.items():
        got = r.counts(x, 250, SIGMA, 7)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, ref, err_msg=name)
        for bs in (33, 100):
            np.testing.assert_array_equal(Smooth(r, K, SIGMA, batch_size=bs).sample_counts(x, 250, seed=7), ref,
                                          err_msg=f"{name} Smooth batch {bs}")
    sel = runners["ort"].counts(x, 250, SIGMA, 7, purpose="selection")
    np.testing.assert_array_equal(sel, Smooth(runners["ort"], K, SIGMA).sample_counts(x, 250, 7, "selection"))
    for bs in (1, 64, 1000):  # counts_loop alone, any batch size
        np.testing.assert_array_equal(counts_loop(runners["ort"]._run, x, 250, SIGMA, 7, batch_size=bs), ref)


def test_parallel_samplers_equal_the_loop(small, runners, tvm_runner):
    """2 workers × 1 thread (onnxruntime sessions / TVM VMs), each drawing its own batches' noise: the same counts
    as the sequential loop, for a partial last batch too, and the same certificate."""
    from arq_deploy.runtime.sampling import ParallelOrtSampler, ParallelTvmSampler

    _, _, d, x = small
    want = runners["ort"].counts(x, 230, SIGMA, 13)
    tvm_par = ParallelTvmSampler(tvm_runner.artifact, workers=2)
    ort_par = ParallelOrtSampler(d / "small.onnx", workers=2, batch_size=64)
    for sampler in (tvm_par, ort_par):
        np.testing.assert_array_equal(sampler.counts(x, 230, SIGMA, 13), want, err_msg=sampler.name)
        np.testing.assert_array_equal(sampler.counts(x, 230, SIGMA, 13, "selection"),
                                      runners["ort"].counts(x, 230, SIGMA, 13, "selection"), err_msg=sampler.name)
    assert tvm_par.batch_size == 50 and tvm_par.workers == 2 and all(r.threads == 1 for r in tvm_par._runners)
    ref = Smooth(runners["ort"], K, SIGMA).certify(x, 50, 300, 0.01, seed=4)
    got = Smooth(tvm_par, K, SIGMA).certify(x, 50, 300, 0.01, seed=4)
    assert (got.prediction, got.count_a, got.radius) == (ref.prediction, ref.count_a, ref.radius)
    # logits (IRS's ζ labels, PREDICT): batches dealt across the VMs, the same as one runner, a partial batch too
    xs = np.random.default_rng(2).random((130, *SHAPE), dtype=np.float32)
    np.testing.assert_array_equal(tvm_par(xs), tvm_runner(xs))
    np.testing.assert_array_equal(tvm_par(xs[:7]), tvm_runner(xs[:7]))
    with pytest.raises(ArqError, match="shape"):
        tvm_par(xs[:, :1])


def test_smoothing_graph_counts_equal_the_loop(small, runners):
    from arq_deploy.export.smoothing_graph import smoothing_graph

    _, model, _, x = small
    want = runners["ort"].counts(x, 250, SIGMA, 11)
    for op in ("onehot", "equal"):
        g = smoothing_graph(model, count_op=op)
        onnx.checker.check_model(g, full_check=True)
        assert g.ir_version == 10 and [i.name for i in g.graph.input] == ["x", "noise", "sigma"]
        for bs in (64, 100):  # 250 = partial last batch for both
            sg = OrtSmoothingGraph(g, batch_size=bs)
            np.testing.assert_array_equal(sg.counts(x, 250, SIGMA, 11), want, err_msg=f"{op} b{bs}")
        eps = next(noise_batches(SHAPE, 64, 11, "estimation", 64))
        one = sg.batch_counts(x, eps, SIGMA)
        loop = np.bincount(runners["ort"](x[None] + np.float32(SIGMA) * eps).argmax(1), minlength=K)
        np.testing.assert_array_equal(one, loop)
    smooth = Smooth(OrtSmoothingGraph(smoothing_graph(model), batch_size=100), K, SIGMA)
    ref = Smooth(runners["ort"], K, SIGMA).certify(x, 50, 300, 0.01, seed=2)
    got = smooth.certify(x, 50, 300, 0.01, seed=2)
    assert (got.prediction, got.count_a, got.radius) == (ref.prediction, ref.count_a, ref.radius)


def test_tvm_packed_smoothing_graph(small, tvm_runner):
    from arq_deploy.export.qdq import save_onnx
    from arq_deploy.export.smoothing_graph import smoothing_graph
    from arq_deploy.targets.backends import compile_onnx

    _, model, d, x = small
    g = smoothing_graph(model, packed=True, sigma=SIGMA)
    onnx.checker.check_model(g, full_check=True)
    save_onnx(g, d / "packed.onnx")
    tg = TvmSmoothingGraph(compile_onnx(d / "packed.onnx", "x86", d / "tvm-packed", batch_size=51, single=False))
    assert (tg.batch_size, tg.num_classes, tg.sigma) == (50, K, SIGMA)
    for n in (250, 130):  # 130: a padded last batch
        np.testing.assert_array_equal(tg.counts(x, n, SIGMA, 5), tvm_runner.counts(x, n, SIGMA, 5), err_msg=str(n))
    with pytest.raises(CertificationInputError, match="compiled for"):
        tg.counts(x, 10, 0.25, 5)


def test_in_graph_noise_variant_runs(small):
    from arq_deploy.export.smoothing_graph import smoothing_graph

    g = smoothing_graph(small[1], in_graph_noise=40, sigma=SIGMA)
    onnx.checker.check_model(g, full_check=True)
    c = OrtInGraphNoise(g).counts(small[3], 100)
    assert c.dtype == np.int64 and c.sum() == 120  # whole batches: not the Philox stream, measurement only


def test_noise_stream_equals_noise_batches_and_stops_cleanly():
    ref = np.concatenate(list(noise_batches(SHAPE, 230, 4, "selection", 64)))
    np.testing.assert_array_equal(np.concatenate(list(noise_stream(SHAPE, 230, 4, "selection", 64))), ref)
    it = noise_stream(SHAPE, 10_000, 4, "selection", 64)
    np.testing.assert_array_equal(next(it), ref[:64])
    it.close()  # the producer thread notices and ends
    with pytest.raises(CertificationInputError):
        list(noise_stream(SHAPE, 10, 1.5, "selection", 4))  # a bad seed raised in the thread reaches the caller


def test_counts_rejects_bad_arguments(runners, small):
    x = small[3]
    with pytest.raises(CertificationInputError):
        runners["ort"].counts(x, 0, SIGMA, 1)
    with pytest.raises(CertificationInputError):
        runners["ort"].counts(x, 10, -1.0, 1)
    with pytest.raises(CertificationInputError):
        runners["ort"].counts(x[None], 10, SIGMA, 1)
