"""Compiled-model artifacts: a directory with the model library, the source ONNX and `manifest.json`.

manifest.json holds the format version, the target (name and the TVM target dict it was built for), the input spec
(name, N×C×H×W shape with N = the compiled batch size, dtype, value range [0, 1]), the output spec, every `arq.*`
metadata entry of the ONNX model (policy, BOPs, normalisation, sigma, ...; JSON values parsed), the tool versions, the
creation time and `files`: {relative path: sha256} of every other file in the directory. `load_artifact` checks all
of it, so a runner never executes a library that differs from the one that was built and recorded.

Integer builds keep their integer weights outside the library, bit-packed in `weights.bin` (`arq_deploy.core.weights`):
the manifest's `weights` entry indexes that file (hashed like the others), and `main` takes the unpacked tensors after
its input. Such artifacts are format version 2 (a reader of version 1 refuses them rather than calling `main` without
its weights); all others stay version 1. `storage` gives the files' sizes (`artifact_sizes`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from dataclasses import dataclass
from importlib import metadata as _md
from pathlib import Path
from typing import Any

from arq_deploy.core.errors import ArtifactIntegrityError
from arq_deploy.core.fileio import sha256_file, write_json
from arq_deploy.core.policy import QuantPolicy

FORMAT = "arq-artifact"
FORMAT_VERSION = 2  # the newest version written: 2 when the weights are stored outside the library, else 1
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
LIBRARY = "model.so"
SOURCE_ONNX = "model.onnx"

_TOOLS = {"tvm": ("apache-tvm", "tvm"), "tvm_ffi": ("apache-tvm-ffi",), "onnx": ("onnx",),
          "onnxruntime": ("onnxruntime-gpu", "onnxruntime"), "numpy": ("numpy",)}


def tool_versions() -> dict[str, str | None]:
    """Installed versions of the tools that shape an artifact (from package metadata; imports none of them)."""
    out: dict[str, str | None] = {}
    for key, dists in _TOOLS.items():
        out[key] = None
        for d in dists:
            try:
                out[key] = _md.version(d)
                break
            except _md.PackageNotFoundError:
                continue
    out["python"] = platform.python_version()
    return out


def onnx_arq_metadata(model) -> dict[str, Any]:
    """`arq.*` metadata_props of an ONNX ModelProto, prefix stripped, JSON values parsed (others kept as text)."""
    out: dict[str, Any] = {}
    for p in model.metadata_props:
        if p.key.startswith("arq."):
            try:
                out[p.key[4:]] = json.loads(p.value)
            except (json.JSONDecodeError, ValueError):
                out[p.key[4:]] = p.value
    return out


def hash_files(root: str | Path) -> dict[str, str]:
    """{posix relative path: sha256} of every regular file under root except the manifest, sorted by path."""
    root = Path(root)
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            rel = p.relative_to(root).as_posix()
            if rel != MANIFEST:
                files[rel] = sha256_file(p)
    return files


def artifact_sizes(root: str | Path, info: dict) -> dict:
    """Sizes in bytes of an artifact's files (all but the manifest) before its manifest is written:
    {"artifact_bytes": all files, "runtime_bytes": what a runner loads (the libraries and the weights file),
    "library_bytes": {library: size}, and with external weights "weights_packed_bytes" (the file) and
    "weights_container_bytes" (the same tensors at their compiled 8-bit-or-wider types, as a library held them)}."""
    root = Path(root)
    sizes = {rel: (root / rel).stat().st_size for rel in hash_files(root)}
    libs = {n: sizes[n] for n in (info.get("library", LIBRARY), info.get("library_b1")) if n and n in sizes}
    weights = info.get("weights") or {}
    out = {"artifact_bytes": sum(sizes.values()),
           "runtime_bytes": sum(libs.values()) + (sizes.get(weights["file"], 0) if weights else 0),
           "library_bytes": libs}
    if weights:
        out.update(weights_packed_bytes=int(weights["packed_bytes"]),
                   weights_container_bytes=int(weights["container_bytes"]))
    return out


def write_manifest(out_dir: str | Path, info: dict) -> dict:
    """Write `out_dir/manifest.json` (atomically) for the files now in out_dir and return the manifest.

    `info` must hold `target` ({"name", "tvm_target"}), `input` ({"name", "shape", "dtype"}) and `batch_size`; any other
    keys (output, compile settings, timings, source) are stored as given. The `arq.*` metadata is read from
    out_dir/model.onnx when present, else taken from info["arq"].
    """
    out_dir = Path(out_dir)
    for key in ("target", "input", "batch_size"):
        if key not in info:
            raise ValueError(f"write_manifest: info lacks {key!r}")
    inp = dict(info["input"])
    inp.setdefault("dtype", "float32")
    inp.setdefault("range", [0.0, 1.0])
    inp.setdefault("layout", "NCHW")
    arq = dict(info.get("arq", {}))
    src = out_dir / SOURCE_ONNX
    if src.is_file():
        import onnx

        arq.update(onnx_arq_metadata(onnx.load(str(src), load_external_data=False)))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if info.get("weights") else 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "target": info["target"],
        "input": inp,
        "batch_size": int(info["batch_size"]),
        **{k: v for k, v in info.items() if k not in ("target", "input", "batch_size", "arq", "files", "tools")},
        "arq": arq,
        "tools": tool_versions(),
        "files": hash_files(out_dir),
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest


@dataclass(frozen=True)
class Artifact:
    """A verified artifact directory (build one with `load_artifact`)."""

    path: Path
    manifest: dict

    @property
    def target_name(self) -> str:
        return self.manifest["target"]["name"]

    @property
    def tvm_target(self) -> dict:
        return self.manifest["target"].get("tvm_target", {})

    @property
    def input_name(self) -> str:
        return self.manifest["input"]["name"]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """C, H, W."""
        return tuple(int(d) for d in self.manifest["input"]["shape"][1:])

    @property
    def batch_size(self) -> int:
        return int(self.manifest["batch_size"])

    @property
    def num_classes(self) -> int:
        out = self.manifest.get("output", {})
        if out.get("shape"):
            return int(out["shape"][-1])
        return int(self.arq.get("num_classes", -1))

    @property
    def library_path(self) -> Path:
        return self.path / self.manifest.get("library", LIBRARY)

    @property
    def library_b1_path(self) -> Path | None:
        """The batch-1 library, when the artifact has one."""
        name = self.manifest.get("library_b1")
        return self.path / name if name else None

    @property
    def weights_path(self) -> Path | None:
        """The bit-packed weights file (`arq_deploy.core.weights`) when the library takes its weights as parameters."""
        w = self.manifest.get("weights")
        return self.path / w["file"] if w else None

    @property
    def onnx_path(self) -> Path:
        return self.path / SOURCE_ONNX

    @property
    def files(self) -> dict[str, str]:
        return dict(self.manifest["files"])

    @property
    def arq(self) -> dict:
        """The ONNX model's arq.* metadata (prefix stripped)."""
        return self.manifest.get("arq", {})

    def read_verified(self, path: Path) -> bytes:
        """The bytes of one of the artifact's files, checked against the manifest's sha256 now (a file changed after
        `load_artifact` verified it raises ArtifactIntegrityError)."""
        data = Path(path).read_bytes()
        rel = Path(path).relative_to(self.path).as_posix()
        if hashlib.sha256(data).hexdigest() != self.files.get(rel):
            raise ArtifactIntegrityError(f"{self.path}: {rel} changed after the artifact was verified")
        return data

    @property
    def policy(self) -> QuantPolicy | None:
        """The quantization policy the model was exported with (None for a float model)."""
        p = self.arq.get("policy")
        return None if p is None else QuantPolicy.from_dict(p)

    @property
    def bops(self):
        return self.arq.get("bops")

    @property
    def sigma(self):
        return self.arq.get("sigma")

    @property
    def mean(self):
        return self.arq.get("mean")

    @property
    def std(self):
        return self.arq.get("std")


