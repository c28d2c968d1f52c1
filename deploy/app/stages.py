"""The stages behind the commands. Each takes its frozen config (`arq_deploy.core.config`), checks everything that
needs the disk, a model or a cluster before it writes anything, runs, writes its outputs with the config beside them
(`cfg.config_path`), and returns a summary dict that the CLI prints and tests read.

    export_stage(ExportConfig) -> dict      quantize + QDQ ONNX + validation against torch
    compile_stage(CompileConfig) -> Path    a TVM artifact for the target
    certify_stage(CertifyConfig) -> dict    randomized smoothing (CERTIFY or IRS, locally, on a device, or over Ray)
    bench_stage(BenchConfig) -> dict        latency, throughput, memory, energy
    search_stage(SearchRunConfig) -> dict   the mixed-precision search
"""

from __future__ import annotations

from pathlib import Path

from arq_deploy.certify.incremental import (
    FloatCache,
    FloatLabelStore,
    IncrementalLog,
    certify_incremental_dataset,
    cost_summary,
    incremental_meta,
)
from arq_deploy.certify.results import CertifyLog, certify_dataset, plot_curve, write_summary
from arq_deploy.certify.sequential import (
    FUTILITY_BETA,
    SequentialLog,
    certify_dataset_sequential,
    check_log_mode,
    check_radii,
    look_schedule,
    radii_schedule,
)
from arq_deploy.certify.smooth import Smooth
from arq_deploy.certify.stats import DEFAULT_RADII, summarize
from arq_deploy.core.config import BenchConfig, CertifyConfig, CompileConfig, ExportConfig, SearchRunConfig
from arq_deploy.core.data import SIZE_HINT, image_size, load_dataset
from arq_deploy.core.errors import ArqError
from arq_deploy.core.fileio import sha256_file, write_json
from arq_deploy.export.pipeline import export_and_validate, load
from arq_deploy.targets.backends import bench_artifact, compile_onnx, open_runner
from arq_deploy.targets.registry import get_target
from arq_deploy.targets.tuning import check_trials


def load_model(source):
    """The torch model of a `ModelSource` (a LoadedModel)."""
    return load(source.name, source.weights, input_shape=source.input_shape)


# ---------------------------------------------------------------------------------------------------- export
def export_stage(cfg: ExportConfig) -> dict:
    lm = load_model(cfg.model)
    if cfg.policy is None and lm.policy is None:
        raise ArqError("give --bits (e.g. 8) or --policy policy.json")
    sigma = float(lm.meta.get("sigma") or 0.0) if cfg.sigma is None else cfg.sigma
    size = image_size(lm.input_shape)  # image files are fitted to it unless --resize/--center-crop say otherwise
    train, test = (load_dataset(cfg.data, split, cfg.preprocess, model_size=size) for split in ("train", "test"))
    res = export_and_validate(lm, cfg.policy, train, test, cfg.out, sigma=sigma, calib_images=cfg.calib_images,
                              validate_images=cfg.validate_images, min_agreement=cfg.min_agreement,
                              int4_weights=cfg.int4_weights, seed=cfg.seed, method=cfg.quantizer,
                              skip_unsupported=cfg.skip_unsupported)
    cfg.save(cfg.config_path)
    return res


# ---------------------------------------------------------------------------------------------------- compile
def compile_stage(cfg: CompileConfig) -> Path:
    get_target(cfg.target)  # unknown names and bad numbers fail before TVM is imported
    check_trials(cfg.tune_trials)
    path = compile_onnx(cfg.onnx, target=cfg.target, out_dir=cfg.out, batch_size=cfg.batch_size,
                        tune_trials=cfg.tune_trials, tuning_db=cfg.tuning_db, integer=cfg.integer,
                        int_kernel=cfg.int_kernel)
    cfg.save(cfg.config_path)
    return path


# ---------------------------------------------------------------------------------------------------- certify
def model_sha256(model_path, weights) -> str:
    """What identifies the certified model: the ONNX file's sha256, an artifact's manifest's, or the checkpoint's."""
    if model_path and Path(model_path).is_file():
        return sha256_file(model_path)
    if model_path:
        return sha256_file(Path(model_path) / "manifest.json")
    return sha256_file(weights) if weights else ""


