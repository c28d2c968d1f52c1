"""ONNX (float or QDQ) -> TVM Relax -> a compiled library in a verified artifact directory.

    compile_onnx(onnx_path, target="x86", out_dir=..., batch_size=100) -> out_dir

The batch size is compiled in (static shapes give TVM fixed loop bounds to schedule); `TvmRunner` pads the last
partial batch, or runs a short remainder through a second, batch-1 library. The artifact holds `model.so` (batch_size),
`model_b1.so` (batch 1), a byte copy of the source `model.onnx` and `manifest.json` (see `arq_deploy.core.artifact`);
integer builds also `weights.bin`, their integer weights bit-packed outside the libraries (`external_weights`).
It is built in a temporary directory next to out_dir and renamed into place at the end, so a failed build leaves
nothing behind and never damages an existing artifact.

CPU schedules. TVM 0.27's default CPU pipeline legalizes every operator to a naive loop nest: one thread, no
vectorization (about 1/60 of onnxruntime's speed). MetaSchedule tuning fixes that but takes many minutes, and dlight
has CPU rules only for GEMV and softmax-like reductions. So this module schedules each fused PrimFunc itself, with no
tuning, in the spirit of dlight rules:
  * the one reduction block of a conv/matmul-like function (>= 2 inputs, >= 2 spatial axes) is register-tiled: the
    innermost spatial axis is split by the vector width (vectorized), the row axis before it by U=2 and the channel
    axis before that by F=4 (both unrolled), reductions outside these tiles, so U·F vector accumulators stay in
    registers; the outer spatial loops run in parallel (over the batch, with the input padding computed per image,
    when the batch has enough images, else over batch×channel tiles); the elementwise epilogue (bias, residual, ReLU,
    Clip/Q/DQ) is computed per tile right after the reduction;
  * other reductions (pooling, mean) run their spatial loops in parallel;
  * injective functions are inlined into one loop nest, parallel outside and vectorized inside;
  * anything these rules do not recognise falls back to dlight's CPU reduction rule, else stays TVM's default.
Every step is a TVM schedule primitive, which checks its own validity; results are compared with onnxruntime in the
tests.

Options of `build` / `compile_onnx`: `integer=True` first rewrites QDQ conv/dense layers into integer arithmetic
(`arq_deploy.targets.int_lowering`; on x86 the convs run on vpdpbusd with VNNI, else vpmaddwd,
`arq_deploy.targets.int_kernels`, scheduled there; `int_kernel` picks one); `tune_trials`/`tuning_db` MetaSchedule-tune the fused functions (`arq_deploy.targets.tuning`) starting from the
schedules above, and apply a database's records before them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import warnings
from pathlib import Path

from arq_deploy.core.errors import ArqError, UnsupportedOpError
from arq_deploy.core.host import machine_arch
from arq_deploy.export.qdq import load_onnx
from arq_deploy.targets.int_kernels import KERNELS, holds_qconv
from arq_deploy.targets.registry import Target, get_target, resolve_tvm_target
from arq_deploy.targets.tuning import check_trials, database_dir
from arq_deploy.targets.tvm_frontend import (
    _first_line,
    _output_shape,
    _staging_dir,
    check_supported,
    import_onnx,
    io_spec,
    require_cross_compiler,
)

DEFAULT_BATCH = 100
LIBRARY, LIBRARY_B1 = "model.so", "model_b1.so"  # main at batch_size; main at batch 1
PIPELINE = "arq-cpu-v1"
SCHEDULES = ("arq", "none")
TILE = {"U": 2, "F": 4}  # rows × output channels per register tile (× one vector of the innermost axis)


def compile_onnx(onnx_path: str | os.PathLike, target: str | Target = "x86", out_dir: str | os.PathLike | None = None,
                 *, batch_size: int = DEFAULT_BATCH, opt_level: int = 3, schedule: str = "arq",
                 single: bool = True, tune_trials: int = 0, tuning_db: str | os.PathLike | None = None,
                 integer: bool = False, int_kernel: str = "auto", external_weights: bool = True) -> Path:
    """Compile an ONNX classifier (input N×C×H×W float32 pixels in [0, 1], output N×K logits) into an artifact.

    onnx_path: float or QDQ ONNX model with one 4-D input (the batch dimension symbolic, or fixed to batch_size).
    target: a registered target name (see `arq_deploy.targets.registry`) or a `Target`.
    out_dir: the artifact directory (replaced if it exists); default: <onnx dir>/targets/<target name>.
    batch_size: the batch compiled into the library's `main` (the runner pads partial batches).
    single: also compile a batch-1 library, `model_b1.so`, so that single images and small remainders do not pay
        for a whole padded batch (latency measurements); about doubles the compile time.
    opt_level: TVM PassContext opt_level.
    schedule: "arq" (the no-tuning CPU schedules above) or "none" (TVM's untuned default, single-threaded).
    tune_trials: MetaSchedule trials (host CPU targets only; `arq_deploy.targets.tuning`), starting from the arq
        schedules; 0: no tuning.
    tuning_db: a tuning database directory: its records are applied, and functions it lacks are tuned into it
        (with tune_trials > 0); reused by later builds. None with tune_trials > 0: a temporary database.
    integer: lower QDQ conv/matmul layers to integer arithmetic (`arq_deploy.targets.int_lowering`).
    int_kernel: with integer, the SIMD conv kernel: "auto" (x86: vpdpbusd where the target has VNNI, else vpmaddwd
        with vpmaddubsw for narrow (w, a) pairs; AArch64: sdot with the dot-product extension, else smlal with
        smlal_narrow for narrow pairs; chosen per layer), "vpdpbusd", "vpmaddwd" (the 8-bit kernel alone),
        "vpmaddubsw" (per layer where exact, else the target's 8-bit kernel), "sdot", "smlal" (the 8-bit NEON
        kernel alone), "smlal_narrow" or "none"
        (relax integer conv2d only); see `arq_deploy.targets.int_kernels`. The manifest records the kernel and, per
        conv layer, which one ran it (schedule.integer_lowering.conv2d_layers).
    external_weights: with integer, keep the integer weights out of the libraries: `main` takes them as parameters
        (`arq_deploy.targets.external_weights`) and the artifact stores them bit-packed in `weights.bin`, each
        tensor at the bits its values need (`arq_deploy.core.weights`; manifest `weights`). False: the weights stay
        constants inside the libraries (8-bit or wider containers). The manifest's `storage` gives the sizes.

    Cross-compiled targets (rpi4, rpi5, jetson-*: aarch64) link with the target's cross compiler; GPU targets
    (cuda, jetson-nano, jetson-orin-nano) are built by `arq_deploy.targets.gpu_build.compile_gpu` (`schedule` does not
    apply: dlight's GPU rules schedule them).

    Raises UnknownNameError (target), ArqError (the target's cross compiler is not installed), ModelFormatError
    (unreadable or malformed ONNX, wrong input spec), UnsupportedOpError (an operator or tensor type TVM cannot import
    or build). Returns out_dir.
    """
    t = get_target(target) if isinstance(target, str) else target
    if t.kind != "cpu":
        raise ArqError(f"target {t.name!r} is a {t.kind} target: build it with arq_deploy.targets.backends.compile_onnx")
    batch_size, tune_trials, tuning = check_build_options(t, batch_size, schedule, tune_trials, tuning_db, integer,
                                                          int_kernel)
    onnx_path = Path(onnx_path)
    out_dir = Path(out_dir) if out_dir is not None else onnx_path.parent / "targets" / t.name

    model = load_onnx(onnx_path)
    inp, out = io_spec(model, batch_size)
    import tvm  # noqa: F401  (~5 s, not counted in the compile time)

    t0 = time.perf_counter()
    check_supported(model)
    mod = import_onnx(model, inp["name"], inp["shape"], onnx_path, fold_weights=not integer)
    tvm_target = resolve_tvm_target(t)
    lifted = [] if integer and external_weights else None  # (name, array) of main's weight parameters

    with database_dir(tuning_db) if tuning else contextlib.nullcontext() as db:  # None: a temporary database
        ex, sched_info = build(mod, tvm_target, opt_level=opt_level, schedule=schedule, integer=integer,
                               tune_trials=tune_trials, tuning_db=db, int_kernel=int_kernel, external_weights=lifted)
        libraries = {LIBRARY: ex}
        if single and batch_size > 1:  # batch 1: the database's records where they fit, no new trials
            one = import_onnx(model, inp["name"], [1, *inp["shape"][1:]], onnx_path, fold_weights=not integer)
            lifted_b1 = [] if lifted is not None else None
            libraries[LIBRARY_B1] = build(one, tvm_target, opt_level=opt_level, schedule=schedule, integer=integer,
                                          tuning_db=db, int_kernel=int_kernel, external_weights=lifted_b1)[0]
            if lifted is not None:
                _same_weights(lifted, lifted_b1)
    out_shape = _output_shape(mod["main"]) or out["shape"]
    compile_s = time.perf_counter() - t0

    info = {
        "target": {"name": t.name, "kind": t.kind, "tvm_target": tvm_target, "host_triple": t.host_triple,
                   "cpu_features": cpu_features(tvm_target),
                   "cross_compiler": t.cross_compiler, "ort_providers": list(t.ort_providers),
                   "energy_probe": t.energy_probe},
        "input": inp,
        "batch_size": batch_size,
        "library": LIBRARY,
        "library_b1": LIBRARY_B1 if LIBRARY_B1 in libraries else None,
        "output": {"name": out["name"], "shape": out_shape, "dtype": "float32"},
        "compile": {"pipeline": PIPELINE if schedule == "arq" else "tvm-default", "schedule": sched_info,
                    "opt_level": opt_level, "seconds": round(compile_s, 2), "integer": bool(integer),
                    "tuning": ({"trials": tune_trials, "database": str(tuning_db) if tuning_db is not None else None}
                               if tuning else None),
                    "batch": "fixed: library at batch_size, library_b1 at 1; the runner pads partial batches"},
        "source": {"file": onnx_path.name, "opset": [{"domain": o.domain, "version": o.version}
                                                     for o in model.opset_import]},
    }
    with _staging_dir(out_dir) as tmp:
        kwargs = {"cc": t.cross_compiler} if t.cross_compiler else {}
        try:
            for fname, lib in libraries.items():
                lib.export_library(str(tmp / fname), **kwargs)
        except Exception as e:  # compiler missing or failing: TVM raises several types
            require_cross_compiler(t)  # missing: say what to install
            raise ArqError(f"linking the library for target {t.name!r} failed: {_first_line(e)}") from None
        if lifted:
            from arq_deploy.core.weights import WEIGHTS_FILE, pack_tensors

            data, info["weights"] = pack_tensors(lifted, WEIGHTS_FILE)
            (tmp / WEIGHTS_FILE).write_bytes(data)
        shutil.copyfile(onnx_path, tmp / "model.onnx")
        paired = onnx_path.with_suffix(".qmodel.pt")  # export's torch model, for white-box checks (arq_deploy.app.checks)
        if paired.is_file():
            shutil.copyfile(paired, tmp / "model.qmodel.pt")
        from arq_deploy.core.artifact import artifact_sizes, load_artifact, write_manifest

        info["storage"] = artifact_sizes(tmp, info)
        write_manifest(tmp, info)
        load_artifact(tmp)  # re-hash what was written before it is published
    return out_dir


# --------------------------------------------------------------------------------------------------------------------
# Relax pipeline and build


def cpu_features(tvm_target: dict) -> list[str]:
    """The SIMD features (as /proc/cpuinfo names them, `core.host.SIMD_FLAGS`) an LLVM target lets the compiled code
    use: a CPU without one of them cannot run the library (`runtime.tvm_runner.require_native` refuses it)."""
    import tvm
    from tvm.target import codegen

    from arq_deploy.core.host import LLVM_FEATURES

    tgt = tvm.target.Target(tvm_target)
    if tgt.kind.name != "llvm":
        return []
    return sorted(flag for feature, flag in LLVM_FEATURES.items() if codegen.llvm_cpu_has_features(feature, tgt))


def _same_weights(a: list, b: list) -> None:
    """The batch-1 library must take the very weights of the main one (one weights file serves both)."""
    import numpy as np

    if len(a) != len(b) or any(x[1].dtype != y[1].dtype or x[1].shape != y[1].shape or not np.array_equal(x[1], y[1])
                               for x, y in zip(a, b)):
        raise ArqError("the batch-1 build lifted other weights than the main build; compile with single=False")


def check_build_options(t: Target, batch_size: int, schedule: str = "arq", tune_trials: int = 0, tuning_db=None,
                        integer: bool = False, int_kernel: str = "auto") -> tuple[int, int, bool]:
    """Validate the build options for target t before anything is built: (batch_size, tune_trials, tuning)."""

    if t.host_arch != machine_arch():  # fail before the build, not after it
        require_cross_compiler(t)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if int(batch_size) < 1:
        raise ArqError(f"batch size must be >= 1, got {batch_size}")
    tune_trials = check_trials(tune_trials)
    tuning = bool(tune_trials) or tuning_db is not None
    if tuning and (t.kind != "cpu" or not t.is_host):
        raise ArqError(f"target {t.name!r}: tuning measures candidates on this machine, so it works for host CPU "
                       f"targets only; drop --tune-trials/--tuning-db")
    if tuning and schedule != "arq":
        raise ArqError(f"tuning needs schedule 'arq', got {schedule!r}")
    if integer and t.kind != "cpu":
        raise ArqError(f"target {t.name!r}: integer lowering is implemented for CPU (llvm) targets only")
    check_int_kernel(int_kernel)
    return int(batch_size), tune_trials, tuning


def build(mod, tvm_target: dict, *, opt_level: int = 3, schedule: str = "arq", integer: bool = False,
          tune_trials: int = 0, tuning_db: str | os.PathLike | None = None, int_kernel: str = "auto",
          external_weights: list | None = None):
    """tvm.compile with the CPU pipeline; returns (executable, schedule info for the manifest).

    integer: first rewrite QDQ conv/matmul layers into integer operators (`arq_deploy.targets.int_lowering`; the
        module must keep its weights as dequantize(constant), i.e. imported with `fold_weights=False`).
    int_kernel: the x86 SIMD conv kernel for integer builds (`compile_onnx`).
    external_weights: with integer, a list: the lowered module's integer weight constants become parameters of
        `main` after the input (`arq_deploy.targets.external_weights.lift_weights`) and their (name, array) pairs
        are appended to the list, in parameter order; info["external_weights"] counts them. None: kept as constants.
    tune_trials, tuning_db: MetaSchedule-tune the fused functions the database lacks with this many trials
        (`arq_deploy.targets.tuning`), then apply the database's best records; functions without a record get the
        arq schedules. tuning_db alone (tune_trials=0) applies existing records only.
    """
    import tvm

    tune_trials = check_trials(tune_trials)
    if (tune_trials or tuning_db is not None) and schedule != "arq":
        raise ArqError(f"tuning needs schedule='arq', got {schedule!r}")
    if tune_trials and tuning_db is None:
        raise ArqError("tuning needs a database directory (tuning_db) to write its records to")
    tgt = tvm.target.Target(tvm_target)
    lanes = f32_lanes(tgt)
    stats: dict = {}  # funcs_* counts, and int_kernel_unscheduled where a kernel schedule failed
    info: dict = {"name": schedule, "vector_lanes_f32": lanes}
    kernel = None
    if integer:
        from arq_deploy.targets.int_lowering import lower_integer

        kernel = integer_kernel(tgt, int_kernel)
        mod, info["integer_lowering"] = lower_integer(mod, kernel=kernel)
        info["int_kernel"] = kernel.to_json() if kernel is not None else None
        if external_weights is not None:
            from arq_deploy.targets.external_weights import lift_weights

            mod, lifted = lift_weights(mod)
            external_weights.extend(lifted)
            info["external_weights"] = len(lifted)
    database = None
    if tuning_db is not None:
        from arq_deploy.targets import tuning

        threads = int(tgt.attrs.get("num-cores", 0) or os.cpu_count() or 1)
        report = tuning.tune(prepare(mod, tgt, opt_level), tgt, tune_trials, tuning_db,
                             baseline=lambda m: schedule_primfunc(m, lanes, threads, kernel))
        info["tuning"] = report.to_json()
        database = tuning.open_database(tuning_db, create=False)
    pipeline = cpu_pipeline(tgt, lanes, stats, database, kernel) if schedule == "arq" else "default"
    try:
        with tvm.transform.PassContext(opt_level=opt_level):
            ex = tvm.compile(mod, target=tgt, relax_pipeline=pipeline)
    except Exception as e:
        raise UnsupportedOpError(f"TVM failed to build the model for {tgt.kind.name}: {_first_line(e)}") from None
    if schedule == "arq":
        info.update(tile=dict(TILE), **stats)  # funcs_arq / funcs_dlight / funcs_default: how each PrimFunc was done
    return ex, info


def integer_kernel(tgt, int_kernel: str = "auto"):
    """The integer conv kernel (`int_kernels.select`) of an integer build for TVM target tgt; ArqError when a kernel
    named explicitly needs CPU features the target lacks."""
    from arq_deploy.targets import int_kernels

    kernel = int_kernels.select(tgt, check_int_kernel(int_kernel))
    if kernel is None and int_kernel not in ("auto", "none"):
        raise ArqError(f"integer kernel {int_kernel!r} needs CPU features this target lacks "
                       f"({tgt.attrs.get('mcpu', 'generic')}); use --int-kernel auto")
    return kernel


def integer_plan(model, target: str | Target = "x86", *, batch_size: int = 1, int_kernel: str = "auto") -> dict:
    """What an integer build (`compile_onnx(..., integer=True)`) of this QDQ ONNX model (a path or a ModelProto)
    would run, without building it: the integer lowering's report (`int_lowering.lower_integer`: per conv layer its
    kernel and a narrow kernel's int16 chunk). Two models with the same graph structure and the same plan compile to
    the same code; only their constants differ (the latency table measures one of them)."""
    import tvm

    from arq_deploy.targets.int_lowering import lower_integer

    t = get_target(target) if isinstance(target, str) else target
    check_build_options(t, batch_size, integer=True, int_kernel=int_kernel)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        model = load_onnx(path)
    else:
        path = Path(f"{model.graph.name or 'model'}.onnx")
    inp, _ = io_spec(model, batch_size)
    check_supported(model)
    mod = import_onnx(model, inp["name"], inp["shape"], path, fold_weights=False)
    return lower_integer(mod, kernel=integer_kernel(tvm.target.Target(resolve_tvm_target(t)), int_kernel))[1]


def prepare(mod, tgt, opt_level: int = 3):
    """The module as `cpu_pipeline` has it right before scheduling (legalized and fused): what tuning tunes."""
    import tvm

    with tgt, tvm.transform.PassContext(opt_level=opt_level):
        return tvm.transform.Sequential(_prepare_passes(tgt))(mod)


def f32_lanes(tgt) -> int:
    """float32 lanes of the target's widest vector unit (AVX-512: 16, AVX/AVX2: 8, SSE/NEON: 4)."""
    if tgt.kind.name != "llvm":
        return 4
    from tvm.target import codegen

    triple = str(tgt.attrs.get("mtriple", ""))
    if triple.startswith(("x86_64", "i686")):
        if codegen.llvm_cpu_has_features("avx512f", tgt):
            return 16
        if codegen.llvm_cpu_has_features("avx", tgt):
            return 8
    return 4


def _prepare_passes(tgt) -> list:
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    return ([relax.transform.DecomposeOpsForInference(), relax.transform.FoldConstant()]
            + cpu.library_dispatch_passes(tgt)
            + cpu.legalize_passes(tgt))  # LegalizeOps, FoldConstant (folds weight DQ), FuseOps, FuseTIR


def cpu_pipeline(tgt, lanes: int, stats: dict | None = None, database=None, kernel=None):
    """TVM's CPU pipeline (tvm.relax.backend.cpu_generic) with `schedule_pass` between fusion and lowering; with a
    MetaSchedule database, its records are applied first (counted in stats["funcs_tuned"]). kernel: the integer
    conv kernel the module was lowered with (`arq_deploy.targets.int_kernels.Kernel`), or None."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="ArqCpuPipeline")
    def _pipeline(mod, _ctx):
        with tgt:
            mod = tvm.transform.Sequential(_prepare_passes(tgt))(mod)
            if database is not None:
                mod = _apply_database(mod, database, stats)
            seq = tvm.transform.Sequential(
                [schedule_pass(tgt, lanes, stats, kernel)]
                + cpu.dataflow_lower_passes(tgt)
                + cpu.finalize_passes(tgt)
            )
            return seq(mod)

    return _pipeline


def _apply_database(mod, database, stats: dict | None):
    """MetaScheduleApplyDatabase; counts the PrimFuncs it scheduled into stats["funcs_tuned"]."""
    from tvm import relax, tirx

    def scheduled(m):
        return {gv.name_hint for gv, f in m.functions_items()
                if isinstance(f, tirx.PrimFunc) and f.attrs.get("tirx.is_scheduled", False)}

    before = scheduled(mod)
    with database:
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
    if stats is not None:
        stats["funcs_tuned"] = len(scheduled(mod) - before)
    return mod


def schedule_pass(tgt, lanes: int, stats: dict | None = None, kernel=None):
    """Module pass: schedule every unscheduled PrimFunc with `schedule_primfunc` (dlight's CPU Reduction rule next)."""
    import tvm
    from tvm import tirx
    from tvm.s_tir import dlight

    fallback = dlight.cpu.Reduction()
    stats = stats if stats is not None else {}
    threads = int(tgt.attrs.get("num-cores", 0) or os.cpu_count() or 1)

    @tvm.transform.module_pass(opt_level=0, name="ArqCpuSchedule")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
                continue
            sch, how = None, "default"
            try:
                sch = schedule_primfunc(func, lanes, threads, kernel)
                how = "arq"
            except Exception as e:  # a rule that does not fit this function: try the next one
                sch = None
                if kernel is not None and holds_qconv(func, kernel):  # our kernel's own schedule failed: say so
                    _kernel_unscheduled(stats, gv.name_hint, e)
            if sch is None:
                try:
                    sch = fallback.apply(func, tgt, False)
                    sch = sch[0] if isinstance(sch, list) and sch else (sch or None)
                    how = "dlight"
                except Exception:
                    sch = None
            if sch is None:
                how = "default"
            stats[f"funcs_{how}"] = stats.get(f"funcs_{how}", 0) + 1
            if sch is not None:
                updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


class KernelScheduleWarning(UserWarning):
    """An integer conv kernel's schedule failed on a function: it runs under a generic schedule (exact, but without
    the kernel's SIMD instructions). The build's schedule info lists it under `int_kernel_unscheduled`."""


def _kernel_unscheduled(stats: dict, function: str, error: Exception) -> None:
    """Record (and warn about) a function whose integer kernel schedule failed."""
    why = _first_line(error) or type(error).__name__
    stats.setdefault("int_kernel_unscheduled", []).append({"function": function, "error": why})
    warnings.warn(f"integer kernel schedule failed on {function}; it runs under a generic schedule (exact, slower): "
                  f"{why}", KernelScheduleWarning, stacklevel=2)


# --------------------------------------------------------------------------------------------------------------------
# The schedule rules

def check_int_kernel(name: str) -> str:
    """`name` when it names an integer conv kernel choice (auto, none, or one of KERNELS), else ArqError."""

    if name not in ("auto", "none", *KERNELS):
        raise ArqError(f"unknown integer kernel {name!r}: choose auto, none, {', '.join(KERNELS)}")
    return name


def schedule_primfunc(func, lanes: int, threads: int = 1, kernel=None):
    """A schedule for one fused PrimFunc (see the module docstring), or None when no rule fits.

    kernel: the integer conv kernel (`arq_deploy.targets.int_kernels.Kernel`) whose functions get that module's
    schedule, or None."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    sch = s_tir.Schedule(func)
    if kernel is not None:
        from arq_deploy.targets.int_kernels import schedule_qconv

        if schedule_qconv(sch, kernel, threads):
            return sch
    infos = normalize_prim_func(sch)
    if not infos:
        return None
    reductions = [b for b in infos if not b.is_injective()]
    if len(reductions) > 1:
        return None
    root = sch.get_sblock("root")
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
    red = reductions[0].name if reductions else None
    producers = {sch.get(b).name_hint for b in sch.get_producers(sch.get_sblock(red))} if red else set()
    for b in infos:  # inline every intermediate elementwise block that is not the reduction's direct input
        if b.name in outputs or b.name == red or b.name in producers:
            continue
        with contextlib.suppress(Exception):
            sch.compute_inline(sch.get_sblock(b.name))
    remaining = [sch.get(b).name_hint for b in sch.get_child_blocks(root)]
    if red is None:
        for name in remaining:
            _schedule_injective(sch, sch.get_sblock(name), lanes)
        return sch
    epilogue = [n for n in remaining if n != red and n not in producers]
    producers = [n for n in remaining if n in producers]
    rb = sch.get_sblock(red)
    kinds = "".join(i.kind for i in reductions[0].iters)
    n_s = len(kinds) - len(kinds.lstrip("S"))
    if n_s == 0 or kinds[n_s:] != "R" * (len(kinds) - n_s):
        return None  # spatial axes after reduction axes: leave it to other rules
    if not epilogue:  # the reduction writes the function's output: accumulate in a local tile, then copy out
        epilogue = [sch.get(sch.cache_write(rb, 0, "global")).name_hint]
    loops = sch.get_loops(rb)
    s_ext = [_extent(sch, lp) for lp in loops[:n_s]]
    if None in s_ext:
        return None
    gemm_like = len(sch.get(rb).reads) >= 2 and sum(e > 1 for e in s_ext) >= 2
    if gemm_like:
        _schedule_tiled(sch, rb, loops[:n_s], loops[n_s:], s_ext, producers, epilogue, lanes, threads)
    else:
        _schedule_reduction(sch, rb, loops[:n_s], producers, epilogue, lanes)
    return sch


def _schedule_tiled(sch, rb, s_loops, r_loops, s_ext, producers, epilogue, lanes, threads):
    """Register tiling: [outer spatial (parallel)] [row, col tiles] [reductions] [F][U][V(vector)]."""
    v = _divisor(s_ext[-1], lanes)
    vo, vi = sch.split(s_loops[-1], [None, v])
    row = max(i for i in range(len(s_loops) - 1) if s_ext[i] > 1)
    uo, ui = sch.split(s_loops[row], [None, _divisor(s_ext[row], TILE["U"])])
    outer, inner = [], []
    for i, lp in enumerate(s_loops[:-1]):
        if i == row:
            continue
        if i == row - 1 and s_ext[i] % TILE["F"] == 0 and s_ext[i] > TILE["F"]:
            fo, fi = sch.split(lp, [None, TILE["F"]])
            outer.append(fo)
            inner.append(fi)
        else:
            outer.append(lp)
    sch.reorder(*outer, uo, vo, *r_loops, *inner, ui, vi)
    placed = []
    if len(outer) >= 2 and s_ext[0] >= 2 * threads:
        # parallel over the batch; the padded input of one image is computed inside its iteration (cache friendly)
        sch.parallel(outer[0])
        for name in producers:
            try:
                pb = sch.get_sblock(name)
                sch.compute_at(pb, outer[0])
                _vectorize_inner(sch, pb, lanes)
                placed.append(name)
            except Exception:  # noqa: PERF203 - leave it as its own loop nest below
                pass
    elif outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    for name in producers:
        if name not in placed:
            _schedule_injective(sch, sch.get_sblock(name), lanes)
    for name in epilogue:
        eb = sch.get_sblock(name)
        sch.reverse_compute_at(eb, vo)
        _vectorize_inner(sch, eb, lanes)
    sch.set_scope(rb, 0, "local")
    for lp in [*inner, ui]:
        sch.unroll(lp)
    for lp in r_loops[1:]:
        e = _extent(sch, lp)
        if e is not None and e <= 4:
            sch.unroll(lp)
    sch.vectorize(vi)
    sch.decompose_reduction(rb, r_loops[0])


def _schedule_reduction(sch, rb, s_loops, producers, epilogue, lanes):
    """Pooling-like reductions: spatial loops fused and parallel, reduction serial, epilogue per output point."""
    fused = sch.fuse(*s_loops) if len(s_loops) > 1 else s_loops[0]
    sch.parallel(fused)
    for name in epilogue:
        sch.reverse_compute_at(sch.get_sblock(name), fused)
    for name in producers:
        _schedule_injective(sch, sch.get_sblock(name), lanes)


def _schedule_injective(sch, block, lanes):
    """Outer loops fused and parallel; the innermost loop vectorized when the vector width divides it."""
    loops = sch.get_loops(block)
    if not loops:
        return
    if len(loops) == 1:
        e = _extent(sch, loops[0])
        if e is not None and e % lanes == 0 and e > lanes:
            outer, inner = sch.split(loops[0], [None, lanes])
            sch.vectorize(inner)
            sch.parallel(outer)
        else:
            sch.parallel(loops[0])
        return
    sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
    _vectorize_inner(sch, block, lanes)


def _vectorize_inner(sch, block, lanes):
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    e = _extent(sch, inner)
    if e is None or e < 2:
        return
    f = _divisor(e, lanes)
    if f < min(4, e):
        return
    if f < e:
        inner = sch.split(inner, [None, f])[1]
    sch.vectorize(inner)


def _extent(sch, loop) -> int | None:
    from tvm import tirx

    e = sch.get(loop).extent
    return int(e) if isinstance(e, tirx.IntImm) else None


def _divisor(n: int, at_most: int) -> int:
    """The largest divisor of n that is <= at_most."""
    for f in range(min(at_most, n), 0, -1):
        if n % f == 0:
            return f
    return 1
