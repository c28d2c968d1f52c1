"""TVM RPC runner against a real RPC server on loopback: same logits as the local TVM runner, same top-1 as
onnxruntime, same certificates through `certify --remote`; unreachable addresses and tampered artifacts refused."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from test_cli import assert_one_line_error

from arq_deploy.core.errors import ArqError, ArtifactIntegrityError
from arq_deploy.runtime.rpc_runner import RpcTvmRunner, RpcUnreachableError, check_reachable, parse_address

SERVER_START_S = 180  # the server imports TVM twice (listener and worker): slow on a loaded machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def remote(request, tmp_path_factory):
    """(address, artifact dir, onnx path): an RPC server on a free loopback port (started first, so that it
    imports TVM while the digits model is exported and compiled), and a W8A8 digits artifact for x86."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port",
                               str(port), "--port-end", str(port + 1)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        from arq_deploy.core.policy import QuantPolicy
        from arq_deploy.export.pipeline import export_and_validate
        from arq_deploy.targets.backends import compile_onnx

        lm, _ = request.getfixturevalue("digits_model")
        train, test = request.getfixturevalue("digits")
        d = tmp_path_factory.mktemp("rpc")
        export_and_validate(lm, QuantPolicy.uniform(8), train, test, d / "w8a8.onnx", sigma=0.25,
                            validate_images=100)
        art = compile_onnx(d / "w8a8.onnx", "x86", d / "x86", batch_size=32)
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                check_reachable(address, timeout_s=5)
                break
            except RpcUnreachableError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the TVM RPC server did not come up on {address} (exit code {server.poll()})")
                time.sleep(0.5)
        yield address, art, d / "w8a8.onnx"
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its worker process (its own session)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_remote_runner_matches_local_tvm_and_onnxruntime(remote, digits):
    from arq_deploy.runtime.runners import OrtRunner
    from arq_deploy.runtime.tvm_runner import TvmRunner

    address, art, onnx_path = remote
    _, test = digits
    x = test.x(np.arange(0, 540, 6))  # 90 images: two full batches of 32 and a padded remainder
    noisy = x + 0.25 * np.random.default_rng(0).standard_normal(x.shape, dtype=np.float32)
    rpc = RpcTvmRunner(art, address)
    local, ort = TvmRunner(art), OrtRunner(onnx_path)
    assert (rpc.input_shape, rpc.num_classes, rpc.batch_size) == (local.input_shape, 10, 32)
    for batch in (x, noisy, x[:3]):  # x[:3] runs through the batch-1 library
        r, lo, o = rpc(batch), local(batch), ort(batch)
        assert r.shape == (len(batch), 10) and r.dtype == np.float32
        assert np.abs(r - lo).max() <= 1e-5  # the same library on the same CPU
        assert (r.argmax(1) == o.argmax(1)).all()
        assert np.abs(r - o).max() < 0.05
    assert (rpc.counts(x[5], 300, 0.25, seed=3) == local.counts(x[5], 300, 0.25, seed=3)).all()
    rpc.close()


def test_certify_remote_matches_local_certification(remote, cli, digits, tmp_path):
    from arq_deploy.certify.results import CertifyLog, certify_dataset
    from arq_deploy.certify.smooth import Smooth
    from arq_deploy.runtime.tvm_runner import TvmRunner

    address, art, _ = remote
    out = tmp_path / "remote.tsv"
    rc, stdout, err = cli("certify", art, "--remote", address, "--sigma", "0.25", "--n0", "20", "--n", "200",
                          "--skip", "270", "--out", out)
    assert rc == 0, err
    rows = [ln.split("\t") for ln in out.read_text().splitlines() if ln and not ln.startswith(("#", "idx"))]
    assert [int(r[0]) for r in rows] == [0, 270]
    _, test = digits
    with CertifyLog(tmp_path / "local.tsv", {"local": True}) as log:
        certs = certify_dataset(Smooth(TvmRunner(art), 10, 0.25, batch_size=500), test.x(), test.labels, [0, 270],
                                20, 200, 0.001, 0, log, progress=False)
    without_time = [i for i, c in enumerate(rows[0]) if i != 5]  # idx label predict radius correct [time] ...
    assert [[r[i] for i in without_time] for r in rows] == \
        [[c.to_row().split("\t")[i] for i in without_time] for c in certs]
    assert '"backend": "tvm-rpc"' in (tmp_path / "remote.summary.json").read_text()


def test_unreachable_address_is_one_clear_error(remote, cli, tmp_path):
    _, art, _ = remote
    port = free_port()  # nothing listens there
    for cmd in (["certify", art, "--remote", f"127.0.0.1:{port}", "--sigma", "0.25", "--out", tmp_path / "c.tsv"],
                ["bench", art, "--remote", f"127.0.0.1:{port}", "--out", tmp_path / "b.json"]):
        rc, out, err = cli(*cmd)
        assert_one_line_error(rc, out, err, f"127.0.0.1:{port}", "python -m tvm.exec.rpc_server")
    assert_one_line_error(*cli("certify", art, "--remote", "no-port-given", "--sigma", "0.25",
                               "--out", tmp_path / "c.tsv"), "HOST:PORT")
    assert list(tmp_path.iterdir()) == []


def test_something_else_listening_is_not_an_rpc_server():
    with socket.socket() as s:  # a listener that answers with bytes of another protocol, then closes
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]

        def answer():
            conn, _ = s.accept()
            conn.recv(64)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()

        import threading

        t = threading.Thread(target=answer)
        t.start()
        with pytest.raises(RpcUnreachableError, match="not TVM's RPC protocol"):
            check_reachable(f"127.0.0.1:{port}", timeout_s=5)
        t.join()


def test_address_parsing():
    assert parse_address("192.168.1.20:9090") == ("192.168.1.20", 9090)
    assert parse_address("[::1]:9091") == ("::1", 9091)
    assert parse_address("jetson.local:9090") == ("jetson.local", 9090)
    for bad in ("jetson.local", ":9090", "host:0", "host:70000", "host:port"):
        with pytest.raises(ArqError, match="HOST:PORT"):
            parse_address(bad)


def test_tampered_artifact_is_refused_before_upload(remote, tmp_path):
    address, art, _ = remote
    bad = tmp_path / "tampered"
    shutil.copytree(art, bad)
    with open(bad / "model.so", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactIntegrityError, match="model.so"):
        RpcTvmRunner(bad, address)


def test_remote_runner_runs_an_integer_build_with_packed_weights(remote, digits, tmp_path):
    """An integer build keeps its weights bit-packed in weights.bin (core/weights.py): the RPC runner unpacks them
    here, copies them to the device once and passes them on every call; the logits equal the local runner's, and a
    tampered weights file is refused before anything is uploaded."""
    from arq_deploy.runtime.tvm_runner import TvmRunner
    from arq_deploy.targets.backends import compile_onnx

    address, _, onnx_path = remote
    art = compile_onnx(onnx_path, "x86", tmp_path / "int", batch_size=32, integer=True)
    assert (art / "weights.bin").is_file()
    x = digits[1].x(np.arange(0, 300, 6))
    rpc = RpcTvmRunner(art, address)
    for batch in (x, x[:3]):  # x[:3]: the batch-1 library, with the same weights
        assert np.array_equal(rpc(batch), TvmRunner(art)(batch))
    rpc.close()
    data = bytearray((art / "weights.bin").read_bytes())
    data[0] ^= 0xFF
    (art / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="weights.bin"):
        RpcTvmRunner(art, address)
