"""The seeded noise stream of randomized smoothing and the loop that counts a model's classes on it.

Noise is reproducible: sample i of stream (seed, purpose) is drawn from the chunk ⌊i / CHUNK⌋, whose Philox key is a
hash of (seed, purpose, chunk index). It therefore depends on neither the batch size nor anything drawn before, and a
seed names the same noise on every backend.

    noise_batches(shape, num, seed, purpose, batch_size) -> ε batches (float32 B×shape)
    counts_loop(forward, x, num, sigma, seed, purpose, batch_size, num_classes) -> int64 counts (K,)
        forward: float32 B×C×H×W noisy batch -> B×K logits (any runtime)
    counts_parallel(...)   the same counts with batch-level parallelism (one runtime per thread)

counts[c] = #{i < num : argmax_k f(x + σ·ε_i)_k = c}. Speed comes from work taken off the critical path, not from
other noise: the Philox noise and x + σ·ε are made in a background thread one or two batches ahead (numpy releases
the GIL while it draws and adds), x + σ·ε is computed in place in the noise buffer, argmax + bincount replace
per-sample Python.
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np

from arq_deploy.core.errors import CertificationInputError
from arq_deploy.core.validation import check_count, check_seed

CHUNK = 100  # noise samples per Philox key


def _digest_int(text: str, nbytes: int) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=nbytes).digest(), "little")


def input_seed(base_seed: int, idx: int) -> int:
    """The seed for input `idx` of a run seeded with `base_seed`: a 63-bit hash of (base_seed, idx).

    Depends on nothing else, so certifying idx alone, inside a dataset run, or after a resume gives the same result.
    """
    return _digest_int(f"arq-input:{check_seed(base_seed)}:{check_seed(idx)}", 8) >> 1


def _chunk_noise(shape: tuple[int, ...], seed: int, purpose: str, chunk: int) -> np.ndarray:
    """CHUNK × shape standard normal float32 draws from Philox keyed by a 128-bit hash of (seed, purpose, chunk)."""
    key = _digest_int(f"arq-noise:{seed}:{purpose}:{chunk}", 16)
    rng = np.random.Generator(np.random.Philox(key=key))
    return rng.standard_normal((CHUNK, *shape), dtype=np.float32)


def noise_batches(shape: tuple[int, ...], num: int, seed: int, purpose: str, batch_size: int) -> Iterator[np.ndarray]:
    """Yield ε_0 … ε_{num−1} ~ N(0, I) (float32, each of `shape`) in batches of `batch_size` (the last may be short).

    ε_i is row i mod CHUNK of `_chunk_noise(shape, seed, purpose, i // CHUNK)`, so the concatenation of the batches
    is the same array for every batch_size.
    """
    seed = check_seed(seed)
    buffer: list[np.ndarray] = []
    buffered = 0
    for chunk in range(math.ceil(num / CHUNK)):
        block = _chunk_noise(shape, seed, purpose, chunk)[: num - chunk * CHUNK]
        buffer.append(block)
        buffered += len(block)
        while buffered >= batch_size:
            joined = np.concatenate(buffer) if len(buffer) > 1 else buffer[0]
            yield joined[:batch_size]
            buffer, buffered = [joined[batch_size:]], buffered - batch_size
    if buffered:
        yield np.concatenate(buffer)


PREFETCH = 2  # batches made ahead of the consumer


def _prefetched(make: Callable[[], Iterator[np.ndarray]], depth: int) -> Iterator[np.ndarray]:
    """Run the iterator `make()` in a daemon thread, at most `depth` items ahead; re-raise its errors here.

    The producer stops when the consumer stops early (the generator is closed), so no thread is left blocked.
    """
    if depth <= 0:
        yield from make()
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in make():
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    t = threading.Thread(target=produce, name="arq-noise", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def noise_stream(shape, num: int, seed: int, purpose: str, batch_size: int, prefetch: int = PREFETCH
                 ) -> Iterator[np.ndarray]:
    """`noise_batches` (ε, B×shape float32), produced `prefetch` batches ahead in a background thread."""
    return _prefetched(lambda: noise_batches(tuple(shape), num, seed, purpose, batch_size), prefetch)


def noisy_stream(x: np.ndarray, sigma: float, num: int, seed: int, purpose: str, batch_size: int,
                 prefetch: int = PREFETCH) -> Iterator[np.ndarray]:
    """x + σ·ε_i in batches (float32 B×C×H×W), the same values as `x[None] + np.float32(σ) * ε` in `Smooth`."""
    s = np.float32(sigma)

    def make():
        for eps in noise_batches(x.shape, num, seed, purpose, batch_size):
            eps *= s  # fresh arrays from noise_batches: safe to overwrite
            eps += x
            yield eps

    return _prefetched(make, prefetch)


def check_sampling_args(x, num, sigma, seed) -> tuple[np.ndarray, int, float, int]:
    x = np.asarray(x)
    if x.ndim != 3:
        raise CertificationInputError(f"x must be one C×H×W image, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise CertificationInputError("input contains NaN or infinite values")
    sigma = float(sigma)
    if not (np.isfinite(sigma) and sigma > 0):
        raise CertificationInputError(f"sigma (noise level) must be a finite number > 0, got {sigma!r}")
    return np.ascontiguousarray(x, np.float32), check_count("num", num), sigma, check_seed(seed)


def counts_loop(forward: Callable[[np.ndarray], np.ndarray], x, num: int, sigma: float, seed: int,
                purpose: str = "estimation", batch_size: int = 400, num_classes: int = -1,
                prefetch: int = PREFETCH) -> np.ndarray:
    """Class counts of `forward` (noisy batch -> logits) over num noisy copies of x; see the module docstring."""
    x, num, sigma, seed = check_sampling_args(x, num, sigma, seed)
    counts = np.zeros(max(int(num_classes), 0), np.int64)
    for xb in noisy_stream(x, sigma, num, seed, purpose, check_count("batch_size", batch_size), prefetch):
        logits = np.asarray(forward(xb))
        if logits.ndim != 2 or len(logits) != len(xb):
            raise CertificationInputError(f"forward returned shape {logits.shape} for a batch of {len(xb)}")
        if len(counts) == 0:
            counts = np.zeros(logits.shape[1], np.int64)
        elif logits.shape[1] != len(counts):
            raise CertificationInputError(f"forward returned {logits.shape[1]} classes, expected {len(counts)}")
        counts += np.bincount(logits.argmax(axis=1), minlength=len(counts))
    return counts


def noise_range(shape, seed: int, purpose: str, start: int, stop: int) -> np.ndarray:
    """ε_start … ε_{stop−1} of the stream (seed, purpose): rows of `noise_batches`' concatenation, drawn directly
    from the chunks that hold them (so workers can draw their own batches in any order)."""
    first, last = start // CHUNK, (stop - 1) // CHUNK
    blocks = [_chunk_noise(tuple(shape), seed, purpose, c) for c in range(first, last + 1)]
    block = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    return block[start - first * CHUNK: stop - first * CHUNK]


def counts_parallel(forward: Callable[[np.ndarray], np.ndarray], x, num: int, sigma: float, seed: int,
                    purpose: str = "estimation", batch_size: int = 400, num_classes: int = 10,
                    workers: int = 2, counts_out: bool = False) -> np.ndarray:
    """`counts_loop` with `workers` threads, each drawing its own batches' noise and running `forward` on them
    (batch-level parallelism: use a runtime with one intra-op thread per call, e.g. onnxruntime with
    intra_op_num_threads=1, whose `run` may be called from several threads at once). The same counts as
    `counts_loop`: a sum over batches does not depend on their order.

    counts_out: `forward(x, eps)` returns the batch's counts (a smoothing graph) instead of `forward(noisy)` logits.
    """
    x, num, sigma, seed = check_sampling_args(x, num, sigma, seed)
    batch_size = check_count("batch_size", batch_size)
    s = np.float32(sigma)

    def one(start: int) -> np.ndarray:
        eps = noise_range(x.shape, seed, purpose, start, min(start + batch_size, num))
        if counts_out:
            return np.asarray(forward(x, eps), np.int64)
        eps *= s
        eps += x
        return np.bincount(np.asarray(forward(eps)).argmax(axis=1), minlength=num_classes)

    starts = range(0, num, batch_size)
    if workers <= 1 or len(starts) == 1:
        return np.sum([one(a) for a in starts], axis=0).astype(np.int64)
    with ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="arq-sample") as pool:
        return np.sum(list(pool.map(one, starts)), axis=0).astype(np.int64)
