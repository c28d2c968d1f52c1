"""The `arq-deploy` command line. Heavy libraries (torch, onnxruntime, TVM) are imported inside commands only."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from arq_deploy import __version__
from arq_deploy.errors import ArqError


class _Group(click.Group):
    """Turns every user error into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ArqError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted (results written so far are kept)", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="arq-deploy")
def main():
    """arq-deploy: quantize, export, compile and certify CNNs for edge hardware with certified robustness."""


def _policy(bits: str | None, policy: str | None):
    from arq_deploy.search.policy import QuantPolicy, parse_bits

    if bits and policy:
        raise ArqError("give --bits or --policy, not both")
    if policy:
        return QuantPolicy.load(policy)
    if bits:
        return parse_bits(bits)
    return None


def _shape(text: str | None):
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ArqError(f"--input-shape must be C,H,W, got {text!r}") from None


model_opt = click.option("--model", "model_name", default=None, help="resnet20/32/44/56/110, mobilenetv2, digits_cnn, "
                         "or package.module:factory (default: the checkpoint's arch)")
weights_opt = click.option("--weights", default=None, type=click.Path(dir_okay=False),
                           help="checkpoint (.th/.pt state dict, loaded with weights_only) or torch.export .pt2")
shape_opt = click.option("--input-shape", default=None, help="C,H,W for a user model")
bits_opt = click.option("--bits", default=None, help="uniform bits: 8, W4A8 or 4,8; float for no quantization")
policy_opt = click.option("--policy", default=None, type=click.Path(dir_okay=False), help="policy.json")


def model_opts(f):
    """--model, --weights, --input-shape."""
    return model_opt(weights_opt(shape_opt(f)))


data_opt = click.option("--data", default="digits", show_default=True,
                        help="'digits', a CIFAR-10 python-batch folder, an image folder or a .tar/.tar.gz of one")


@main.command()
@model_opts
@bits_opt
@policy_opt
def layers(model_name, weights, input_shape, bits, policy):
    """List the quantizable layers (MACs, params) and the BOPs of a policy."""
    from rich.console import Console
    from rich.table import Table

    from arq_deploy.pipeline import load
    from arq_deploy.search.layers import extract_layer_specs

    lm = load(model_name, weights, input_shape=_shape(input_shape))
    specs = extract_layer_specs(lm.model, lm.input_shape)
    pol = _policy(bits, policy)
    if pol is not None:
        pol.validate(specs)
    t = Table(title=f"{lm.name}: {len(specs)} quantizable layers, {sum(s.macs for s in specs) / 1e6:.2f} M MACs")
    for col in ("#", "name", "kind", "in", "out", "kernel", "stride", "MACs", "params", "bits"):
        t.add_column(col)
    for s in specs:
        b = pol.bits(s.name) if pol else None
        t.add_row(str(s.index), s.name, s.kind, str(s.in_channels), str(s.out_channels), "×".join(map(str, s.kernel)),
                  str(s.stride[0]), f"{s.macs:,}", f"{s.params:,}", str(b) if b else "float")
    Console().print(t)
    if pol is not None:
        click.echo(f"BOPs {pol.bops(specs):,} = {100 * pol.bops_fraction(specs):.3f}% of W32A32")


@main.command()
@model_opts
@data_opt
@click.option("--mode", default="gaussian", show_default=True,
              help="vanilla, gaussian (noise σ), pgd (L∞ PGD adversarial training) or distill (robust distillation "
              "from --teacher: the student on PGD examples matched to the teacher's clean soft labels)")
@click.option("--sigma", type=float, default=None, help="Gaussian noise std, pixel scale (--mode gaussian) [0.25]")
@click.option("--eps", default="8/255", show_default=True,
              help="L∞ PGD radius, pixel scale: 8/255 or 0.03 (pgd, distill)")