def certify_stage(cfg: CertifyConfig, progress: bool = True) -> dict:
    """Certify the test images (every `skip`-th, at most `max_images`); returns the run's summary dict with `meta`,
    `summary` (certified accuracy per radius, ACR, abstain rate, seconds per input) and, for IRS, `cost`."""
    check_log_mode(cfg.out, cfg.mode)  # a log of another mode is refused before anything is loaded or written
    schedule = _sequential_schedule(cfg)
    lm = load_model(cfg.model) if cfg.model_path is None else None
    if cfg.ray is not None:
        from arq_deploy.certify.distributed import check_address, runner_spec

        spec = runner_spec(cfg.model_path, cfg.backend, batch_size=cfg.batch_size)
        check_address(cfg.ray.address)  # an unreachable cluster fails before the log is created
    runner, target = open_runner(cfg.model_path, cfg.target, cfg.remote, cfg.backend, cfg.batch_size, torch_model=lm)
    try:
        ds = load_dataset(cfg.data, "test", cfg.preprocess, model_size=image_size(runner.input_shape))
        if tuple(ds.input_shape) != tuple(runner.input_shape):
            raise ArqError(f"data images are {ds.input_shape}, the model expects {runner.input_shape}{SIZE_HINT}")
        meta = {"model": str(cfg.model_path or cfg.model.weights), "model_sha256": model_sha256(cfg.model_path,
                cfg.model.weights), "backend": runner.name, "target": target.name, "data": ds.name}
        if cfg.irs is not None:
            certs, extra = _certify_incremental(cfg, runner, target, ds, meta)
            sigma = extra["sigma"]
        elif schedule is not None:
            certs, extra = _certify_sequential(cfg, schedule, runner, ds, meta, progress)
            sigma = cfg.sigma
        else:
            meta.update(sigma=cfg.sigma, n0=cfg.n0, n=cfg.n, alpha=cfg.alpha, seed=cfg.seed)
            if cfg.randomized_cp:
                meta["mode"] = cfg.mode
            indices = list(range(0, len(ds), cfg.skip))[: cfg.max_images or None]
            cfg.save(cfg.config_path)
            with CertifyLog(cfg.out, meta) as log:
                if cfg.ray is not None:
                    from arq_deploy.certify.distributed import certify_dataset_ray

                    certs = certify_dataset_ray(spec, ds.x(), ds.labels, indices, cfg.n0, cfg.n, cfg.alpha, cfg.seed,
                                                cfg.sigma, ds.num_classes, log, address=cfg.ray.address,
                                                batch_size=cfg.batch_size, num_workers=cfg.ray.workers,
                                                cpus_per_worker=cfg.ray.cpus_per_worker, progress=progress)
                else:
                    smooth = Smooth(runner, ds.num_classes, cfg.sigma, batch_size=cfg.batch_size)
                    certs = certify_dataset(smooth, ds.x(), ds.labels, indices, cfg.n0, cfg.n, cfg.alpha, cfg.seed,
                                            log, progress=progress, randomized=cfg.randomized_cp)
            extra, sigma = {}, cfg.sigma
    finally:
        if hasattr(runner, "close"):  # a qemu worker or an RPC session is ended with the run
            runner.close()
    summary = summarize(certs, (0.0, *cfg.radii) if cfg.radii is not None else DEFAULT_RADII)
    out = Path(cfg.out)
    write_summary(out.with_suffix(".summary.json"), summary, {**meta, **extra})
    plot_curve(certs, out.with_suffix(".png"), sigma)
    return {"images": len(certs), "meta": {**meta, **extra}, "summary": summary.to_dict(), "certificates": certs}


def _sequential_schedule(cfg: CertifyConfig):
    """The look schedule of --radii / --adaptive (None for the other modes), with the radii checked against what the
    cap can certify: one line and nothing written when it cannot."""
    if cfg.mode not in ("sequential", "adaptive"):
        return None
    if cfg.radii is None:
        return look_schedule(cfg.alpha, cfg.max_n, cfg.first_n)
    schedule = radii_schedule(cfg.alpha, cfg.max_n, cfg.first_n)
    check_radii(cfg.radii, cfg.sigma, schedule)
    return schedule


