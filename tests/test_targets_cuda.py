"""CUDA targets, built offline: CUDA source with __global__ kernels, nvcc fatbins for the target's architecture,
cross-compiled Jetson host code, hashed artifacts. Nothing here runs a kernel (no GPU on these machines)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from arq_deploy.core.errors import ArqError, ArtifactIntegrityError

BATCH = 32
EM_AARCH64, EM_X86_64 = 183, 62


def elf_machine(path) -> int:
    data = Path(path).read_bytes()[:20]
    assert data[:4] == b"\x7fELF", path
    return int.from_bytes(data[18:20], "little")


def find_cuobjdump() -> str | None:
    """cuobjdump on PATH or from the nvidia-cuda-cuobjdump wheel (nvidia/cu*/bin/cuobjdump)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    return next((str(p) for d in nvidia.__path__ for p in Path(d).glob("cu*/bin/cuobjdump")), None)


@pytest.fixture(scope="module")
def onnx_w8a8(digits, digits_model, tmp_path_factory):
    from arq_deploy.core.policy import QuantPolicy
    from arq_deploy.export.pipeline import export_and_validate

    train_ds, test_ds = digits
    out = tmp_path_factory.mktemp("cuda") / "w8a8.onnx"
    export_and_validate(digits_model[0], QuantPolicy.uniform(8), train_ds, test_ds, out, sigma=0.25,
                        validate_images=200)
    return out


@pytest.fixture(scope="module")
def toolkit():
    from arq_deploy.targets.gpu_build import nvcc_info

    info = nvcc_info()
    if info is None:
        pytest.skip("nvcc (the CUDA toolkit) is not installed: fatbins cannot be built here")
    return info


@pytest.fixture(scope="module")
def cross_cc():
    from arq_deploy.targets.registry import get_target
    from arq_deploy.targets.tvm_frontend import require_cross_compiler

    try:
        require_cross_compiler(get_target("jetson-orin-nano"))
    except ArqError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def source_only(onnx_w8a8, tmp_path_factory):
    """A `cuda` artifact built as on a machine without nvcc (nvcc hidden from the build)."""
    from arq_deploy.targets import gpu_build
    from arq_deploy.targets.backends import compile_onnx

    mp = pytest.MonkeyPatch()
    mp.setattr(gpu_build, "find_nvcc", lambda: None)
    try:
        return compile_onnx(onnx_w8a8, "cuda", tmp_path_factory.mktemp("nonvcc") / "cuda", batch_size=BATCH,
                            single=False)
    finally:
        mp.undo()


def check_source(art, n_libs: int = 1) -> str:
    from arq_deploy.targets.gpu_build import kernel_names

    cuda = art.manifest["cuda"]
    src = (art.path / cuda["sources"]["model.so"]).read_text()
    names = kernel_names(src)
    assert len(names) >= 5 and src.count("__global__") == len(names) == cuda["kernels"]["model.so"]
    assert len(cuda["sources"]) == n_libs and cuda["ran_here"] is False and "no kernel" in cuda["note"]
    assert all(n.encode() in art.library_path.read_bytes() for n in names[:3])  # the library embeds the kernels
    return src


def check_fatbin(art, arch: str) -> None:
    from arq_deploy.targets.gpu_build import fatbin_entries

    cuda = art.manifest["cuda"]
    assert cuda["fatbin_built"] is True and cuda["fatbin_not_built_reason"] is None
    fat = art.path / cuda["fatbins"]["model.so"]
    entries = fatbin_entries(fat.read_bytes())
    assert {(e["kind"], e["arch"]) for e in entries} == {("elf", arch), ("ptx", arch)}  # SASS + PTX for arch
    assert cuda["fatbin_entries"]["model.so"] == entries
    cuobjdump = find_cuobjdump()
    if cuobjdump:  # an independent reading of the same file
        out = subprocess.run([cuobjdump, "--list-elf", str(fat)], capture_output=True, text=True, timeout=60).stdout
        assert f".{arch}.cubin" in out, out


def test_jetson_orin_nano_artifact(onnx_w8a8, toolkit, cross_cc, tmp_path):
    from arq_deploy.core.artifact import load_artifact
    from arq_deploy.targets.backends import compile_onnx

    art = load_artifact(compile_onnx(onnx_w8a8, "jetson-orin-nano", tmp_path / "orin", batch_size=BATCH,
                                     single=False))
    m = art.manifest
    assert set(m["files"]) == {"model.so", "model.cu", "model.fatbin", "model.onnx"} and m["library_b1"] is None
    assert m["target"]["kind"] == "gpu" and m["target"]["tvm_target"]["arch"] == "sm_87"
    assert elf_machine(art.library_path) == EM_AARCH64  # the Jetson's host code, cross-compiled
    check_source(art)
    check_fatbin(art, "sm_87")
    assert m["cuda"]["toolkit"]["release"] == toolkit["release"] and m["cuda"]["toolkit"]["version"].startswith("V")
    assert m["compile"]["schedule"]["name"] == "dlight-gpu" and m["output"]["shape"] == [BATCH, 10]