@click.option("--pgd-steps", type=int, default=7, show_default=True, help="PGD steps per training batch")
@click.option("--pgd-step-size", default=None, help="PGD step, pixel scale, e.g. 2/255 [2.5·eps/steps]")
@click.option("--teacher", default=None, type=click.Path(dir_okay=False), help="teacher checkpoint (--mode distill)")
@click.option("--teacher-model", default=None, help="teacher architecture [the teacher checkpoint's arch]")
@click.option("--temperature", type=float, default=4.0, show_default=True, help="distillation temperature T")
@click.option("--clean-weight", type=float, default=0.0, show_default=True,
              help="distill: weight w of the clean cross-entropy (the T²·KL term gets 1 - w)")
@click.option("--init", default=None, help="random or weights [weights when --weights is given, else random]")
@click.option("--quantizer", default=None, help="QAT quantization method (with --bits/--policy)")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--lr", type=float, default=None,
              help="peak learning rate [0.05; 0.001 for quantization-aware training: the BN-folded fake-quant model collapses at 0.003 and above on ResNet-20]")
@click.option("--batch-size", type=int, default=128, show_default=True)
@bits_opt
@policy_opt
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="checkpoint to write")
def train(model_name, weights, input_shape, data, mode, sigma, eps, pgd_steps, pgd_step_size, teacher, teacher_model,
          temperature, clean_weight, init, quantizer, epochs, lr, batch_size, bits, policy, seed, out):
    """Train or fine-tune in a --mode (vanilla, gaussian noise, PGD adversarial training, robust distillation),
    from random weights or a checkpoint; with --bits/--policy, quantization-aware (QAT) in the same mode."""
    import torch

    from arq_deploy.data import load_dataset
    from arq_deploy.pipeline import load, save_checkpoint, train as run_train
    from arq_deploy.search.finetune import training_options

    if epochs < 1:
        raise ArqError("--epochs must be >= 1")
    cfg, init = training_options(mode, sigma, eps, pgd_steps, pgd_step_size, temperature, clean_weight, quantizer,
                                 teacher, init, weights, quantized=bool(bits or policy))
    pol = _policy(bits, policy)
    torch.manual_seed(seed)  # a random init is seeded too
    lm = load(model_name or ("digits_cnn" if data == "digits" and not weights else None), weights,
              input_shape=_shape(input_shape))
    tlm = load(teacher_model, teacher, input_shape=lm.input_shape) if teacher else None
    ds = load_dataset(data, "train")
    if lr is None:
        lr = 0.001 if pol is not None else 0.05
    if not lr > 0:
        raise ArqError("--lr must be > 0")
    model, history = run_train(lm, ds, cfg.sigma, epochs, lr=lr, batch_size=batch_size, seed=seed, policy=pol,
                               mode=cfg.mode, eps=cfg.eps, pgd_steps=cfg.pgd_steps, pgd_step_size=cfg.pgd_step_size,
                               teacher=tlm, temperature=cfg.temperature, clean_weight=cfg.clean_weight,
                               quantizer=cfg.quantizer)
    record = {**cfg.to_dict(), "teacher": _source(teacher, tlm), "init": _source(weights, lm) if init == "weights"
              else {"from": "random", "seed": seed}}
    record.update(quantizer=history[-1]["quantizer"])  # the method used (the default one under QAT), else None
    record.pop("sigma")
    save_checkpoint(out, model, lm, cfg.sigma, epochs, policy=pol.resolve(_specs(lm)) if pol else None,
                    history=history, training=record)
    h = history[-1]
    click.echo(f"wrote {out}: mode {cfg.mode}, epoch {h['epoch']} loss {h['loss']:.4f}, accuracy on the "
               f"{cfg.mode} training inputs {h['train_acc']:.4f}")


def _source(path, lm) -> dict | None:
    """Where a checkpoint came from: path, sha256, arch and its own training mode (standard or robust)."""
    from arq_deploy.fileio import sha256_file

    if path is None:
        return None
    return {"from": "weights", "path": str(path), "sha256": sha256_file(path), "arch": lm.name,
            "mode": lm.meta.get("mode")}


def _specs(lm):
    from arq_deploy.search.layers import extract_layer_specs

    return extract_layer_specs(lm.model, lm.input_shape)


