"""Fast samplers for randomized smoothing: one runtime per core, or the noise and counting inside the graph.

    OrtSmoothingGraph(onnx).counts(x, num, sigma, seed, purpose)     (the x, noise, sigma graph in onnxruntime)
    TvmSmoothingGraph(artifact, sigma).counts(x, num, sigma, seed, purpose)   (the packed graph compiled by TVM)
    ParallelOrtSampler / ParallelTvmSampler(...).counts(...)   (batch-level parallelism: one runtime per core)

Every sampler draws ε from `arq_deploy.runtime.noise` (the same noise for every batch size and backend), hence gives
the same counts as `Smooth.sample_counts` with the same runtime.
"""

from __future__ import annotations

import queue

import numpy as np

from arq_deploy.core.errors import CertificationInputError
from arq_deploy.core.validation import check_count
from arq_deploy.runtime.noise import check_sampling_args, counts_parallel, noise_stream
from arq_deploy.runtime.runners import check_input
from arq_deploy.runtime.tvm_runner import TvmRunner


class ParallelOrtSampler:
    """onnxruntime sampling with batch-level parallelism: one session with `threads` intra-op threads (default 1),
    run from `workers` Python threads at once, each drawing its own batches' noise. Takes a classifier ONNX
    (logits) or an (x, noise, sigma) smoothing graph (counts). counts() equals `Smooth.sample_counts`'s."""

    def __init__(self, model, workers: int = 2, batch_size: int = 400, threads: int = 1, session_options=None,
                 rewrite: bool = True):
        import onnxruntime as ort

        from arq_deploy.runtime.graph_opt import ort_source  # onnxscript's rewriter: loaded with onnxruntime

        src, self.graph_rewrites = ort_source(model, rewrite)
        so = session_options or ort_session_options(threads=threads)
        self.session = ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])
        names = [i.name for i in self.session.get_inputs()]
        self.graph = names == ["x", "noise", "sigma"]
        self.input_name = names[0]
        self.input_shape = tuple(int(d) for d in self.session.get_inputs()[-2 if self.graph else 0].shape[1:])
        self.num_classes = int(self.session.get_outputs()[0].shape[-1])
        self.workers, self.batch_size = int(workers), check_count("batch_size", batch_size)
        self.name = "onnxruntime-parallel"

    def counts(self, x, n: int, sigma: float, seed: int, purpose: str = "estimation") -> np.ndarray:
        if self.graph:
            sg = np.array(sigma, np.float32)

            def fwd(xx, eps):
                return self.session.run(None, {"x": xx[None], "noise": eps, "sigma": sg})[0]
        else:
            def fwd(xb):
                return self.session.run(None, {self.input_name: xb})[0]
        return counts_parallel(fwd, x, n, sigma, seed, purpose, self.batch_size, self.num_classes, self.workers,
                               counts_out=self.graph)


class ParallelTvmSampler:
    """TVM sampling with batch-level parallelism: `workers` Relax VMs of one CPU artifact, each on a TVM thread pool
    of `threads` (default 1) threads, run from `workers` Python threads at once, each drawing its own batches'
    noise (a VM is not re-entrant, so each call takes a free one). counts() equals `Smooth.sample_counts`'s.

    On 2 cores this takes the noise off the critical path differently from `TvmRunner.counts` (noise made in a
    background thread while one 2-thread pool runs the model): each core draws its own noise, then runs its batch."""

    def __init__(self, artifact, workers: int = 2, threads: int = 1):

        self.workers = check_count("workers", workers)
        self._runners = [TvmRunner(artifact, threads=threads) for _ in range(self.workers)]
        self._free: queue.Queue = queue.Queue()
        for r in self._runners:
            self._free.put(r)
        first = self._runners[0]
        self.input_shape, self.num_classes, self.batch_size = first.input_shape, first.num_classes, first.batch_size
        self.name = "tvm-parallel"

    def _forward(self, xb: np.ndarray) -> np.ndarray:
        r = self._free.get()
        try:
            return r(xb)
        finally:
            self._free.put(r)

    def counts(self, x, n: int, sigma: float, seed: int, purpose: str = "estimation") -> np.ndarray:
        return counts_parallel(self._forward, x, n, sigma, seed, purpose, self.batch_size, self.num_classes,
                               self.workers)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits of x (N×C×H×W), its artifact-sized batches run on the VMs side by side (what IRS's ζ labels and
        PREDICT use); the same logits as one `TvmRunner`."""
        from concurrent.futures import ThreadPoolExecutor

        x = check_input(x, self.input_shape)
        starts = range(0, len(x), self.batch_size)
        if self.workers <= 1 or len(starts) <= 1:
            return self._forward(x)
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="arq-tvm") as pool:
            return np.concatenate(list(pool.map(lambda a: self._forward(x[a: a + self.batch_size]), starts)))


# --------------------------------------------------------------------------------------------------------------------
# Smoothing graphs (export/smoothing_graph.py): noise in, counts out, one call per batch

def ort_session_options(threads: int | None = None, opt_level: str = "all", mem_arena: bool = True,
                        sequential: bool = True):
    """onnxruntime SessionOptions with the knobs that matter for batch sampling on a CPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    so.graph_optimization_level = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[opt_level]
    so.enable_cpu_mem_arena = bool(mem_arena)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if sequential else ort.ExecutionMode.ORT_PARALLEL
    return so