def load_artifact(path: str | Path) -> Artifact:
    """Read and verify an artifact: valid manifest, every listed file present with its recorded sha256.

    Raises ArtifactIntegrityError naming the directory or the first offending file.
    """
    root = Path(path)
    if not root.is_dir():
        raise ArtifactIntegrityError(f"artifact directory {root} does not exist")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactIntegrityError(f"{root} has no {MANIFEST}: not an artifact, or an interrupted build")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactIntegrityError(f"{mpath} is not valid JSON: {e}") from None
    _check_manifest(manifest, mpath)
    root_res = root.resolve()
    for rel, digest in manifest["files"].items():
        f = (root / rel)
        if Path(rel).is_absolute() or not f.resolve().is_relative_to(root_res):
            raise ArtifactIntegrityError(f"{mpath} lists a file outside the artifact: {rel!r}")
        if not f.is_file():
            raise ArtifactIntegrityError(f"{root}: file {rel} listed in the manifest is missing")
        if sha256_file(f) != digest:
            raise ArtifactIntegrityError(f"{root}: {rel} does not match its sha256 in the manifest (modified or "
                                         f"corrupt)")
    return Artifact(path=root, manifest=manifest)


def _check_manifest(m: Any, mpath: Path) -> None:
    def bad(why: str):
        raise ArtifactIntegrityError(f"{mpath}: {why}")

    if not isinstance(m, dict) or m.get("format") != FORMAT:
        bad(f"not an {FORMAT} manifest")
    if m.get("format_version") not in READ_VERSIONS:
        bad(f"format version {m.get('format_version')!r}, this arq-deploy reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}")
    files = m.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        bad("'files' must map relative paths to sha256 digests")
    for key in ("library", "library_b1"):
        name = m.get(key, LIBRARY if key == "library" else None)
        if name is not None and name not in files:
            bad(f"the library {name} is not among the hashed files")
    cuda = m.get("cuda") or {}  # GPU artifacts: the CUDA sources and fatbins they name must be hashed too
    for group in ("sources", "fatbins"):
        for name in (cuda.get(group) or {}).values():
            if name not in files:
                bad(f"the CUDA file {name} is not among the hashed files")
    weights = m.get("weights")
    if weights is not None:
        if m["format_version"] < 2:
            bad("a version-1 manifest cannot have external weights")
        if not isinstance(weights, dict) or weights.get("file") not in files or not isinstance(weights.get("tensors"),
                                                                                               list):
            bad("'weights' must name a hashed file and list its tensors")
    elif m["format_version"] >= 2:
        bad("a version-2 manifest must index its weights file ('weights')")
    inp = m.get("input")
    if not isinstance(inp, dict) or not isinstance(inp.get("shape"), list) or len(inp["shape"]) != 4:
        bad("'input' must give an N×C×H×W shape")
    if not isinstance(m.get("target"), dict) or "name" not in m["target"]:
        bad("'target' must give the target name")
    if not isinstance(m.get("batch_size"), int) or m["batch_size"] < 1:
        bad("'batch_size' must be a positive integer")