@main.command()
@model_opts
@bits_opt
@policy_opt
@data_opt
@click.option("--sigma", type=float, default=None,
              help="calibrate on x + σ·ε (default: the checkpoint's training σ, else 0)")
@click.option("--calib-images", type=int, default=512, show_default=True)
@click.option("--validate-images", type=int, default=1000, show_default=True)
@click.option("--min-agreement", type=float, default=0.99, show_default=True)
@click.option("--int4-weights", is_flag=True, help="store ≤4-bit weights as native ONNX INT4 (onnxruntime only)")
@click.option("--quantizer", default=None,
              help="quantization method: percentile, minmax, pwlq (PTQ) or dorefa, pact, lsq (their QAT quantizers at "
              "calibration) [percentile, or a QAT checkpoint's own]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="model.qdq.onnx to write")
def export(model_name, weights, input_shape, bits, policy, data, sigma, calib_images, validate_images, min_agreement,
           int4_weights, quantizer, seed, out):
    """Quantize (policy + calibration), export a QDQ ONNX model, and validate it against torch (export.json)."""
    from arq_deploy.data import load_dataset
    from arq_deploy.pipeline import export_and_validate, load

    lm = load(model_name, weights, input_shape=_shape(input_shape))
    pol = _policy(bits, policy)
    if pol is None and lm.meta.get("policy") is None:
        raise ArqError("give --bits (e.g. 8) or --policy policy.json")
    if sigma is None:
        sigma = float(lm.meta.get("sigma") or 0.0)
    res = export_and_validate(lm, pol, load_dataset(data, "train"), load_dataset(data, "test"), out, sigma=sigma,
                              calib_images=calib_images, validate_images=validate_images, min_agreement=min_agreement,
                              int4_weights=int4_weights, seed=seed, method=quantizer)
    v = res["validation"]
    click.echo(f"wrote {out} ({res['policy_summary']} {res['quantizer']}, "
               f"BOPs {100 * res['bops_fraction']:.3f}% of W32A32); "
               f"onnxruntime top-1 {v['accuracy_candidate']:.4f} vs torch {v['accuracy_reference']:.4f}, "
               f"agreement {v['top1_agreement']:.4f} on {v['images']} images")


@main.command(name="compile")
@click.argument("onnx_path", type=click.Path(dir_okay=False))
@click.option("--target", default="x86", show_default=True)
@click.option("--batch-size", type=int, default=100, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="artifact directory to write")
@click.option("--tune-trials", type=int, default=0, show_default=True,
              help="MetaSchedule tuning trials (host CPU targets), starting from the built-in schedules")
@click.option("--tuning-db", type=click.Path(file_okay=False), default=None,
              help="tuning database directory: records are applied and new ones added; reuse it across builds")
@click.option("--integer", is_flag=True, help="compute QDQ conv/dense layers in integer arithmetic (int32 accumulate)")
@click.option("--int-kernel", type=click.Choice(["auto", "vpdpbusd", "vpmaddwd", "sdot", "none"]), default="auto",
              show_default=True,
              help="SIMD conv kernel of --integer builds (auto: x86 vpdpbusd with VNNI, else vpmaddwd; AArch64 sdot)")
def compile_cmd(onnx_path, target, batch_size, out, tune_trials, tuning_db, integer, int_kernel):
    """Compile an ONNX model with TVM into an artifact directory (model library + manifest.json with hashes)."""
    from arq_deploy.targets.registry import get_target
    from arq_deploy.targets.tuning import check_trials
    from arq_deploy.targets.tvm_build import compile_onnx

    get_target(target)  # fail fast on unknown names and bad numbers, before importing TVM
    check_trials(tune_trials)
    path = compile_onnx(onnx_path, target=target, out_dir=out, batch_size=batch_size, tune_trials=tune_trials,
                        tuning_db=tuning_db, integer=integer, int_kernel=int_kernel)
    click.echo(f"wrote {path}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print every field of every target as JSON")
def targets(as_json):
    """List the registered compilation targets (cuda-smNN also names the cuda target for architecture sm_NN)."""
    import json

    from arq_deploy.targets.registry import list_targets, summary

    if as_json:
        click.echo(json.dumps([t.to_json() for t in list_targets()], indent=2))
        return
    rows = [summary(t) for t in list_targets()]
    cols = ["name", "kind", "device", "host", "cross_compiler", "onnxruntime", "energy"]
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols[:-1]}
    click.echo("  ".join(c.ljust(width[c]) for c in cols[:-1]) + "  energy")
    for r in rows:
        click.echo("  ".join(r[c].ljust(width[c]) for c in cols[:-1]) + "  " + r["energy"])
    click.echo("\ncuda-smNN (e.g. cuda-sm75, cuda-sm90) is the cuda target for another GPU architecture; "
               "--json shows every field.")


