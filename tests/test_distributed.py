"""Distributed certification over Ray (real Ray, no mocks): same certificates as the sequential run, resumable."""

import socket

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from arq_deploy.certify.distributed import RayConnectionError, build_runner, certify_dataset_ray, connect, runner_spec
from arq_deploy.certify.results import CertifyLog, certify_dataset
from arq_deploy.certify.smooth import Smooth
from arq_deploy.core.errors import ArqError, ModelFormatError, UnknownNameError

SHAPE = (1, 6, 6)
K = 3
N0, N, ALPHA, SEED, SIGMA, BATCH = 20, 300, 0.01, 7, 0.25, 128
META = {"sigma": SIGMA, "n0": N0, "n": N, "alpha": ALPHA, "seed": SEED, "model": "toy"}
KEY = ("idx", "label", "prediction", "count_a", "pa_lower", "radius", "n0", "n")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A linear ONNX classifier (Flatten -> Gemm) over 1×6×6 images, and 10 images with labels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    d = int(np.prod(SHAPE))
    w = rng.normal(0, 1.0, (K, d)).astype(np.float32)
    b = -(w.sum(1) * 0.5).astype(np.float32)  # centre: images around 0.5 get varied classes
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"], axis=1),
         helper.make_node("Gemm", ["f", "w", "b"], ["logits"], transB=1)],
        "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", K])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("toy") / "toy.onnx"
    onnx.save(model, str(path))
    x = rng.uniform(0, 1, (10, *SHAPE)).astype(np.float32)
    # labels: the clean prediction for most, a wrong one for a few (so 'correct' varies)
    labels = (x.reshape(len(x), -1) @ w.T + b).argmax(1)
    labels[::4] = (labels[::4] + 1) % K
    return path, x, labels


@pytest.fixture(scope="module")
def sequential(toy, tmp_path_factory):
    path, x, labels = toy
    smooth = Smooth(build_runner(runner_spec(path, batch_size=BATCH), threads=1), K, SIGMA, batch_size=BATCH)
    with CertifyLog(tmp_path_factory.mktemp("seq") / "seq.tsv", META) as log:
        return certify_dataset(smooth, x, labels, range(len(x)), N0, N, ALPHA, SEED, log, progress=False)


def key(certs):
    return [tuple(getattr(c, f) for f in KEY) for c in certs]


@pytest.fixture(autouse=True)
def no_ray_connection():
    assert not ray.is_initialized()
    yield
    assert not ray.is_initialized(), "certify_dataset_ray must shut down the Ray it started"


def test_sequential_toy_is_not_trivial(sequential):
    preds = {c.prediction for c in sequential}
    assert len(preds) >= 2 and any(c.correct for c in sequential) and not all(c.correct for c in sequential)


def test_local_two_workers_match_sequential(toy, sequential, tmp_path):
    path, x, labels = toy
    node_of = {}
    with CertifyLog(tmp_path / "ray.tsv", META) as log:
        certs = certify_dataset_ray(runner_spec(path, batch_size=BATCH), x, labels, range(len(x)), N0, N, ALPHA, SEED,
                                    SIGMA, K, log, address="local", num_cpus=2, num_workers=2, batch_size=BATCH,
                                    progress=False, node_of=node_of)
    assert key(certs) == key(sequential)
    assert [c.idx for c in certs] == list(range(len(x)))
    assert sorted(node_of) == list(range(len(x)))
    with CertifyLog(tmp_path / "ray.tsv", META) as again:  # every row written once, as the returned certificates
        assert sorted(key(again.certificates())) == key(sequential)


def test_two_node_cluster(toy, sequential, tmp_path):
    from ray.cluster_utils import Cluster

    path, x, labels = toy
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        node_of = {}
        with CertifyLog(tmp_path / "cluster.tsv", META) as log:
            certs = certify_dataset_ray(runner_spec(path, batch_size=BATCH), x, labels, range(len(x)), N0, N, ALPHA,
                                        SEED, SIGMA, K, log, address=cluster.address, batch_size=BATCH,
                                        progress=False, node_of=node_of)
        assert key(certs) == key(sequential)
        assert len(set(node_of.values())) == 2, "each node has one CPU, so each ran one worker"
    finally:
        cluster.shutdown()


