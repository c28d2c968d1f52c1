"""Runners: one interface over torch (fake-quant), onnxruntime and TVM.

A `Runner` maps a float32 batch N×C×H×W of RGB pixels in [0, 1] (normalisation is inside the model) to float32 logits
N×K. Runners batch internally (`batch_size`), so callers may pass any N. They are interchangeable under certification,
attacks and benchmarks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from arq_deploy.core.errors import DataFormatError, ModelFormatError
from arq_deploy.runtime.noise import counts_loop

if TYPE_CHECKING:
    import onnx


@runtime_checkable
class Runner(Protocol):
    """x: float32 N×C×H×W -> logits float32 N×K."""

    name: str
    input_shape: tuple[int, int, int]  # C, H, W
    num_classes: int

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


def check_input(x: np.ndarray, input_shape: tuple[int, int, int]) -> np.ndarray:
    """Validate a batch against the model's C×H×W and return it as contiguous float32."""
    x = np.asarray(x)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_shape):
        raise DataFormatError(
            f"input batch has shape {tuple(x.shape)}, the model expects N×{'×'.join(map(str, input_shape))}"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


class CountingRunner:
    """A runner with every model evaluation counted in `evaluations`: its calls (images) and, where the runner samples
    the noise itself (`counts`), the samples it draws. Has `counts` only where the wrapped runner has it, so `Smooth`
    takes the same path with and without the wrapper."""

    def __init__(self, runner):
        self.runner, self.evaluations = runner, 0
        self.name, self.input_shape, self.num_classes = runner.name, runner.input_shape, runner.num_classes
        if callable(getattr(runner, "counts", None)):
            self.counts = self._counts

    def __call__(self, x):
        self.evaluations += len(x)
        return self.runner(x)

    def _counts(self, x, num, sigma, seed, purpose="estimation"):
        self.evaluations += int(num)
        return self.runner.counts(x, num, sigma, seed, purpose)


class SamplingMixin:
    """`counts(x, n, σ, seed, purpose)`: the runner samples the smoothing noise itself, batch by batch through its
    `_run`, with the noise made ahead in a background thread (`arq_deploy.runtime.sampling.counts_loop`)."""

    def _before_counts(self) -> None:
        """Hook for runners that must prepare their thread pool in the calling thread."""

    def counts(self, x: np.ndarray, n: int, sigma: float, seed: int, purpose: str = "estimation") -> np.ndarray:
        """Class counts (int64, length K) of x (C×H×W) over n samples of the seeded noise stream; equal to
        `Smooth(self, K, sigma)` counting with `__call__`, for every batch size."""

        self._before_counts()
        return counts_loop(self._run, x, n, sigma, seed, purpose, self.batch_size, self.num_classes)


class CompiledRunner(SamplingMixin):
    """What the TVM runners share: the artifact's library at its compiled batch size and its optional batch-1
    library, loaded from bytes checked against the manifest (`_load_vm(path, data)` does the loading), and batches
    cut to the compiled size, the last one zero-padded unless at most `single_max` images run one by one. An artifact
    with external weights (`arq_deploy.core.weights`): the weights file is checked, unpacked once and copied to the
    device once, and every call passes the tensors after the input."""

    def _load_libraries(self, single_max: int | None) -> None:
        from arq_deploy.core.weights import read_artifact_weights

        self._vms = []  # keep the VMs (and their libraries) alive
        self._params = [self._tvm.runtime.tensor(a, self._dev) for a in read_artifact_weights(self.artifact) or []]
        self._main = self._load(self.artifact.library_path)
        b1 = self.artifact.library_b1_path
        self._single = self._load(b1) if b1 is not None else None
        if self._single is None:
            self.single_max = 0
        else:
            self.single_max = int(single_max) if single_max is not None else max(1, self.batch_size // 4)

    def _load(self, path: Path):
        vm = self._load_vm(path, self.artifact.read_verified(path))
        self._vms.append(vm)
        return vm["main"]

    def _run(self, xb: np.ndarray) -> np.ndarray:
        def tensor(a):
            return self._tvm.runtime.tensor(a, self._dev)

        n = len(xb)
        if n <= self.single_max and n < self.batch_size:
            return np.concatenate([self._single(tensor(xb[i: i + 1]), *self._params).numpy() for i in range(n)])
        if n != self.batch_size:
            xb = np.concatenate([xb, np.zeros((self.batch_size - n, *xb.shape[1:]), np.float32)])
        return self._main(tensor(xb), *self._params).numpy()[:n]


def _batched(fn, x: np.ndarray, batch_size: int, num_classes: int = 0) -> np.ndarray:
    """fn over consecutive slices of at most batch_size rows, concatenated as float32 (0 × num_classes if x is empty)."""
    outs = [fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    if not outs:
        return np.zeros((0, max(int(num_classes), 0)), np.float32)
    return np.concatenate(outs, axis=0).astype(np.float32, copy=False)


class TorchRunner(SamplingMixin):
    """A torch module (float or fake-quant) in eval mode on a given device."""

    def __init__(self, model, input_shape, num_classes: int, device: str = "cpu", batch_size: int = 256):
        import torch

        self.name = "torch"
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.input_shape = tuple(input_shape)
        self.num_classes = int(num_classes)
        self.batch_size = int(batch_size)

    def _run(self, xb: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(xb).to(self.device)).float().cpu().numpy()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return _batched(self._run, check_input(x, self.input_shape), self.batch_size, self.num_classes)


def cuda_driver_present() -> bool:
    """True when the NVIDIA driver library loads (onnxruntime-gpu lists its CUDA EP even on machines without one)."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def default_ort_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    use = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available and cuda_driver_present():
        use.insert(0, "CUDAExecutionProvider")
    return use


class OrtRunner(SamplingMixin):
    """onnxruntime InferenceSession; CUDA EP first when it is present and usable, then the CPU EP."""

    def __init__(self, model_path: str | Path | bytes | onnx.ModelProto, batch_size: int = 256,
                 providers: list[str] | None = None, threads: int | None = None, rewrite: bool = True):
        """model_path: an .onnx file, the serialized model (bytes) or an onnx.ModelProto. rewrite: load a float
        graph's option-A shortcuts as 1×1 convolutions (`runtime.graph_opt`, exact; `graph_rewrites` counts them)."""
        import onnxruntime as ort

        self.name = "onnxruntime"
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        if providers is None:
            providers = default_ort_providers()
        try:
            from arq_deploy.runtime.graph_opt import ort_source  # onnxscript's rewriter: loaded with onnxruntime

            in_memory = not isinstance(model_path, (str, Path))
            src, self.graph_rewrites = ort_source(model_path, rewrite)
            self.session = ort.InferenceSession(src, sess_options=so, providers=providers)
        except Exception as e:  # onnxruntime raises several unrelated exception types
            what = "the model" if in_memory else model_path
            raise ModelFormatError(f"onnxruntime cannot load {what}: {(str(e).splitlines() or [''])[0]}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape
        if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
            raise ModelFormatError(f"{model_path}: expected an N×C×H×W input with fixed C, H, W, got {shape}")
        self.input_shape = tuple(int(d) for d in shape[1:])
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        out = self.session.get_outputs()[0].shape
        self.num_classes = int(out[-1]) if isinstance(out[-1], int) else -1
        self.batch_size = self.fixed_batch or int(batch_size)
        self.providers = self.session.get_providers()

    def _run(self, xb: np.ndarray) -> np.ndarray:
        n = len(xb)
        if self.fixed_batch and n != self.fixed_batch:
            xb = np.concatenate([xb, np.zeros((self.fixed_batch - n, *xb.shape[1:]), np.float32)])
        return self.session.run(None, {self.input_name: xb})[0][:n]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return _batched(self._run, check_input(x, self.input_shape), self.batch_size, self.num_classes)