@main.command()
@click.argument("model_path", required=False, type=click.Path())
@model_opts
@data_opt
@click.option("--backend", default="auto", show_default=True, help="auto, onnxruntime, tvm or torch")
@click.option("--sigma", type=float, default=None, help="noise std in pixel units (required unless incremental)")
@click.option("--n0", type=int, default=None, help="selection samples [100]")
@click.option("--n", "n", type=int, default=None, help="estimation samples [10000]")
@click.option("--alpha", type=float, default=None, help="failure probability [0.001]")
@click.option("--skip", type=int, default=1, show_default=True, help="certify every SKIP-th test image")
@click.option("--max", "max_images", type=int, default=None, help="at most this many images")
@click.option("--batch-size", type=int, default=500, show_default=True)
@click.option("--seed", type=int, default=None, help="noise seed [0]")
@click.option("--ray", "ray_address", default=None, help="shard inputs over Ray: auto, local or HOST:PORT")
@click.option("--ray-workers", type=int, default=None, help="Ray workers (default: cluster CPUs / cpus per worker)")
@click.option("--ray-cpus-per-worker", type=int, default=1, show_default=True)
@click.option("--remote", default=None, metavar="HOST:PORT",
              help="run a compiled TVM artifact on a remote device through TVM RPC (python -m tvm.exec.rpc_server "
                   "on the device)")
@click.option("--incremental-from", "float_log", default=None, type=click.Path(dir_okay=False),
              help="incremental smoothing (IRS) from this float model's certification log (σ, N0, N, α, seed, inputs "
                   "are taken from it)")
@click.option("--float-model", default=None, type=click.Path(), help="the float model that wrote --incremental-from")
@click.option("--n-p", "n_p", type=int, default=1000, show_default=True, help="IRS disagreement samples")
@click.option("--alpha-zeta", type=float, default=0.001, show_default=True, help="IRS disagreement bound's α")
@click.option("--fallback-n", type=int, default=None,
              help="IRS: N of the full CERTIFY where the incremental bound fails; 0: abstain there instead "
                   "[the float log's N]")
@click.option("--float-labels", default=None, metavar="PATH|none",
              help="IRS: where the float model's labels on the disagreement samples are kept, so that later runs "
                   "against the same log run only the quantized model [FLOAT_LOG.labels; none: keep nothing]")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="TSV log (appended, resumable)")
