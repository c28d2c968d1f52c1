"""A Runner on a remote device (a Raspberry Pi, a Jetson, another PC) through TVM's RPC.

On the device, start a server once (it needs only the `apache-tvm` wheel for the device's architecture):

    python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090

then, on the workstation, `RpcTvmRunner(artifact_dir, "HOST:9090")` verifies the artifact (every file against the
sha256 in its manifest), uploads its libraries into the server's session folder, loads them there and runs the Relax
VM on the device: inputs go over the network, the model runs on the device's CPU or GPU, logits come back. The
artifact must have been compiled for the device's target (e.g. `arq-deploy compile m.onnx --target rpi4`). An
integer build's bit-packed weights (`weights.bin`) are unpacked here and copied into the device's memory once.
"""

from __future__ import annotations

import socket
import struct
import threading
import uuid
from pathlib import Path

import numpy as np

from arq_deploy.core.artifact import Artifact, load_artifact
from arq_deploy.core.errors import ArqError
from arq_deploy.runtime.runners import CompiledRunner, _batched, check_input

DEFAULT_PORT = 9090
# TVM's RPC handshake (tvm.rpc.base): a little-endian int32 magic, then a length-prefixed key; the server answers
# with an int32 code (magic + 0 success, + 1 duplicate, + 2 key mismatch). Kept here so the reachability check
# needs no TVM import.
_RPC_MAGIC = 0xFF271
_PROBE_KEY = b"client:arq-deploy-reachability-check"


class RpcUnreachableError(ArqError):
    """No TVM RPC server answers at the given address."""


def server_hint(port: int | str = DEFAULT_PORT) -> str:
    return f"start one on the device with `python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}`"


def parse_address(address: str) -> tuple[str, int]:
    """"HOST:PORT" or "[IPv6]:PORT" -> (host, port); ArqError otherwise."""
    text = str(address).strip()
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ArqError(f"--remote must be HOST:PORT (e.g. 192.168.1.20:{DEFAULT_PORT}), got {address!r}")
    return host, int(port)


def check_reachable(address: str, timeout_s: float = 10.0) -> tuple[str, int]:
    """Check that a TVM RPC server answers at address, without opening a session, and return (host, port).

    Sends TVM's RPC magic with a key no server expects: a TVM server answers "key mismatch" and goes on waiting for
    clients. Raises RpcUnreachableError naming the address and how to start a server otherwise.
    """
    host, port = parse_address(address)

    def fail(why: str):
        raise RpcUnreachableError(f"cannot reach a TVM RPC server at {address} ({why}); {server_hint(port)}")

    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.settimeout(timeout_s)
            s.sendall(struct.pack("<i", _RPC_MAGIC) + struct.pack("<i", len(_PROBE_KEY)) + _PROBE_KEY)
            answer = _recv_exactly(s, 4)
    except socket.timeout:
        fail(f"no answer within {timeout_s:g} s: a firewall, a wrong host, or a server busy with another session")
    except socket.gaierror as e:
        fail(f"unknown host: {e.strerror or e}")
    except OSError as e:
        fail(e.strerror or str(e) or type(e).__name__)
    code = struct.unpack("<i", answer)[0] if answer else None
    if code not in (_RPC_MAGIC, _RPC_MAGIC + 1, _RPC_MAGIC + 2):
        fail("something answers there, but not TVM's RPC protocol")
    return host, port


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


class RpcTvmRunner(CompiledRunner):
    """x: float32 N×C×H×W in [0, 1] -> float32 logits N×K, computed on a remote device by a verified artifact.

    The same interface as `arq_deploy.runtime.tvm_runner.TvmRunner` (`__call__`, `counts`, `input_shape`, `num_classes`,
    `batch_size`): batches of the artifact's compiled size run through its `main` library (the last partial batch
    zero-padded), and at most `single_max` images through the batch-1 library when the artifact has one. Each call
    copies the batch to the device and the logits back over the network, so latency includes the link.

    threads: when given, the server's TVM thread pool is set to that many threads (default: TVM's default on the
    device). The RPC session serves one call at a time: calls from several threads are serialised.
    """

    def __init__(self, artifact: str | Path | Artifact, address: str, *, threads: int | None = None,
                 single_max: int | None = None, connect_timeout_s: float = 10.0):
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        self.address = str(address)
        host, port = check_reachable(self.address, connect_timeout_s)
        import tvm
        from tvm import rpc

        self._tvm = tvm
        self.name = "tvm-rpc"
        self.input_shape = self.artifact.input_shape
        self.num_classes = self.artifact.num_classes
        self.batch_size = self.artifact.batch_size
        self._lock = threading.Lock()
        try:
            self.session = rpc.connect(host, port)
        except Exception as e:  # TVM raises its own error types
            raise RpcUnreachableError(f"cannot open a TVM RPC session at {self.address} ({_first_line(e)}); "
                                      f"{server_hint(port)}") from None
        self._dev = self._device()
        if threads:
            self.session.get_function("runtime.config_threadpool")(1, int(threads))
        self._load_libraries(single_max)

    def _device(self):
        kind = str(self.artifact.tvm_target.get("kind", "llvm"))
        try:
            return self.session.device("cpu" if kind in ("llvm", "c") else kind, 0)
        except Exception as e:
            raise ArqError(f"artifact {self.artifact.path} targets {kind!r}, a device this TVM cannot address: "
                           f"{_first_line(e)}") from None

    def _load_vm(self, path: Path, data: bytes):
        """Upload a library's verified bytes (under a fresh name) and load it remotely."""
        from tvm import relax

        remote_name = f"{uuid.uuid4().hex}-{path.name}"
        try:
            self.session.upload(bytearray(data), remote_name)
            return relax.VirtualMachine(self.session.load_module(remote_name), self._dev)
        except Exception as e:  # a library for another CPU/ABI, a missing CUDA driver on the device, ...
            raise ArqError(f"the device at {self.address} cannot load {path} (built for target "
                           f"{self.artifact.target_name!r}): {_first_line(e)}") from None

    def _run(self, xb: np.ndarray) -> np.ndarray:
        with self._lock:  # one RPC session: one call at a time
            return super()._run(xb)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return _batched(self._run, check_input(x, self.input_shape), self.batch_size, self.num_classes)

    def close(self) -> None:
        """Drop the remote VMs and the session (the server removes the uploaded files when the session ends)."""
        self._main = self._single = None
        self._params = []
        self._vms.clear()
        self.session = None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # TVM errors end with the message after a traceback; prefer a line that says what failed
    for ln in reversed(lines):
        if "Error" in ln or "failed" in ln.lower():
            return ln[:300]
    return (lines[-1] if lines else type(e).__name__)[:300]