def _certify_sequential(cfg: CertifyConfig, schedule, runner, ds, meta, progress: bool) -> tuple[list, dict]:
    """Anytime-valid sequential certification (--radii) or adaptive radius estimation (--adaptive)."""
    import numpy as np

    meta.update(mode=cfg.mode, sigma=cfg.sigma, n0=cfg.n0, alpha=cfg.alpha, seed=cfg.seed, max_n=cfg.max_n,
                first_n=cfg.first_n, looks=list(schedule.looks))
    if cfg.radii is not None:
        meta.update(radii=list(cfg.radii), look_alphas=list(schedule.alphas), futility_beta=FUTILITY_BETA)
    else:
        meta["tolerance"] = cfg.tolerance
    indices = list(range(0, len(ds), cfg.skip))[: cfg.max_images or None]
    cfg.save(cfg.config_path)
    log_type = SequentialLog if cfg.radii is not None else CertifyLog
    with log_type(cfg.out, meta) as log:
        smooth = Smooth(runner, ds.num_classes, cfg.sigma, batch_size=cfg.batch_size)
        certs = certify_dataset_sequential(smooth, ds.x(), ds.labels, indices, cfg.n0, schedule, cfg.seed, log,
                                           radii=cfg.radii, tolerance=cfg.tolerance if cfg.adaptive else None,
                                           progress=progress)
    used = np.array([c.n0 + c.n for c in certs], dtype=np.float64)
    return certs, {"samples_per_input": {"mean": float(used.mean()), "median": float(np.median(used)),
                                         "max": int(used.max()), "fixed_n_equivalent": cfg.n0 + cfg.max_n}}


def _certify_incremental(cfg: CertifyConfig, runner, target, ds, meta) -> tuple[list, dict]:
    irs = cfg.irs
    cache = FloatCache(irs.float_log)
    float_runner, _ = open_runner(irs.float_model, target if target.kind == "gpu" else None,
                                  batch_size=cfg.batch_size)
    cache.check(sigma=cfg.sigma, n0=cfg.n0, n=cfg.n, alpha=cfg.alpha, seed=cfg.seed, data=ds.name,
                model_sha256=model_sha256(irs.float_model, None))
    indices = [i for i in sorted(cache.indices()) if i % cfg.skip == 0][: cfg.max_images or None]
    run_meta = incremental_meta(cache, irs.n_p, irs.alpha_zeta, irs.fallback_n, **meta,
                                float_backend=float_runner.name)
    labels = irs.labels_path
    store = FloatLabelStore(labels, cache, float_runner.name) if labels is not None else None
    cfg.save(cfg.config_path)
    with IncrementalLog(cfg.out, run_meta) as log:
        certs = certify_incremental_dataset(float_runner, runner, cache, ds.x(), ds.labels, indices, irs.n_p,
                                            irs.alpha_zeta, log, num_classes=ds.num_classes,
                                            batch_size=cfg.batch_size, label_store=store,
                                            fallback_n=irs.fallback_n)
    extra = {"float_labels": str(store.path) if store is not None else None}
    return certs, {"sigma": cache.meta["sigma"], "cost": cost_summary(certs), **run_meta, **extra}


# ---------------------------------------------------------------------------------------------------- bench
def bench_stage(cfg: BenchConfig) -> dict:
    res = bench_artifact(cfg.model_path, cfg.target, cfg.remote, batch_large=cfg.batch, repeats=cfg.repeats,
                         warmup=cfg.warmup, probe=cfg.probe, backend=cfg.backend)
    write_json(cfg.out, res)
    cfg.save(cfg.config_path)
    return res


# ---------------------------------------------------------------------------------------------------- search
def search_stage(cfg: SearchRunConfig, progress: bool = True) -> dict:
    from arq_deploy.search.driver import run_search

    return run_search(cfg, progress=progress)