def certify(model_path, model_name, weights, input_shape, data, backend, sigma, n0, n, alpha, skip, max_images,
            batch_size, seed, ray_address, ray_workers, ray_cpus_per_worker, remote, float_log, float_model, n_p,
            alpha_zeta, fallback_n, float_labels, out):
    """Randomized-smoothing CERTIFY (Cohen et al.) on test images: TSV rows, summary JSON and a PNG curve.

    With --incremental-from FLOAT.tsv --float-model FLOAT.onnx, certify a quantized model incrementally (Ugare et
    al. 2024) from the float model's certificates, falling back to full CERTIFY where that fails."""
    from arq_deploy.certify.results import plot_curve, write_summary
    from arq_deploy.certify.stats import summarize
    from arq_deploy.data import load_dataset
    from arq_deploy.pipeline import make_runner

    if ray_address and model_path is None:
        raise ArqError("--ray certifies an ONNX model or a TVM artifact: give MODEL_PATH (export the model first)")
    if skip < 1:
        raise ArqError("--skip must be >= 1")
    if not float_log:  # check the numbers before loading anything
        sigma, n0, n, alpha, seed = _smoothing_params(sigma, n0, n, alpha, seed)
    lm = None
    if model_path is None:
        from arq_deploy.pipeline import load

        lm = load(model_name, weights, input_shape=_shape(input_shape))
    runner = _remote_runner(model_path, remote, ray_address) if remote else \
        make_runner(model_path, backend, lm, batch_size=batch_size)
    ds = load_dataset(data, "test")
    if tuple(ds.input_shape) != tuple(runner.input_shape):
        raise ArqError(f"data images are {ds.input_shape}, the model expects {runner.input_shape}")
    ident = _model_sha(model_path, weights)
    meta = {"model": str(model_path or weights), "model_sha256": ident, "backend": runner.name, "data": ds.name}
    if float_log:
        if ray_address:
            raise ArqError("--ray and --incremental-from cannot be combined yet")
        certs, extra = _certify_incremental(runner, ds, meta, float_log, float_model, n_p, alpha_zeta, sigma, n0, n,
                                            alpha, seed, batch_size, skip, max_images, out, float_labels,
                                            fallback_n)
        sigma = extra["sigma"]
    else:
        meta.update(sigma=sigma, n0=n0, n=n, alpha=alpha, seed=seed)
        indices = list(range(0, len(ds), skip))[: max_images or None]
        certs, extra = _certify_full(runner, ds, meta, indices, batch_size, ray_address, ray_workers,
                                     ray_cpus_per_worker, model_path, backend, out), {}
    summary = summarize(certs)
    out = Path(out)
    write_summary(out.with_suffix(".summary.json"), summary, {**meta, **extra})
    plot_curve(certs, out.with_suffix(".png"), sigma)
    d = summary.to_dict()
    click.echo(f"{len(certs)} images: ACR {d['acr']:.3f}, certified accuracy "
               + ", ".join(f"r={r}: {v:.3f}" for r, v in d["certified_accuracy"].items())
               + f", abstain {d['abstain_rate']:.3f}, {d['seconds_per_input']:.2f} s/image"
               + (f"; IRS path for {100 * extra['cost']['irs_fraction']:.0f}% of inputs" if "cost" in extra else ""))


def _remote_runner(model_path, remote, ray_address):
    """certify --remote: a TVM artifact run on a device through RPC (address checked before the artifact loads)."""
    from arq_deploy.rpc_runner import RpcTvmRunner, parse_address

    parse_address(remote)
    if ray_address:
        raise ArqError("--remote and --ray cannot be combined")
    if model_path is None or not Path(model_path).is_dir():
        raise ArqError("--remote certifies a compiled TVM artifact directory: compile the model first "
                       "(arq-deploy compile MODEL.onnx --target TARGET --out DIR)")
    return RpcTvmRunner(model_path, remote)


def _model_sha(model_path, weights) -> str:
    from arq_deploy.fileio import sha256_file

    if model_path and Path(model_path).is_file():
        return sha256_file(model_path)
    if model_path:
        return sha256_file(Path(model_path) / "manifest.json")
    return sha256_file(weights) if weights else ""


def _smoothing_params(sigma, n0, n, alpha, seed):
    from arq_deploy.certify.smooth import check_params
    from arq_deploy.errors import CertificationInputError

    if sigma is None:
        raise ArqError("give --sigma (the noise level the model was trained for)")
    if not sigma > 0 or sigma != sigma or sigma == float("inf"):
        raise CertificationInputError(f"--sigma must be > 0, got {sigma}")
    n0, n, alpha = check_params(100 if n0 is None else n0, 10000 if n is None else n,
                                0.001 if alpha is None else alpha)
    return sigma, n0, n, alpha, 0 if seed is None else seed


