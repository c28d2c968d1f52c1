"""Sub-byte weight storage: integer tensors packed at the fewest bits their values need, in one file of an artifact.

An integer build (`arq_deploy.targets.tvm_build`, `integer=True`) takes its integer weight tensors out of the compiled
library: they become parameters of `main` after the input, and the artifact stores them in `weights.bin`, described
by the manifest's `weights` entry. Each tensor is stored losslessly as

    u = v - lo   in   b = bit_width(hi - lo) = ceil(log2(hi - lo + 1)) bits per value, little-endian bit order,

where v are the tensor's values read through a *view*: its own dtype, or a narrower signed integer type over the same
bytes (an int32 word that holds four int8 weights, as the x86/AArch64 dot-product kernels pack them, is read as four
int8 values; two int16 fields as two int16 values), whichever packs into the fewest bytes. So a b-bit layer's weights
take about b bits each, whatever container the kernel computes with. A tensor whose values are all equal takes 0 bits.

    pack_tensors([(name, array), ...]) -> (bytes, index)      index: the manifest's `weights` entry
    unpack_tensors(data, index) -> [array, ...]               the same arrays (dtype, shape, values), in order
    read_artifact_weights(artifact) -> [array, ...] | None    weights.bin checked against its sha256, then unpacked

index = {"file": "weights.bin", "tensors": [{"name", "dtype", "shape", "view", "bits", "offset" (lo), "start",
"nbytes"}, ...], "packed_bytes": size of the file, "container_bytes": the same tensors' bytes at their compiled dtypes
(what the library held before: 8-bit or wider), "values": how many values the views hold}.
"""

from __future__ import annotations

import numpy as np

from arq_deploy.core.errors import ArtifactIntegrityError

WEIGHTS_FILE = "weights.bin"
DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64")
_NARROWER = {1: (), 2: ("int8",), 4: ("int16", "int8"), 8: ("int32", "int16", "int8")}
_CHUNK = 1 << 20  # values per packing step (a multiple of 8: every chunk ends on a byte boundary)


def bit_width(span: int) -> int:
    """Bits that hold the values 0..span (0 for span 0)."""
    return int(span).bit_length()


def packed_size(count: int, bits: int) -> int:
    return (int(count) * int(bits) + 7) // 8


def _plan(a: np.ndarray) -> tuple[str, int, int]:
    """(view dtype, bits, lo) of the view that packs a into the fewest bytes (the widest one on ties)."""
    best = None
    for view in (a.dtype.name, *_NARROWER[a.dtype.itemsize]):
        v = a.reshape(-1).view(view) if view != a.dtype.name else a.reshape(-1)
        lo, hi = (int(v.min()), int(v.max())) if v.size else (0, 0)
        bits = bit_width(hi - lo)
        size = packed_size(v.size, bits)
        if best is None or size < best[0]:
            best = (size, view, bits, lo)
    return best[1], best[2], best[3]


def _pack_bits(u: np.ndarray, bits: int) -> bytes:
    """uint64 values < 2^bits, `bits` bits each, little-endian bit order, vectorised in chunks."""
    if bits == 0 or u.size == 0:
        return b""
    shifts = np.arange(bits, dtype=np.uint64)
    out = []
    for i in range(0, u.size, _CHUNK):
        b = ((u[i: i + _CHUNK, None] >> shifts) & np.uint64(1)).astype(np.uint8)
        out.append(np.packbits(b.reshape(-1), bitorder="little").tobytes())
    return b"".join(out)


def _unpack_bits(buf: np.ndarray, count: int, bits: int) -> np.ndarray:
    """The inverse of `_pack_bits`: `count` uint64 values."""
    u = np.zeros(count, np.uint64)
    if bits == 0 or count == 0:
        return u
    for i in range(0, count, _CHUNK):
        n = min(_CHUNK, count - i)
        start = i * bits // 8  # a whole byte: i is a multiple of 8
        b = np.unpackbits(buf[start: start + packed_size(n, bits)], count=n * bits, bitorder="little")
        b = b.reshape(n, bits)
        acc = u[i: i + n]
        for j in range(bits):
            acc |= b[:, j].astype(np.uint64) << np.uint64(j)
    return u


