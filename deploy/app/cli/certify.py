"""`arq-deploy certify`: randomized-smoothing certification of a deployed model on a target (see `certify_stage`)."""

from __future__ import annotations

import click

from arq_deploy.app.cli.options import (
    backend_opt,
    data_opt,
    model_opts,
    model_source,
    parse_preprocess,
    preprocess_opts,
    remote_opt,
    target_opt,
)


@click.command()
@click.argument("model_path", required=False, type=click.Path())
@model_opts
@data_opt
@preprocess_opts
@target_opt
@backend_opt(("auto", "onnxruntime", "tvm", "qemu", "torch"))
@remote_opt
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
@click.option("--radii", default=None, metavar="R1,R2,...",
              help="sequential certification: decide robustness at these radii, sampling until an anytime-valid "
                   "test decides each (or --max-n is reached)")
@click.option("--adaptive", is_flag=True, help="adaptive radius estimation: sample each input until its certified "
                                               "radius is within --tolerance of what --max-n could give")
@click.option("--max-n", "max_n", type=int, default=None, help="--radii/--adaptive: sample cap per input [100000]")
@click.option("--first-n", "first_n", type=int, default=None,
              help="--radii/--adaptive: samples at the first look (the first batch); looks double up to --max-n [500]")
@click.option("--tolerance", type=float, default=None, help="--adaptive: radius tolerance [0.015]")
@click.option("--randomized-cp", is_flag=True, help="fixed-N CERTIFY with the randomized Clopper-Pearson bound "
                                                    "(exact coverage, never looser than Clopper-Pearson)")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="TSV log (appended, resumable)")
def certify(model_path, model_name, weights, input_shape, data, resize, center_crop, target, backend, remote, sigma,
            n0, n, alpha, skip, max_images, batch_size, seed, ray_address, ray_workers, ray_cpus_per_worker, float_log,
            float_model, n_p, alpha_zeta, fallback_n, float_labels, out, **sequential):
    """Randomized-smoothing CERTIFY (Cohen et al.) on test images: TSV rows, summary JSON and a PNG curve.

    --target says where the model runs (x86, cuda; a board with --remote). With --incremental-from FLOAT.tsv
    --float-model FLOAT.onnx, certify a quantized model incrementally (Ugare et al. 2024) from the float model's
    certificates, falling back to full CERTIFY where that fails. With --radii R1,R2 (or --adaptive) each input gets as
    many samples as it needs, up to --max-n, under an anytime-valid confidence sequence (docs/certification.md)."""
    from arq_deploy.app.stages import certify_stage
    from arq_deploy.core.config import CertifyConfig, ConfigError, IrsConfig, RayConfig

    irs = None
    if float_log:
        if not float_model:
            raise ConfigError("--incremental-from needs --float-model (the model that wrote that log)")
        irs = IrsConfig(float_log=float_log, float_model=float_model, n_p=n_p, alpha_zeta=alpha_zeta,
                        fallback_n=fallback_n, float_labels=float_labels)
    ray = RayConfig(address=ray_address, workers=ray_workers, cpus_per_worker=ray_cpus_per_worker) \
        if ray_address else None
    cfg = CertifyConfig(out=out, model_path=model_path, model=model_source(model_name, weights, input_shape), data=data,
                        preprocess=parse_preprocess(resize, center_crop),
                        target=target, backend=backend, remote=remote, sigma=sigma, n0=n0, n=n, alpha=alpha,
                        seed=seed, skip=skip, max_images=max_images, batch_size=batch_size, irs=irs, ray=ray,
                        **_sequential_settings(**sequential))
    res = certify_stage(cfg)
    d, cost = res["summary"], res["meta"].get("cost")
    click.echo(f"{res['images']} images: ACR {d['acr']:.3f}, certified accuracy "
               + ", ".join(f"r={r}: {v:.3f}" for r, v in d["certified_accuracy"].items())
               + f", abstain {d['abstain_rate']:.3f}, {d['seconds_per_input']:.2f} s/image"
               + (f"; IRS path for {100 * cost['irs_fraction']:.0f}% of inputs" if cost else "")
               + (f"; {used['mean']:,.0f} samples per input (median {used['median']:,.0f})"
                  if (used := res["meta"].get("samples_per_input")) else ""))


def _sequential_settings(radii, adaptive, max_n, first_n, tolerance, randomized_cp) -> dict:
    """The CertifyConfig fields of --radii/--adaptive/--max-n/--first-n/--tolerance/--randomized-cp."""
    from arq_deploy.core.config import ConfigError

    if radii is not None:
        try:
            radii = tuple(float(r) for r in radii.split(",") if r.strip())
        except ValueError:
            raise ConfigError(f"--radii must be comma-separated numbers such as 0.25,0.5,0.75, got {radii!r}") from None
    return {"radii": radii, "adaptive": adaptive, "max_n": max_n, "first_n": first_n, "tolerance": tolerance,
            "randomized_cp": randomized_cp}


COMMANDS = (certify,)