def _certify_full(runner, ds, meta, indices, batch_size, ray_address, ray_workers, ray_cpus_per_worker, model_path,
                  backend, out):
    from arq_deploy.certify.results import CertifyLog, certify_dataset
    from arq_deploy.certify.smooth import Smooth

    with CertifyLog(out, meta) as log:
        if ray_address:
            from arq_deploy.certify.distributed import certify_dataset_ray, runner_spec

            return certify_dataset_ray(runner_spec(model_path, backend, batch_size=batch_size), ds.x(), ds.labels,
                                       indices, meta["n0"], meta["n"], meta["alpha"], meta["seed"], meta["sigma"],
                                       ds.num_classes, log, address=ray_address, batch_size=batch_size,
                                       num_workers=ray_workers, cpus_per_worker=ray_cpus_per_worker)
        smooth = Smooth(runner, ds.num_classes, meta["sigma"], batch_size=batch_size)
        return certify_dataset(smooth, ds.x(), ds.labels, indices, meta["n0"], meta["n"], meta["alpha"],
                               meta["seed"], log)


def _certify_incremental(runner, ds, meta, float_log, float_model, n_p, alpha_zeta, sigma, n0, n, alpha, seed,
                         batch_size, skip, max_images, out, float_labels=None, fallback_n=None):
    from arq_deploy.certify.incremental import (FloatCache, FloatLabelStore, IncrementalLog,
                                                certify_incremental_dataset, cost_summary, incremental_meta)
    from arq_deploy.pipeline import make_runner

    if not float_model:
        raise ArqError("--incremental-from needs --float-model (the model that wrote that log)")
    cache = FloatCache(float_log)
    float_runner = make_runner(float_model, "auto", None, batch_size=batch_size)
    cache.check(sigma=sigma, n0=n0, n=n, alpha=alpha, seed=seed, data=ds.name,
                model_sha256=_model_sha(float_model, None))
    indices = [i for i in sorted(cache.indices()) if i % skip == 0][: max_images or None]
    run_meta = incremental_meta(cache, n_p, alpha_zeta, fallback_n, **meta, float_backend=float_runner.name)
    store = None
    if (float_labels or "").lower() != "none":
        store = FloatLabelStore(float_labels or f"{float_log}.labels", cache, float_runner.name)
    with IncrementalLog(out, run_meta) as log:
        certs = certify_incremental_dataset(float_runner, runner, cache, ds.x(), ds.labels, indices, n_p, alpha_zeta,
                                            log, num_classes=ds.num_classes, batch_size=batch_size, label_store=store,
                                            fallback_n=fallback_n)
    extra = {"float_labels": str(store.path) if store is not None else None}
    return certs, {"sigma": cache.meta["sigma"], "cost": cost_summary(certs), **run_meta, **extra}


@main.command(name="bench")
@click.argument("artifact", type=click.Path())
@click.option("--target", default=None, help="registered target (default: the artifact's; x86 for an ONNX file)")
@click.option("--remote", default=None, metavar="HOST:PORT", help="run a TVM artifact on a remote device over TVM RPC")
@click.option("--batch", "batch_large", type=int, default=256, show_default=True, help="batch for the throughput")
@click.option("--repeats", type=int, default=50, show_default=True, help="timed calls at batch 1")
@click.option("--warmup", type=int, default=5, show_default=True, help="untimed calls first")
@click.option("--probe", default=None, help="energy probe instead of the target's: rapl, nvml, ina3221, vcgencmd, none")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="bench-TARGET.json to write")
def bench_cmd(artifact, target, remote, batch_large, repeats, warmup, probe, out):
    """Latency p50/p90/p99 at batch 1, throughput at --batch, peak memory and joules per inference of an ONNX model
    (onnxruntime) or a compiled artifact (TVM, locally or on a --remote device)."""
    from arq_deploy.bench import bench_artifact
    from arq_deploy.fileio import write_json

    res = bench_artifact(artifact, target, remote, batch_large=batch_large, repeats=repeats, warmup=warmup,
                         probe=probe)
    write_json(out, res)
    lat, thr, e = res["latency"], res["throughput"], res["energy_j_per_inference"]
    click.echo(f"wrote {out}: {res['runner']} on {res['target']}: batch 1 p50 {lat['p50_ms']:.3f} ms "
               f"(p99 {lat['p99_ms']:.3f}), {thr['images_per_s']:,.0f} img/s at batch {thr['batch']}, peak memory "
               f"+{res['memory']['peak_increase_mb']} MB, energy "
               + (f"{e * 1e3:.4f} mJ/inference" if isinstance(e, float) else e))