def test_resume_on_a_running_ray(toy, sequential, tmp_path):
    """A log holding some rows (and a torn last line): only the rest is computed, each row once. The caller's own
    Ray connection is used and left running; a worker's ArqError reaches the driver as itself."""
    path, x, labels = toy
    out = tmp_path / "resume.tsv"
    first = [1, 4, 5, 8]
    with CertifyLog(out, META) as log:
        for c in sequential:
            if c.idx in first:
                log.append(c)
    with open(out, "a") as f:  # a row cut short by a crash is dropped on reopening
        f.write("9\t2\t1\t0.3")
    node_of = {}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with CertifyLog(out, META) as log:
            certs = certify_dataset_ray(runner_spec(path, batch_size=BATCH), x, labels, range(len(x)), N0, N, ALPHA,
                                        SEED, SIGMA, K, log, address="auto", batch_size=BATCH, progress=False,
                                        node_of=node_of)
        assert ray.is_initialized(), "a connection it did not start is left alone"
        assert sorted(node_of) == [i for i in range(len(x)) if i not in first]
        assert key(certs) == key(sequential)
        with CertifyLog(out, META) as log:  # CertifyLog refuses a file holding an index twice
            assert sorted(c.idx for c in log.certificates()) == list(range(len(x)))

        bad = {"kind": "onnxruntime", "path": str(tmp_path / "missing.onnx")}
        with CertifyLog(tmp_path / "bad.tsv", META) as log, pytest.raises(ModelFormatError, match="missing.onnx"):
            certify_dataset_ray(bad, x, labels, [0, 1], N0, N, ALPHA, SEED, SIGMA, K, log, progress=False)
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    # nothing left to do: Ray is not even contacted
    with CertifyLog(out, META) as log:
        again = certify_dataset_ray(runner_spec(path), x, labels, range(len(x)), N0, N, ALPHA, SEED, SIGMA, K, log,
                                    address="127.0.0.1:1", progress=False)
    assert key(again) == key(sequential)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}", "no-port-here", "host:99999"])
def test_unreachable_address_is_a_clear_error(toy, tmp_path, address):
    """Refused by the address check before Ray is asked to connect (so no wait for Ray's own connection retries):
    a one-line message that names the address and says what is wrong with it; no certificate is logged."""
    from arq_deploy.certify.results import COLUMN_LINE

    path, x, labels = toy
    addr = address.format(port=_closed_port())
    with CertifyLog(tmp_path / "x.tsv", META) as log, pytest.raises(RayConnectionError) as err:
        certify_dataset_ray(runner_spec(path), x, labels, [0, 1], N0, N, ALPHA, SEED, SIGMA, K, log,
                            address=addr, progress=False)
    msg = str(err.value)
    assert isinstance(err.value, ArqError) and "\n" not in msg
    if ":" in addr and addr.rsplit(":", 1)[1].isdigit() and int(addr.rsplit(":", 1)[1]) < 65536:  # well formed
        assert f"cannot reach a Ray cluster at {addr}: " in msg and "after at most" in msg, msg
    else:
        assert f"Ray address {addr!r} is not 'auto', 'local' or HOST:PORT" in msg, msg
    assert [l for l in (tmp_path / "x.tsv").read_text().splitlines() if not l.startswith("#")] == [COLUMN_LINE]


def test_auto_with_unreachable_ray_address_env(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    with pytest.raises(RayConnectionError, match="cannot reach"):
        connect("auto")


def test_runner_spec(toy, tmp_path):
    path, _, _ = toy
    assert runner_spec(path, batch_size=64) == {"kind": "onnxruntime", "path": str(path.resolve()), "batch_size": 64}
    assert runner_spec(tmp_path) == {"kind": "tvm", "artifact": str(tmp_path.resolve())}
    with pytest.raises(ArqError, match="export"):
        runner_spec(path, "torch")
    with pytest.raises(UnknownNameError):
        runner_spec(path, "nope")
    with pytest.raises(UnknownNameError):
        certify_dataset_ray({"kind": "pickle"}, np.zeros((1, *SHAPE), np.float32), [0], [0], N0, N, ALPHA, SEED,
                            SIGMA, K, None, progress=False)
    assert build_runner(runner_spec(path), threads=1).num_classes == K