def pack_tensor(a: np.ndarray) -> tuple[dict, bytes]:
    """(record without name/start, packed bytes) of one integer tensor (see the module docstring)."""
    a = np.ascontiguousarray(a)
    if a.dtype.name not in DTYPES:
        raise ValueError(f"pack_tensor: {a.dtype} is not an integer type this format stores ({', '.join(DTYPES)})")
    view, bits, lo = _plan(a)
    v = a.reshape(-1).view(view)
    u = v.astype(np.int64).view(np.uint64) - np.int64(lo).view(np.uint64)  # v - lo, modulo 2^64 (exact: < 2^bits)
    data = _pack_bits(u, bits)
    return {"dtype": a.dtype.name, "shape": [int(d) for d in a.shape], "view": view, "bits": bits, "offset": lo,
            "nbytes": len(data)}, data


def unpack_tensor(rec: dict, data: bytes | memoryview | np.ndarray) -> np.ndarray:
    """The tensor of one record from its packed bytes."""
    dtype, view, bits = np.dtype(rec["dtype"]), np.dtype(rec["view"]), int(rec["bits"])
    count = int(np.prod(rec["shape"], dtype=np.int64)) * dtype.itemsize // view.itemsize
    buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    if len(buf) != packed_size(count, bits):
        raise ArtifactIntegrityError(f"weights tensor {rec.get('name')!r}: {len(buf)} bytes, its record says "
                                     f"{packed_size(count, bits)}")
    u = _unpack_bits(buf, count, bits)
    v = (u + np.int64(rec["offset"]).view(np.uint64)).view(np.int64).astype(view)
    return v.view(dtype).reshape(rec["shape"])


def pack_tensors(named: list[tuple[str, np.ndarray]], file: str = WEIGHTS_FILE) -> tuple[bytes, dict]:
    """(file bytes, index) for named integer tensors, in order (the order of `main`'s weight parameters)."""
    recs, parts, start, container, values = [], [], 0, 0, 0
    for name, a in named:
        rec, data = pack_tensor(a)
        rec = {"name": str(name), **rec, "start": start}
        recs.append(rec)
        parts.append(data)
        start += len(data)
        container += int(np.asarray(a).nbytes)
        values += int(np.asarray(a).nbytes) // np.dtype(rec["view"]).itemsize
    return b"".join(parts), {"file": file, "tensors": recs, "packed_bytes": start, "container_bytes": container,
                             "values": values}


def unpack_tensors(data: bytes, index: dict) -> list[np.ndarray]:
    """Every tensor of `index` from the file's bytes; ArtifactIntegrityError when the index does not fit the file."""
    buf = np.frombuffer(data, np.uint8)
    if len(buf) != int(index.get("packed_bytes", -1)):
        raise ArtifactIntegrityError(f"{index.get('file')}: {len(buf)} bytes, the manifest says "
                                     f"{index.get('packed_bytes')}")
    out = []
    for rec in index["tensors"]:
        s, n = int(rec["start"]), int(rec["nbytes"])
        if s < 0 or s + n > len(buf):
            raise ArtifactIntegrityError(f"weights tensor {rec.get('name')!r} lies outside {index.get('file')}")
        out.append(unpack_tensor(rec, buf[s: s + n]))
    return out


def read_artifact_weights(artifact) -> list[np.ndarray] | None:
    """The unpacked weight parameters of a verified `Artifact` (checked against its sha256 as they are read), or None
    when its library holds its weights itself (float builds, older artifacts)."""
    index = artifact.manifest.get("weights")
    if not index:
        return None
    return unpack_tensors(artifact.read_verified(artifact.path / index["file"]), index)
