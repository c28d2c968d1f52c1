"""ONNX -> TVM Relax -> CUDA kernels for an NVIDIA GPU target, built offline (no GPU needed, none used).

    compile_gpu(onnx_path, get_target("jetson-orin-nano"), out_dir, batch_size=100) -> out_dir

Pipeline: TVM's Relax CUDA pipeline with dlight's GPU rules (Matmul, GEMV, Reduction, GeneralReduction, then
Fallback for everything else, e.g. direct convolutions): every fused PrimFunc gets a thread binding, and TVM's CUDA
code generator writes one `__global__` kernel per PrimFunc. The host side (the Relax VM's calls, kernel launches)
is LLVM code for the target's host CPU, cross-compiled for a Jetson's aarch64 host.

The artifact (see `arq_deploy.core.artifact`) holds
  * `model.so` (and `model_b1.so`): the host library; TVM embeds the kernels' CUDA C source in it;
  * `model.cu` (`model_b1.cu`): that CUDA source, as a file to read, diff, or compile on the device;
  * `model.fatbin` (`model_b1.fatbin`) where nvcc exists and supports the architecture: the same source compiled
    offline by nvcc (TVM's `tvm.support.nvcc.compile_cuda`) into SASS for sm_XX plus PTX for compute_XX;
  * `manifest.json` with a `cuda` section: architecture, kernel count, the CUDA toolkit that built the fatbin (or
    why none was built), the architectures read back from the fatbin, and `ran_here: false`.

Nothing here runs a kernel: this machine has no GPU. nvcc 13 compiles for compute_75 and newer only, so sm_53
(Jetson Nano) and sm_72 (Xavier) get the CUDA source and no fatbin (the manifest says why). A fatbin built by CUDA 13
needs a driver that supports CUDA 13; a JetPack 6 (CUDA 12) board needs the fatbin built with its own toolkit.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

from arq_deploy.core.errors import ArqError, UnsupportedOpError
from arq_deploy.core.host import machine_arch
from arq_deploy.export.qdq import load_onnx
from arq_deploy.targets import tvm_frontend
from arq_deploy.targets.registry import Target, resolve_tvm_target

PIPELINE = "arq-cuda-dlight-v1"
FATBIN_MODES = ("auto", "require", "no")
_SUFFIXES = {"model.so": "model", "model_b1.so": "model_b1"}


def compile_gpu(onnx_path: Path, t: Target, out_dir: Path, *, batch_size: int, opt_level: int = 3,
                single: bool = True, fatbin: str = "auto") -> Path:
    """Build a GPU target's artifact in out_dir (atomically; see the module docstring). Returns out_dir.

    batch_size, single, opt_level: as in `arq_deploy.targets.tvm_build.compile_onnx` (`arq_deploy.targets.backends.compile_onnx` dispatches here).
    fatbin: "auto" (compile with nvcc where it exists and supports the architecture, else record why not),
        "require" (ArqError when no fatbin can be built), "no" (CUDA source only).
    """

    if t.kind != "gpu" or t.tvm_target.get("kind") != "cuda":
        raise ArqError(f"target {t.name!r} is not a CUDA target")
    if fatbin not in FATBIN_MODES:
        raise ValueError(f"fatbin must be one of {FATBIN_MODES}, got {fatbin!r}")
    if t.host_arch != machine_arch():
        tvm_frontend.require_cross_compiler(t)
    arch = t.cuda_arch
    toolkit = nvcc_info()
    why_not = _why_no_fatbin(toolkit, arch, fatbin)
    if why_not and fatbin == "require":
        raise ArqError(f"target {t.name!r}: cannot build a fatbin: {why_not}")

    model = load_onnx(onnx_path)
    inp, out = tvm_frontend.io_spec(model, batch_size)
    import tvm  # noqa: F401

    t0 = time.perf_counter()
    tvm_frontend.check_supported(model)
    tvm_target = resolve_tvm_target(t)
    shapes = {"model.so": inp["shape"]}
    if single and batch_size > 1:
        shapes["model_b1.so"] = [1, *inp["shape"][1:]]
    libs, sources, out_shape = {}, {}, out["shape"]
    for fname, shape in shapes.items():
        mod = tvm_frontend.import_onnx(model, inp["name"], shape, onnx_path)
        if fname == "model.so":
            out_shape = tvm_frontend._output_shape(mod["main"]) or out_shape
        libs[fname] = build_cuda(mod, tvm_target, opt_level=opt_level)
        sources[fname] = cuda_source(libs[fname])
    build_s = time.perf_counter() - t0

    with tvm_frontend._staging_dir(out_dir) as tmp:
        files = _write_cuda_files(tmp, sources, arch, tvm_target, toolkit, why_not)
        kwargs = {"cc": t.cross_compiler} if t.cross_compiler else {}
        try:
            for fname, lib in libs.items():
                lib.export_library(str(tmp / fname), **kwargs)
        except Exception as e:  # compiler missing or failing: TVM raises several types
            tvm_frontend.require_cross_compiler(t)
            raise ArqError(f"linking the host library for target {t.name!r} failed: {tvm_frontend._first_line(e)}") from None
        shutil.copyfile(onnx_path, tmp / "model.onnx")
        info = _manifest_info(t, tvm_target, inp, out, out_shape, batch_size, libs, opt_level, build_s, model,
                              onnx_path)
        info["cuda"] = {**files, "arch": arch, "toolkit": toolkit, "ran_here": False,
                        "note": _NOTE.format(arch=arch)}
        from arq_deploy.core.artifact import load_artifact, write_manifest

        write_manifest(tmp, info)
        load_artifact(tmp)
    return out_dir


_NOTE = ("built offline: no kernel of this artifact was run by the build (nor checked on a GPU). The host "
         "library embeds the CUDA source, which TVM compiles for the GPU it finds when the module loads on the "
         "device; the fatbin, where present, is nvcc's build of the same source for {arch} (SASS) plus PTX, for "
         "checking or for loading with a driver that supports the toolkit that built it.")


def build_cuda(mod, tvm_target: dict, *, opt_level: int = 3):
    """tvm.compile with `gpu_pipeline`; UnsupportedOpError naming the target when TVM cannot build the model."""
    import tvm

    tgt = tvm.target.Target(tvm_target)
    try:
        with tvm.transform.PassContext(opt_level=opt_level):
            return tvm.compile(mod, target=tgt, relax_pipeline=gpu_pipeline(tgt))
    except Exception as e:

        raise UnsupportedOpError(f"TVM failed to build the model for CUDA {tvm_target.get('arch')}: "
                                 f"{tvm_frontend._first_line(e)}") from None


def gpu_pipeline(tgt):
    """Relax -> TIR for CUDA: decompose inference ops, fold constants, TVM's CUDA legalize/fuse passes with dlight's
    GPU rules (tvm.relax.backend.cuda.pipeline), then lowering and memory planning."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda

    @tvm.transform.module_pass(opt_level=0, name="ArqCudaPipeline")
    def _pipeline(mod, _ctx):
        with tgt:
            seq = tvm.transform.Sequential(
                [relax.transform.DecomposeOpsForInference(), relax.transform.FoldConstant()]
                + cuda.library_dispatch_passes(tgt)
                + cuda.legalize_passes(tgt)  # LegalizeOps, FuseOps, FuseTIR, dlight Matmul/GEMV/Reduction/Fallback
                + cuda.dataflow_lower_passes(tgt)
                + cuda.finalize_passes(tgt)
            )
            return seq(mod)

    return _pipeline