class OrtSmoothingGraph:
    """onnxruntime over a smoothing graph (inputs x 1×C×H×W, noise B×C×H×W, sigma; output counts K)."""

    def __init__(self, model, batch_size: int = 400, session_options=None, providers=None, rewrite: bool = True):
        import onnxruntime as ort

        from arq_deploy.runtime.graph_opt import ort_source  # onnxscript's rewriter: loaded with onnxruntime

        src, self.graph_rewrites = ort_source(model, rewrite)
        self.session = ort.InferenceSession(src, sess_options=session_options or ort_session_options(),
                                            providers=providers or ["CPUExecutionProvider"])
        names = [i.name for i in self.session.get_inputs()]
        if names != ["x", "noise", "sigma"]:
            raise CertificationInputError(f"not an (x, noise, sigma) smoothing graph: inputs {names}")
        self.input_shape = tuple(int(d) for d in self.session.get_inputs()[0].shape[1:])
        self.num_classes = int(self.session.get_outputs()[0].shape[0])
        self.batch_size = check_count("batch_size", batch_size)
        self.name = "onnxruntime-smoothing-graph"

    def batch_counts(self, x: np.ndarray, eps: np.ndarray, sigma: float) -> np.ndarray:
        """counts of one batch: x float32 C×H×W, eps float32 B×C×H×W."""
        return self.session.run(None, {"x": x[None], "noise": eps, "sigma": np.array(sigma, np.float32)})[0]

    def counts(self, x, n: int, sigma: float, seed: int, purpose: str = "estimation") -> np.ndarray:
        x, n, sigma, seed = check_sampling_args(x, n, sigma, seed)
        counts = np.zeros(self.num_classes, np.int64)
        for eps in noise_stream(x.shape, n, seed, purpose, self.batch_size):
            counts += self.batch_counts(x, eps, sigma)
        return counts


class OrtInGraphNoise:
    """onnxruntime over the in-graph-noise smoothing graph (RandomNormal inside; NOT the Philox stream).

    For throughput measurements only: its samples cannot be replayed, so its counts are not comparable across
    backends, batch sizes or runs.
    """

    def __init__(self, model, session_options=None):
        import onnxruntime as ort

        self.session = ort.InferenceSession(model.SerializeToString(), sess_options=session_options or
                                            ort_session_options(), providers=["CPUExecutionProvider"])
        node = next(n for n in model.graph.node if n.op_type == "RandomNormal")
        self.batch_size = int(next(a for a in node.attribute if a.name == "shape").ints[0])

    def counts(self, x, n: int) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)[None]
        total = None
        for _ in range(-(-n // self.batch_size)):  # rounds n up to whole batches
            c = self.session.run(None, {"x": x})[0]
            total = c if total is None else total + c
        return total


class TvmSmoothingGraph:
    """A TVM artifact of the packed smoothing graph (`smoothing_graph(model, packed=True, sigma=σ)` compiled by
    `compile_onnx(..., batch_size=B + 1, single=False)`): one call per B noise samples.

    σ is compiled in; `counts` refuses another σ. A last partial batch is padded with ε = 0 rows (each counts as
    f(x)'s class); the pad is taken off again using one all-zero batch that tells f(x)'s class.
    """

    def __init__(self, artifact, threads: int | None = None):

        self.runner = TvmRunner(artifact, threads=threads)
        self.sigma = float(self.runner.artifact.arq.get("sigma", "nan"))
        self.batch_size = self.runner.batch_size - 1
        self.input_shape = self.runner.input_shape
        self.num_classes = self.runner.num_classes
        self.name = "tvm-smoothing-graph"
        self._buf = np.empty((self.batch_size + 1, *self.input_shape), np.float32)

    def _call(self, x: np.ndarray, eps: np.ndarray) -> np.ndarray:
        buf = self._buf
        buf[0] = x
        buf[1: 1 + len(eps)] = eps
        buf[1 + len(eps):] = 0.0
        return np.rint(self.runner(buf)[0]).astype(np.int64)

    def counts(self, x, n: int, sigma: float, seed: int, purpose: str = "estimation") -> np.ndarray:
        x, n, sigma, seed = check_sampling_args(x, n, sigma, seed)
        if np.isfinite(self.sigma) and not np.isclose(sigma, self.sigma, rtol=0, atol=1e-7):
            raise CertificationInputError(f"this smoothing graph was compiled for σ = {self.sigma}, not {sigma}")
        counts = np.zeros(self.num_classes, np.int64)
        for eps in noise_stream(x.shape, n, seed, purpose, self.batch_size):
            c = self._call(x, eps)
            pad = self.batch_size - len(eps)
            if pad:
                clean = int(self._call(x, eps[:0]).argmax())
                c[clean] -= pad
            counts += c
        return counts