@main.command()
@model_opts
@data_opt
@click.option("--sigma", type=float, default=None, help="smoothing noise std (default: the checkpoint's training σ)")
@click.option("--budget", type=float, default=0.015, show_default=True, help="fraction of W32A32 BOPs")
@click.option("--latency-budget-ms", type=float, default=None, help="latency budget on --target instead of BOPs")
@click.option("--target", default=None, help="target of the latency budget (its latency table)")
@click.option("--latency-table", default=None, type=click.Path(dir_okay=False),
              help="per-layer latency table of --target (from `arq-deploy latency-table`)")
@click.option("--episodes", type=int, default=200, show_default=True)
@click.option("--method", type=click.Choice(["ddpg", "random", "greedy"]), default="ddpg", show_default=True,
              help="DDPG agent (ARQ/HAQ), random search, or the greedy sensitivity baseline")
@click.option("--reward", "reward_kind", type=click.Choice(["irs", "full", "accuracy"]), default="irs",
              show_default=True, help="ACR by incremental smoothing (ARQ), by full certification, or clean accuracy "
              "(HAQ)")
@click.option("--val-images", type=int, default=50, show_default=True, help="validation subset of training images")
@click.option("--calib-images", type=int, default=256, show_default=True)
@click.option("--n0", type=int, default=100, show_default=True)
@click.option("--n", "n", type=int, default=2000, show_default=True, help="float certification samples per input")
@click.option("--n-p", "n_p", type=int, default=200, show_default=True, help="IRS disagreement samples per input")
@click.option("--alpha", type=float, default=0.001, show_default=True)
@click.option("--alpha-zeta", type=float, default=0.001, show_default=True)
@click.option("--warmup", type=int, default=20, show_default=True, help="DDPG episodes with random actions")
@click.option("--min-bits", type=int, default=2, show_default=True)
@click.option("--max-bits", type=int, default=8, show_default=True)
@click.option("--warm-start", default=None, type=click.Path(dir_okay=False), help="policy.json tried first")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="run directory (resumable)")
@click.option("--ray", "ray_address", default=None,
              help="evaluate each reward's validation images in parallel Ray actors: auto, local or HOST:PORT")
@click.option("--ray-workers", type=int, default=None, help="Ray actors (default: the cluster's CPUs)")
@click.option("--rerank-top", type=int, default=0, show_default=True,
              help="re-score the K best distinct policies on fresh training images and keep the best of those "
              "(counters the winner's curse of a small validation set; 0: keep the best search reward)")
@click.option("--rerank-images", type=int, default=100, show_default=True,
              help="fresh training images (outside the search's validation and calibration sets) for --rerank-top")