def cuda_source(executable) -> str:
    """The CUDA C source of the kernels in a built executable (its imported `cuda` module)."""
    stack = [executable.mod]
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            return str(m.inspect_source())
        stack.extend(m.imports)
    raise ArqError("the CUDA build produced no CUDA module (no kernels)")


def kernel_names(source: str) -> list[str]:
    """Names of the `__global__` functions in CUDA source."""
    return re.findall(r"__global__\s+void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)\s*\(", source)


# --------------------------------------------------------------------------------------------------------------------
# nvcc

def find_nvcc() -> str | None:
    """nvcc on PATH, else under $CUDA_HOME, $CUDA_PATH or /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(Path(root) / "bin" / "nvcc", os.X_OK):
            return str(Path(root) / "bin" / "nvcc")
    return None


def nvcc_info() -> dict | None:
    """{"nvcc": path, "release": "13.0", "version": "V13.0.88", "compute": ["compute_75", ...]} or None (no nvcc)."""
    nvcc = find_nvcc()
    if nvcc is None:
        return None
    try:
        ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        archs = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rel = re.search(r"release (\d+\.\d+), (V[\d.]+)", ver)
    return {"nvcc": nvcc, "release": rel.group(1) if rel else None, "version": rel.group(2) if rel else None,
            "compute": sorted(set(re.findall(r"compute_\d+[a-z]?", archs)), key=lambda a: int(re.sub(r"\D", "", a)))}


def _why_no_fatbin(toolkit: dict | None, arch: str, mode: str) -> str | None:
    if mode == "no":
        return "not requested (fatbin='no')"
    if toolkit is None:
        return ("nvcc (the CUDA toolkit) is not installed on the build machine; install the CUDA toolkit or let the "
                "device compile model.cu")
    compute = "compute_" + arch.removeprefix("sm_")
    if compute not in toolkit["compute"]:
        return (f"nvcc {toolkit['release']} cannot compile for {arch} (it supports {', '.join(toolkit['compute'])});"
                f" build the fatbin with an older CUDA toolkit that still supports {arch} (CUDA 12 or earlier; the "
                f"Jetson Nano's JetPack 4.6 ships CUDA 10.2), or let the device compile model.cu")
    return None


@contextlib.contextmanager
def _nvcc_on_path(nvcc: str):
    """TVM's compile_cuda runs `nvcc` from PATH: put the found one first while it runs."""
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = str(Path(nvcc).parent) + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def compile_fatbin(source: str, arch: str, tvm_target: dict, toolkit: dict) -> bytes:
    """nvcc --fatbin of CUDA source: SASS for `arch` (sm_XX) and PTX for compute_XX (with TVM's nvcc flags)."""
    import tvm
    from tvm.support import nvcc

    num = arch.removeprefix("sm_")
    gencode = ["-gencode", f"arch=compute_{num},code=sm_{num}", "-gencode", f"arch=compute_{num},code=compute_{num}"]
    try:
        with _nvcc_on_path(toolkit["nvcc"]), tvm.target.Target(tvm_target):
            return bytes(nvcc.compile_cuda(source, target_format="fatbin", arch=gencode, compiler="nvcc"))
    except Exception as e:
        err = [ln for ln in str(e).splitlines() if "error" in ln.lower()][:3] or [str(e).splitlines()[-1]]
        raise ArqError(f"nvcc {toolkit['release']} failed to compile the CUDA kernels for {arch}: "
                       f"{' | '.join(err)[:400]}") from None