def test_cuda_arch_override_and_batch_1_library(onnx_w8a8, toolkit, tmp_path):
    from arq_deploy.core.artifact import load_artifact
    from arq_deploy.targets.backends import compile_onnx

    art = load_artifact(compile_onnx(onnx_w8a8, "cuda-sm75", tmp_path / "t4", batch_size=BATCH))
    m = art.manifest
    assert m["target"]["name"] == "cuda-sm75" and m["cuda"]["arch"] == "sm_75"
    assert elf_machine(art.library_path) == EM_X86_64 and m["library_b1"] == "model_b1.so"
    assert {"model_b1.cu", "model_b1.fatbin", "model_b1.so"} <= set(m["files"])
    check_source(art, n_libs=2)
    check_fatbin(art, "sm_75")


def test_jetson_nano_sm53(onnx_w8a8, toolkit, cross_cc, tmp_path):
    """nvcc 13 dropped sm_53: the artifact carries the CUDA source and says why there is no fatbin."""
    from arq_deploy.core.artifact import load_artifact
    from arq_deploy.targets.backends import compile_onnx
    from arq_deploy.targets.gpu_build import compile_gpu
    from arq_deploy.targets.registry import get_target

    art = load_artifact(compile_onnx(onnx_w8a8, "jetson-nano", tmp_path / "nano", batch_size=BATCH, single=False))
    check_source(art)
    assert elf_machine(art.library_path) == EM_AARCH64
    if "compute_53" in toolkit["compute"]:  # an older toolkit still builds it
        check_fatbin(art, "sm_53")
        return
    cuda = art.manifest["cuda"]
    assert cuda["fatbin_built"] is False and cuda["fatbins"] == {} and "model.fatbin" not in art.files
    assert f"nvcc {toolkit['release']} cannot compile for sm_53" in cuda["fatbin_not_built_reason"]
    with pytest.raises(ArqError, match=f"jetson-nano.*nvcc {toolkit['release']} cannot compile for sm_53"):
        compile_gpu(onnx_w8a8, get_target("jetson-nano"), tmp_path / "nano-req", batch_size=BATCH, fatbin="require")
    assert not (tmp_path / "nano-req").exists()


def test_without_nvcc_the_cuda_source_is_still_built(source_only):
    from arq_deploy.core.artifact import load_artifact

    art = load_artifact(source_only)
    cuda = art.manifest["cuda"]
    assert set(art.files) == {"model.so", "model.cu", "model.onnx"}
    assert cuda["fatbin_built"] is False and cuda["toolkit"] is None
    assert "nvcc" in cuda["fatbin_not_built_reason"] and "not installed" in cuda["fatbin_not_built_reason"]
    assert elf_machine(art.library_path) == EM_X86_64
    check_source(art)


def test_tampered_cuda_artifact_is_refused(source_only, tmp_path):
    from arq_deploy.core.artifact import load_artifact

    bad = tmp_path / "bad"
    shutil.copytree(source_only, bad)
    src = (bad / "model.cu").read_text()
    (bad / "model.cu").write_text(src.replace("__global__", "__device__", 1))
    with pytest.raises(ArtifactIntegrityError, match=r"model\.cu does not match its sha256"):
        load_artifact(bad)
    (bad / "model.cu").write_text(src)
    load_artifact(bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["files"]["model.fatbin"] = "0" * 64  # a listed file that is not there
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactIntegrityError, match="model.fatbin .*missing"):
        load_artifact(bad)
    del m["files"]["model.fatbin"], m["files"]["model.cu"]  # the source left out of the hashes
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactIntegrityError, match="CUDA file model.cu is not among the hashed files"):
        load_artifact(bad)


def test_cpu_runners_refuse_gpu_artifacts(source_only):
    from arq_deploy.runtime.qemu import QemuRunner
    from arq_deploy.runtime.tvm_runner import TvmRunner

    with pytest.raises(ArqError, match="CUDA GPU"):  # TvmRunner runs a CUDA artifact only where a GPU is
        TvmRunner(source_only)
    with pytest.raises(ArqError, match="only CPU"):
        QemuRunner(source_only)


def test_fatbin_reader_rejects_other_files(source_only):
    from arq_deploy.targets.gpu_build import fatbin_entries

    with pytest.raises(ArqError, match="not a CUDA fatbin"):
        fatbin_entries((source_only / "model.so").read_bytes())
    with pytest.raises(ArqError, match="not a CUDA fatbin"):
        fatbin_entries(b"\x50\xed\x55\xba")