def search(model_name, weights, input_shape, data, sigma, budget, latency_budget_ms, target, latency_table, episodes,
           method, reward_kind, val_images, calib_images, n0, n, n_p, alpha, alpha_zeta, warmup, min_bits, max_bits,
           warm_start, seed, out, ray_address, ray_workers, rerank_top, rerank_images):
    """Search per-layer bit-widths under a BOPs (or latency) budget; reward: certified robustness (ARQ)."""
    from arq_deploy.search.driver import run_search_command

    summary = run_search_command(
        model_name=model_name, weights=weights, input_shape=_shape(input_shape), data=data, sigma=sigma,
        budget=budget, latency_budget_ms=latency_budget_ms, target=target, latency_table=latency_table,
        episodes=episodes, method=method, reward_kind=reward_kind, val_images=val_images, calib_images=calib_images,
        n0=n0, n=n, n_p=n_p, alpha=alpha, alpha_zeta=alpha_zeta, warmup=warmup, min_bits=min_bits,
        max_bits=max_bits, warm_start=warm_start, seed=seed, out=out, ray_address=ray_address,
        ray_workers=ray_workers, rerank_top=rerank_top, rerank_images=rerank_images)
    if "rerank" in summary:
        r = summary["rerank"]
        click.echo(f"re-ranked the top {r['top']} on {r['images']} fresh images: chose episode "
                   f"{r['chosen_episode']} (reward {r['chosen_rerank_reward']:.4f} there, {r['chosen_search_reward']:.4f} "
                   f"in the search)")
    click.echo(f"best reward {summary['best_reward']:.4f} at {100 * summary['best_bops_fraction']:.3f}% of W32A32 "
               f"BOPs after {summary['episodes']} episodes ({summary['evaluations']} evaluated); wrote "
               f"{Path(out) / 'policy.json'}")


@main.command(name="latency-table")
@model_opts
@click.option("--target", required=True, help="registered target whose per-layer latency is measured")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tvm"]), default="auto", show_default=True,
              help="auto: onnxruntime here, TVM with --remote or for another architecture")
@click.option("--remote", default=None, metavar="HOST:PORT", help="time TVM builds on the device over TVM RPC")
@click.option("--repeats", type=int, default=50, show_default=True, help="timed calls per graph (median)")
@click.option("--warmup", type=int, default=5, show_default=True, help="untimed calls first")
@click.option("--sigma", type=float, default=None, help="calibration noise (default: the checkpoint's σ, else 0)")
@click.option("--no-end-to-end", "no_e2e", is_flag=True, help="skip the whole-model additivity check")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="latency table JSON to write")
def latency_table_cmd(model_name, weights, input_shape, target, backend, remote, repeats, warmup, sigma, no_e2e, seed,
                      out):
    """Per-layer latency of every (w, a) pair 2..8 on a target (for `search --latency-budget-ms`)."""
    from arq_deploy.fileio import write_json
    from arq_deploy.pipeline import load
    from arq_deploy.search.latency import check_setup, measure_table

    check_setup(target, backend, remote)  # before the model loads
    lm = load(model_name or (None if weights else "digits_cnn"), weights, input_shape=_shape(input_shape))
    sigma = float(lm.meta.get("sigma") or 0.0) if sigma is None else sigma
    table = measure_table(lm, target, backend, remote, repeats=repeats, warmup=warmup, seed=seed, sigma=sigma,
                          end_to_end=not no_e2e)
    write_json(out, table.to_dict())
    d = table.details
    variants = {v for row in table.source.values() for v in row.values()}
    click.echo(f"wrote {out}: {len(table.entries)} layers × 49 pairs on {table.target} ({d['backend']}), "
               f"{d['measured']} graphs measured ({len(variants)} variant kinds), overhead {d['overhead_ms']:.4f} ms")
    for k, v in (d["end_to_end"] or {}).items():
        click.echo(f"  {k:>6}: end to end {v['measured_ms']:.4f} ms, sum of layers {v['sum_of_layers_ms']:.4f} ms "
                   f"({v['sum_over_measured']:.2f}×)")


from arq_deploy.checks import check as _check_group  # noqa: E402  (click only; the checks import torch lazily)

main.add_command(_check_group)


@main.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="HTML file [RUN/report.html]")
def report(run, out):
    """Gather a run directory's results (search, export, certification, checks, benchmarks) into one HTML page."""
    from arq_deploy.report import build_report

    click.echo(f"wrote {build_report(run, out)}")


@main.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--fast", is_flag=True, help="fewer epochs and samples (for tests)")
def demo(out, fast):
    """End to end on scikit-learn's digits: train with noise, quantize, export, compile, run, certify, report."""
    from arq_deploy.demo import run_demo

    run_demo(Path(out), fast=fast)


if __name__ == "__main__":
    main()