def fatbin_entries(data: bytes) -> list[dict]:
    """The entries of a CUDA fatbin: [{"kind": "elf" | "ptx", "arch": "sm_87", "compressed": bool, "bytes": n}].

    Layout (little endian): a 16-byte header (magic 0xBA55ED50, u16 version, u16 header size, u64 payload size),
    then entries, each a header (u16 kind: 1 PTX, 2 ELF; u16 version; u32 header size; u64 payload size; ...; u32 SM
    architecture at byte 28) followed by its payload. An ELF payload must be a CUDA ELF (e_machine 190).
    """
    if len(data) < 16:
        raise ArqError("not a CUDA fatbin: too short")
    magic, _ver, hsize, size = struct.unpack_from("<IHHQ", data, 0)
    if magic != 0xBA55ED50 or hsize + size > len(data):
        raise ArqError("not a CUDA fatbin (bad magic or size)")
    out, off, end = [], hsize, hsize + size
    while off + 32 <= end:
        kind, _v, ehs, psize = struct.unpack_from("<HHIQ", data, off)
        (sm,) = struct.unpack_from("<I", data, off + 28)
        payload = data[off + ehs: off + ehs + psize]
        if kind not in (1, 2) or ehs < 32 or not payload:
            raise ArqError(f"not a CUDA fatbin: entry at byte {off} has kind {kind}")
        is_elf = payload[:4] == b"\x7fELF"
        if kind == 2 and is_elf and struct.unpack_from("<H", payload, 18)[0] != 190:
            raise ArqError("fatbin ELF entry is not a CUDA (EM_CUDA) object")
        out.append({"kind": "ptx" if kind == 1 else "elf", "arch": f"sm_{sm}",
                    "compressed": not (is_elf if kind == 2 else payload[:1] in (b"/", b".")), "bytes": len(payload)})
        off += ehs + psize
    return out


def _write_cuda_files(tmp: Path, sources: dict, arch: str, tvm_target: dict, toolkit: dict | None,
                      why_not: str | None) -> dict:
    """Write model.cu (+ model.fatbin) per library; return the manifest's cuda fields."""
    cu, fat, entries, kernels = {}, {}, {}, {}
    t0 = time.perf_counter()
    for lib, src in sources.items():
        stem = _SUFFIXES[lib]
        (tmp / f"{stem}.cu").write_text(src)
        cu[lib] = f"{stem}.cu"
        kernels[lib] = len(kernel_names(src))
        if why_not is None:
            data = compile_fatbin(src, arch, tvm_target, toolkit)
            (tmp / f"{stem}.fatbin").write_bytes(data)
            fat[lib] = f"{stem}.fatbin"
            entries[lib] = fatbin_entries(data)
    return {"sources": cu, "kernels": kernels, "fatbins": fat, "fatbin_built": why_not is None,
            "fatbin_not_built_reason": why_not, "fatbin_entries": entries,
            "fatbin_seconds": round(time.perf_counter() - t0, 2) if why_not is None else None}


def _manifest_info(t, tvm_target, inp, out, out_shape, batch_size, libs, opt_level, build_s, model, onnx_path):
    return {
        "target": {"name": t.name, "kind": t.kind, "tvm_target": tvm_target, "host_triple": t.host_triple,
                   "cross_compiler": t.cross_compiler, "ort_providers": list(t.ort_providers),
                   "energy_probe": t.energy_probe},
        "input": inp,
        "batch_size": batch_size,
        "library": "model.so",
        "library_b1": "model_b1.so" if "model_b1.so" in libs else None,
        "output": {"name": out["name"], "shape": out_shape, "dtype": "float32"},
        "compile": {"pipeline": PIPELINE, "schedule": {"name": "dlight-gpu", "rules": [
            "Matmul", "GEMV", "Reduction", "GeneralReduction", "Fallback"]}, "opt_level": opt_level,
            "seconds": round(build_s, 2),
            "batch": "fixed: library at batch_size, library_b1 at 1; the runner pads partial batches"},
        "source": {"file": onnx_path.name, "opset": [{"domain": o.domain, "version": o.version}
                                                     for o in model.opset_import]},
    }
